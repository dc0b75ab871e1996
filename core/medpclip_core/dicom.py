"""DICOM on the client: read a Part 10 file into pixels, a window and what the server needs.

`read_dicom` decodes one frame with pydicom (compressed transfer syntaxes through its pixel
handlers: pylibjpeg with pylibjpeg-libjpeg for JPEG, pylibjpeg-openjpeg for JPEG 2000,
pylibjpeg-rle for RLE, pyjpegls for JPEG-LS, python-gdcm for 12-bit JPEG Extended; the same
`imaging.decode_pixel_data` as the server), applies the modality LUT (rescale slope/intercept
or a Modality LUT Sequence, from the per-frame functional groups of enhanced multi-frame files
too) and chooses the display window: explicit > preset > the file's VOI (window tags, else a
VOI LUT Sequence) > min-max. `to_request` turns the result into the `(pixels, window)` pair that
`MedPClipClient.infer` sends as PIXELS (+ WINDOW), giving the server the same display image it
would compute from the file's bytes.

Send the bytes (the default) or decoded pixels?

* Bytes (IMAGE): the server decodes with the same pydicom stack (`imaging.decode_dicom`). Best
  for uncompressed or compressed single-frame files the server can decode: the upload is the
  file itself (for a 512x512 16-bit CT slice about 0.5 MB, while float32 pixels are 1 MB), and
  the client needs no pixel handlers and does no work.
* Decoded pixels (PIXELS [+ WINDOW], `to_request(read_dicom(...))`) when
  - the transfer syntax is one the server cannot decode (its pixel handlers differ from yours),
  - the file is multi-frame and one frame matters: the server decodes only the first frame,
    and sending one decoded frame instead of a whole cine loop or enhanced series saves upload,
  - the window is chosen on the client (presets, per-frame VOI of enhanced files, a VOI LUT
    Sequence applied after the modality LUT as PS3.3 C.11.2 says),
  - de-identification matters: pixels carry no tags, so no patient name, ID or dates leave the
    client (burnt-in annotations in the pixels themselves are not removed).

MONOCHROME1 (higher values are darker) is inverted after windowing, as the server does for bytes.
The server windows PIXELS and expects MONOCHROME2, so for MONOCHROME1 (and for a non-linear VOI
LUT) `to_request` sends the display image itself, scaled to 0..255, without a window.

Nothing here logs or raises with tag values: errors name only the transfer syntax, frame counts
and sizes, never patient data. A truncated file is called truncated (with the byte counts for
uncompressed pixel data); installing a handler is advised only when none installed supports
the transfer syntax.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import InputError
from .imaging import (
    _apply_window,
    _check_size,
    _min_max,
    check_pixel_data,
    decode_image,
    decode_pixel_data,
    is_dicom,
)
from .tensors import MAX_IMAGE_SIDE

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

__all__ = [
    "WINDOW_PRESETS",
    "DicomImage",
    "local_request",
    "read_dicom",
    "resolve_window",
    "to_request",
]

# (centre, width) in Hounsfield units: the usual CT display presets.
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (40.0, 400.0),
    "abdomen": (60.0, 400.0),
    "liver": (60.0, 150.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
}

WindowArg = tuple[float, float] | str | None


def resolve_window(window: WindowArg) -> tuple[float, float] | None:
    """A preset name or (centre, width) -> (centre, width); None stays None."""
    if window is None:
        return None
    if isinstance(window, str):
        try:
            return WINDOW_PRESETS[window.strip().lower()]
        except KeyError:
            names = ", ".join(WINDOW_PRESETS)
            raise InputError(f"unknown window preset {window!r}; presets: {names}") from None
    centre, width = (float(v) for v in window)
    return centre, width


@dataclass(frozen=True)
class DicomImage:
    """One decoded frame and how to display it.

    `pixels`: float32 H x W in modality units (e.g. Hounsfield units) for grayscale, or
    H x W x 3 RGB stored values for colour (YBR converted, palette applied).
    `window`: the (centre, width) to display with; None for colour without an explicit window
    and for a non-linear VOI LUT (`window_source == "voi_lut"`).
    `window_source`: "explicit", "preset", "file", "voi_lut", "min-max" or "none" (colour).
    """

    pixels: np.ndarray
    window: tuple[float, float] | None
    window_source: str
    photometric: str  # as stored in the file
    frames: int
    frame: int
    transfer_syntax: str  # UID
    bits_stored: int
    voi_display: np.ndarray | None = None  # [0, 1] after a VOI LUT Sequence (no window form)

    @property
    def is_color(self) -> bool:
        return self.pixels.ndim == 3

    def display(self) -> np.ndarray:
        """The display image in [0, 1] (H x W, or H x W x 3 for colour), MONOCHROME1 inverted:
        what the server computes from the file's bytes for this frame and window."""
        if self.is_color:
            if self.window is not None:
                return _apply_window(self.pixels, self.window)
            return self.pixels / float(2**self.bits_stored - 1)
        if self.window_source == "voi_lut" and self.voi_display is not None:
            out = self.voi_display
        elif self.window_source == "min-max":
            out = _min_max(self.pixels)  # the server's own min-max, not its window form
        else:
            assert self.window is not None
            out = _apply_window(self.pixels, self.window)
        return 1.0 - out if self.photometric == "MONOCHROME1" else out


def _dataset(src: str | os.PathLike[str] | bytes | bytearray | memoryview | Dataset) -> Dataset:
    import pydicom

    if isinstance(src, pydicom.Dataset):
        return src
    try:
        if isinstance(src, (bytes, bytearray, memoryview)):
            return pydicom.dcmread(io.BytesIO(bytes(src)))
        return pydicom.dcmread(os.fspath(src))
    except OSError:
        raise
    except Exception as exc:
        raise InputError(f"not a readable DICOM Part 10 file ({type(exc).__name__})") from None


_FLAT_KEYWORDS = (
    "PhotometricInterpretation",
    "BitsAllocated",
    "BitsStored",
    "PixelRepresentation",
    "RescaleSlope",
    "RescaleIntercept",
    "RescaleType",
    "ModalityLUTSequence",
    "WindowCenter",
    "WindowWidth",
    "VOILUTFunction",
    "VOILUTSequence",
)
# Functional group macros of enhanced multi-frame IODs (PS3.3 C.7.6.16) holding the modality
# LUT and VOI of a frame.
_FRAME_MACROS = ("PixelValueTransformationSequence", "FrameVOILUTSequence")


def _frame_attributes(ds: Dataset, frame: int) -> Dataset:
    """The dataset whose modality LUT / VOI attributes apply to `frame`: the top level,
    overridden by the shared, then the per-frame functional groups (enhanced CT/MR keep rescale
    and window only there)."""
    from pydicom.dataset import Dataset

    groups = []
    if ds.get("SharedFunctionalGroupsSequence"):
        groups.append(ds.SharedFunctionalGroupsSequence[0])
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame and frame < len(per_frame):
        groups.append(per_frame[frame])
    macros = [g[m].value[0] for g in groups for m in _FRAME_MACROS if g.get(m)]
    if not macros:
        return ds
    flat = Dataset()
    if hasattr(ds, "file_meta"):
        flat.file_meta = ds.file_meta  # pydicom reads OW LUT data with the file's endianness
    for kw in _FLAT_KEYWORDS:
        if kw in ds:
            flat[kw] = ds[kw]
    for item in macros:
        for elem in item:
            flat[elem.tag] = elem
    return flat


def _first(value: Any) -> float:
    """First value of a possibly multi-valued DS (the file's default window)."""
    from pydicom.multival import MultiValue

    return float(value[0] if isinstance(value, MultiValue) else value)


def read_dicom(
    src: str | os.PathLike[str] | bytes | bytearray | memoryview | Dataset,
    frame: int = 0,
    window: WindowArg = None,
    max_side: int = MAX_IMAGE_SIDE,
) -> DicomImage:
    """Decode `frame` of a DICOM Part 10 file (a path, its bytes or a pydicom Dataset).

    `window`: (centre, width), a preset name (`WINDOW_PRESETS`), or None for the file's VOI
    (window tags, else a VOI LUT Sequence), else min-max. Raises `InputError` (a ValueError)
    for a file that is not DICOM, has no pixel data, is too large, cannot be decoded, or has no
    such frame; OSError when a path cannot be read.
    """
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

    ds = _dataset(src)
    check_pixel_data(ds)  # missing, or cut short: said before any decoder runs
    _check_size(int(ds.get("Rows", 0)), int(ds.get("Columns", 0)), max_side)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if not 0 <= frame < frames:
        raise InputError(
            f"frame {frame} requested but the file has {frames} frame(s) (valid: 0..{frames - 1})"
        )
    arr = decode_pixel_data(ds, frame)
    ts = str(ds.file_meta.get("TransferSyntaxUID", "")) if hasattr(ds, "file_meta") else ""
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    bits = int(ds.get("BitsStored", 8) or 8)
    requested = resolve_window(window)
    explicit = "preset" if isinstance(window, str) else "explicit"
    common = dict(photometric=photometric, frames=frames, frame=frame, transfer_syntax=ts)

    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
        bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
    if arr.ndim == 3:  # RGB (pydicom already converted YBR_* to RGB)
        rgb = arr.astype(np.float32)
        return DicomImage(
            rgb, requested, explicit if requested else "none", bits_stored=bits, **common
        )

    attrs = _frame_attributes(ds, frame)
    modality = apply_modality_lut(arr, attrs)
    pixels = modality.astype(np.float32)
    voi_display = None
    if requested is not None:
        chosen, source = requested, explicit
    elif "WindowCenter" in attrs and "WindowWidth" in attrs:
        chosen, source = (_first(attrs.WindowCenter), _first(attrs.WindowWidth)), "file"
    elif attrs.get("VOILUTSequence"):
        # PS3.3 C.11.2: the VOI LUT maps the modality LUT's output (LUT indices are integers)
        idx = modality if modality.dtype.kind in "iu" else np.rint(modality).astype(np.int64)
        voi_display = _min_max(apply_voi_lut(idx, attrs).astype(np.float32))
        chosen, source = None, "voi_lut"
    else:
        lo, hi = float(pixels.min()), float(pixels.max())
        # the window with the same linear map as min-max; a constant image maps to 0
        chosen = ((lo + hi) / 2 + 0.5, hi - lo + 1) if hi > lo else (lo + 1.0, 2.0)
        source = "min-max"
    return DicomImage(pixels, chosen, source, bits_stored=bits, voi_display=voi_display, **common)


def to_request(d: DicomImage) -> tuple[np.ndarray, tuple[float, float] | None]:
    """(pixels, window) for `MedPClipClient.infer(pixels, region, labels, window)`.

    MONOCHROME2 grayscale: the modality values and the window, so the server windows exactly as
    it would the file. MONOCHROME1 or a VOI LUT Sequence: the display image x 255 without a
    window (the server windows linearly and expects MONOCHROME2). Colour: the RGB values scaled
    to 0..255 (exact for 8-bit), or with the explicit window.
    """
    if d.is_color:
        if d.window is not None:
            return d.pixels, d.window
        return (d.display() * 255.0).astype(np.float32), None
    if d.photometric == "MONOCHROME1" or d.window is None:
        return (d.display() * 255.0).astype(np.float32), None
    return d.pixels, d.window


def local_request(
    data: bytes, frame: int = 0, window: WindowArg = None
) -> tuple[np.ndarray, tuple[float, float] | None]:
    """Decode any file the server accepts on the client: DICOM through `read_dicom` and
    `to_request`; PNG/JPEG through the server's own `imaging.decode_image`, sent as display
    values 0..255 without a window."""
    if is_dicom(data):
        return to_request(read_dicom(data, frame, window))
    if frame:
        raise InputError(f"frame {frame} requested but the image is not a multi-frame DICOM file")
    display = decode_image(data, resolve_window(window))
    return (display * 255.0).astype(np.float32), None
