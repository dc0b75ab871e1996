"""Client for MedP-CLIP, a region-aware medical CLIP served on NVIDIA Triton."""

from medpclip_core.dicom import read_dicom, to_request

from .aio import AsyncMedPClipClient, AsyncSession, Outcome
from .client import MedPClipClient, MedPClipError, Region, Request, Result, Session

__all__ = [
    "AsyncMedPClipClient",
    "AsyncSession",
    "MedPClipClient",
    "MedPClipError",
    "Outcome",
    "Region",
    "Request",
    "Result",
    "Session",
    "read_dicom",
    "to_request",
]
__version__ = "0.1.0"
