"""Client for MedP-CLIP, a region-aware medical CLIP served on NVIDIA Triton."""

from .client import MedPClipClient, MedPClipError, Region, Result

__all__ = ["MedPClipClient", "MedPClipError", "Region", "Result"]
__version__ = "0.1.0"
