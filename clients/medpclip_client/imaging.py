"""Image decoding, DICOM display pipeline, letterboxing and prompt mapping (numpy, no torch).

The server's `preprocess`/`postprocess` models, the export's parity checks and the tests all use
these functions, so "the same preprocessed input" is the same code, not a re-implementation.

Never centre-crop: a prompt near the edge would vanish. The image is resized so that its longest
side is S and padded at the bottom/right (as SAM does); prompts are mapped with the same scale.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .tensors import MAX_IMAGE_SIDE, MAX_POINTS

# OpenAI CLIP / BiomedCLIP normalisation
MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)

PAD_LABEL, BOX_TL, BOX_BR = -1, 2, 3

# We refuse oversized images ourselves from the header, with a message naming our limit
# (`max_side`, at most 8192^2 = 67 Mpx, below PIL's own bomb threshold).
Image.MAX_IMAGE_PIXELS = None


class InputError(ValueError):
    """A request the caller must fix; served as INVALID_ARGUMENT with this message."""


@dataclass(frozen=True)
class Transform:
    """Original image (height x width) -> letterboxed S x S model input."""

    scale: float
    height: int
    width: int
    size: int  # S

    @property
    def resized(self) -> tuple[int, int]:
        """(height, width) of the image inside the letterbox."""
        return (
            max(1, min(self.size, round(self.height * self.scale))),
            max(1, min(self.size, round(self.width * self.scale))),
        )

    def as_array(self) -> np.ndarray:
        return np.array([self.scale, 0.0, 0.0, self.height, self.width], dtype=np.float32)

    @classmethod
    def from_array(cls, a: np.ndarray, size: int) -> Transform:
        return cls(float(a[0]), int(a[3]), int(a[4]), size)


# --- decoding ---------------------------------------------------------------------------------


def _check_size(height: int, width: int, max_side: int) -> None:
    if height < 1 or width < 1:
        raise InputError(f"image is empty ({height}x{width})")
    if max(height, width) > max_side:
        raise InputError(
            f"image is {width}x{height} pixels; the largest side this server accepts is "
            f"{max_side} (downsample it, or raise the preprocess model's max_image_side)"
        )


def is_dicom(data: bytes) -> bool:
    return len(data) >= 132 and data[128:132] == b"DICM"


def decode_image(
    data: bytes, window: tuple[float, float] | None = None, max_side: int = MAX_IMAGE_SIDE
) -> np.ndarray:
    """PNG/JPEG/DICOM Part 10 bytes -> display image float32 [H,W,3] in [0, 1]."""
    if not data:
        raise InputError("IMAGE is empty: send the bytes of a PNG, JPEG or DICOM file")
    if is_dicom(data):
        return decode_dicom(data, window, max_side)
    try:
        img = Image.open(io.BytesIO(data))
        _check_size(img.height, img.width, max_side)  # before decoding: no 20000x20000 decode
        img.load()
    except InputError:
        raise
    except Exception as exc:  # PIL raises many types for corrupt files
        raise InputError(
            f"IMAGE could not be decoded as PNG, JPEG or DICOM Part 10 ({type(exc).__name__}); "
            "check that the file is complete and in one of these formats"
        ) from None
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(img, dtype=np.float32)
        return _gray_to_rgb(_apply_window(a, window) if window else _min_max(a))
    rgb = np.asarray(img.convert("RGB"), dtype=np.float32)
    if window:
        return _apply_window(rgb, window)
    return rgb / 255.0


def decode_dicom(
    data: bytes, window: tuple[float, float] | None = None, max_side: int = MAX_IMAGE_SIDE
) -> np.ndarray:
    """DICOM Part 10 -> display image: modality LUT, window (request, file or min-max),
    MONOCHROME1 inversion. Multi-frame: the first frame."""
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except Exception as exc:
        raise InputError(
            f"IMAGE is not a readable DICOM Part 10 file ({type(exc).__name__})"
        ) from None
    if "PixelData" not in ds:
        sop = getattr(ds, "SOPClassUID", None)
        kind = sop.name if sop is not None else "unknown SOP class"
        raise InputError(f"DICOM instance has no pixel data ({kind}); send an image instance")
    rows, cols = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
    _check_size(rows, cols, max_side)
    try:
        arr = ds.pixel_array
    except Exception as exc:
        ts = ds.file_meta.get("TransferSyntaxUID", "unknown")
        raise InputError(
            f"DICOM pixel data could not be decoded (transfer syntax {ts}: {type(exc).__name__}); "
            "install the matching pydicom pixel handler or send decoded pixels"
        ) from None
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        arr = arr[0]
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        arr = apply_color_lut(arr, ds)  # indices -> RGB through the palette
    if arr.ndim == 3 and arr.shape[-1] == 3:
        # pydicom 3 already returns RGB for YBR pixel data (convert_color_space=True default)
        a = arr.astype(np.float32)
        bits = 8 * arr.dtype.itemsize if photometric == "PALETTE COLOR" else int(ds.BitsStored)
        # colour pixels are display values already: scale by the bit depth, as for PNG
        return _apply_window(a, window) if window else a / float(2**bits - 1)
    a = apply_modality_lut(arr, ds).astype(np.float32)
    if window:
        out = _apply_window(a, window)
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        centre, width = ds.WindowCenter, ds.WindowWidth
        centre = float(centre[0] if isinstance(centre, pydicom.multival.MultiValue) else centre)
        width = float(width[0] if isinstance(width, pydicom.multival.MultiValue) else width)
        out = _apply_window(a, (centre, width))
    elif "VOILUTSequence" in ds:  # PS3.3 C.11.2: the VOI LUT takes the modality LUT's output
        out = _min_max(apply_voi_lut(a, ds).astype(np.float32))
    else:
        out = _min_max(a)
    if photometric == "MONOCHROME1":
        out = 1.0 - out
    return _gray_to_rgb(out)


def pixels_to_image(
    pixels: np.ndarray, window: tuple[float, float] | None = None, max_side: int = MAX_IMAGE_SIDE
) -> np.ndarray:
    """Raw pixels [H,W], [H,W,1] or [H,W,3] -> display image. Without a window the values must
    already be display intensities in [0, 255]."""
    a = np.asarray(pixels, dtype=np.float32)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] == 3)):
        raise InputError(f"PIXELS must be H x W x 1 or H x W x 3, got shape {list(a.shape)}")
    _check_size(a.shape[0], a.shape[1], max_side)
    if not np.isfinite(a).all():
        raise InputError("PIXELS contains NaN or infinite values")
    if window:
        out = _apply_window(a, window)
    else:
        if a.min() < 0 or a.max() > 255:
            raise InputError(
                f"PIXELS range [{a.min():g}, {a.max():g}] is outside [0, 255]; pass WINDOW "
                "(centre, width) for raw intensities such as Hounsfield units"
            )
        out = a / 255.0
    return _gray_to_rgb(out) if out.ndim == 2 else out


def _apply_window(a: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """DICOM linear window (PS3.3 C.11.2.1.2.1) to [0, 1]."""
    centre, width = float(window[0]), float(window[1])
    if not np.isfinite([centre, width]).all() or width < 1:
        raise InputError(f"WINDOW must be finite (centre, width) with width >= 1, got {window}")
    return np.clip((a - (centre - 0.5)) / (width - 1) + 0.5, 0.0, 1.0).astype(np.float32)


def _min_max(a: np.ndarray) -> np.ndarray:
    lo, hi = float(a.min()), float(a.max())
    return ((a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)).astype(np.float32)


def _gray_to_rgb(a: np.ndarray) -> np.ndarray:
    return np.repeat(a[..., None], 3, axis=-1) if a.ndim == 2 else a


# --- letterbox and prompts --------------------------------------------------------------------


def _resize(channel: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of one float channel (PIL mode F)."""
    img = Image.fromarray(np.ascontiguousarray(channel, dtype=np.float32), mode="F")
    return np.asarray(img.resize((width, height), Image.Resampling.BILINEAR), dtype=np.float32)


def letterbox(image: np.ndarray, size: int) -> tuple[np.ndarray, Transform]:
    """Display image [H,W,3] in [0, 1] -> normalised pixel values [3,S,S] and the transform."""
    h, w = image.shape[:2]
    t = Transform(scale=size / max(h, w), height=h, width=w, size=size)
    rh, rw = t.resized
    out = np.zeros((3, size, size), dtype=np.float32)
    for c in range(3):
        out[c, :rh, :rw] = _resize(image[..., c], rh, rw)
    out = (out - MEAN[:, None, None]) / STD[:, None, None]
    out[:, rh:, :] = 0.0  # padding is the mean colour (0 after normalisation)
    out[:, :, rw:] = 0.0
    return out, t


@dataclass(frozen=True)
class Prompts:
    """Prompts in model-input coordinates, ready for the prompt encoder (batch of one)."""

    point_coords: np.ndarray  # [1,N,2] float32
    point_labels: np.ndarray  # [1,N] int32
    mask_input: np.ndarray  # [1,1,M,M] float32
    has_mask: np.ndarray  # [1,1] float32


def map_prompts(
    t: Transform,
    mask_side: int,
    points: np.ndarray | None = None,
    point_labels: np.ndarray | None = None,
    box: np.ndarray | None = None,
    mask: np.ndarray | None = None,
) -> Prompts:
    """Validate prompts given in original image pixels (x = column, y = row) and map them."""
    coords, labels = [], []
    if points is not None and np.asarray(points).size:
        p = np.asarray(points, dtype=np.float32)
        if p.ndim != 2 or p.shape[1] != 2:
            raise InputError(f"POINTS must be N x 2 (x, y), got shape {list(p.shape)}")
        if len(p) > MAX_POINTS:
            raise InputError(f"{len(p)} points given; at most {MAX_POINTS} per request")
        if not np.isfinite(p).all():
            raise InputError("POINTS contains NaN or infinite coordinates")
        _check_inside(p, t, "point")
        if point_labels is None:
            lab = np.ones(len(p), dtype=np.int32)
        else:
            lab = np.asarray(point_labels).reshape(-1)
            if len(lab) != len(p):
                raise InputError(f"POINT_LABELS has {len(lab)} labels for {len(p)} points")
            if not np.isin(lab, (0, 1)).all():
                raise InputError("POINT_LABELS must be 1 (foreground) or 0 (background)")
        coords.append(p * t.scale)
        labels.append(lab.astype(np.int32))
    elif point_labels is not None and np.asarray(point_labels).size:
        raise InputError("POINT_LABELS given without POINTS")
    if box is not None:
        b = np.asarray(box, dtype=np.float32).reshape(-1)
        if b.shape != (4,):
            raise InputError(f"BOX must be [x0, y0, x1, y1], got {b.size} values")
        if not np.isfinite(b).all():
            raise InputError("BOX contains NaN or infinite coordinates")
        x0, y0, x1, y1 = (float(v) for v in b)
        if x1 <= x0 or y1 <= y0:
            raise InputError(f"BOX must have x0 < x1 and y0 < y1, got {[x0, y0, x1, y1]}")
        if x0 < 0 or y0 < 0 or x1 > t.width or y1 > t.height:
            raise InputError(
                f"BOX {[x0, y0, x1, y1]} reaches outside the {t.width}x{t.height} image"
            )
        coords.append(b.reshape(2, 2) * t.scale)
        labels.append(np.array([BOX_TL, BOX_BR], dtype=np.int32))
    if not coords:  # SAM's padding point: "no point" with a fixed shape
        coords.append(np.zeros((1, 2), dtype=np.float32))
        labels.append(np.array([PAD_LABEL], dtype=np.int32))

    mask_input = np.zeros((1, 1, mask_side, mask_side), dtype=np.float32)
    has_mask = np.zeros((1, 1), dtype=np.float32)
    if mask is not None:
        m = np.asarray(mask)
        if m.shape != (t.height, t.width):
            raise InputError(
                f"MASK is {m.shape[1] if m.ndim > 1 else '?'}x{m.shape[0]} but the image is "
                f"{t.width}x{t.height}; send a mask of the image's size"
            )
        if not m.any():
            raise InputError("MASK has no nonzero pixel; mark the region with nonzero values")
        mask_input[0, 0] = mask_to_grid(m, t, mask_side)
        has_mask[0, 0] = 1.0
    return Prompts(
        point_coords=np.concatenate(coords)[None].astype(np.float32),
        point_labels=np.concatenate(labels)[None].astype(np.int32),
        mask_input=mask_input,
        has_mask=has_mask,
    )


def _check_inside(p: np.ndarray, t: Transform, what: str) -> None:
    outside = (p[:, 0] < 0) | (p[:, 0] >= t.width) | (p[:, 1] < 0) | (p[:, 1] >= t.height)
    if outside.any():
        i = int(np.argmax(outside))
        raise InputError(
            f"{what} {i} at (x={p[i, 0]:g}, y={p[i, 1]:g}) is outside the {t.width}x{t.height} "
            "image; coordinates are pixels of the original image, x = column, y = row"
        )


def mask_to_grid(mask: np.ndarray, t: Transform, mask_side: int) -> np.ndarray:
    """Binary mask at image size -> fraction of each low-res cell covered, [M,M] in [0, 1]."""
    rh, rw = t.resized
    full = np.zeros((t.size, t.size), dtype=np.float32)
    full[:rh, :rw] = np.clip(_resize((mask > 0).astype(np.float32), rh, rw), 0.0, 1.0)
    f = t.size // mask_side
    return full.reshape(mask_side, f, mask_side, f).mean(axis=(1, 3))


def mask_from_logits(logits: np.ndarray, t: Transform) -> np.ndarray:
    """Low-res logits [M,M] (letterboxed frame) -> uint8 mask [H,W] at the original size."""
    up = _resize(logits, t.size, t.size)
    rh, rw = t.resized
    return (_resize(up[:rh, :rw], t.height, t.width) > 0).astype(np.uint8)
