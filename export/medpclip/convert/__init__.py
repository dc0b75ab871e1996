"""Importers: open checkpoints a deployment is likely to start from -> MedP-CLIP checkpoints.

    python -m medpclip.convert biomedclip SRC_DIR --out CKPT_DIR [--sam sam_vit_b_01ec64.pth]
    python -m medpclip.convert sam SAM_FILE --into CKPT_DIR --out CKPT_DIR

`biomedclip`: the open_clip BiomedCLIP folder (towers and logit scale); `sam`: SAM's prompt
encoder and mask decoder into an existing MedP-CLIP checkpoint. Each lists what it mapped,
what it dropped and why, what starts fresh, and fails on any tensor it does not know.
"""

from .biomedclip import Converted, convert
from .sam import import_sam
from .state import ConversionError, Report

__all__ = ["ConversionError", "Converted", "Report", "convert", "import_sam"]
