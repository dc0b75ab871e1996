"""Client for MedP-CLIP, a region-aware medical CLIP served on NVIDIA Triton."""

from medpclip_core.dicom import read_dicom, to_request

from .aio import AsyncMedPClipClient, Outcome
from .client import MedPClipClient, MedPClipError, Region, Request, Result

__all__ = [
    "AsyncMedPClipClient",
    "MedPClipClient",
    "MedPClipError",
    "Outcome",
    "Region",
    "Request",
    "Result",
    "read_dicom",
    "to_request",
]
__version__ = "0.1.0"
