"""MedP-CLIP components, one file each (SAM layout)."""

from .image_encoder import ImageEncoder
from .mask_decoder import MaskDecoder
from .prompt_encoder import PromptEncoder
from .text_encoder import TextEncoder

__all__ = ["ImageEncoder", "MaskDecoder", "PromptEncoder", "TextEncoder"]
