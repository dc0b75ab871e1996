"""Image decoding, DICOM display pipeline, letterboxing and prompt mapping (numpy, no torch).

The building blocks of `inputs.prepare`, the one sequence every caller runs (the server's
`preprocess` model, the export's parity checks, benchmarks and tests).

Never centre-crop: a prompt near the edge would vanish. The image is resized so that its longest
side is S and padded at the bottom/right (as SAM does); prompts are mapped with the same scale.
"""

from __future__ import annotations

import io
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from .errors import InputError
from .tensors import MAX_IMAGE_SIDE, MAX_POINTS

if TYPE_CHECKING:
    from pydicom.dataset import Dataset
    from pydicom.pixels.decoders.base import DecodeRunner
    from pydicom.uid import UID

# OpenAI CLIP / BiomedCLIP normalisation
MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)

PAD_LABEL, BOX_TL, BOX_BR = -1, 2, 3

# We refuse oversized images ourselves from the header, with a message naming our limit
# (`max_side`, at most 8192^2 = 67 Mpx, below PIL's own bomb threshold).
Image.MAX_IMAGE_PIXELS = None


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

    @classmethod
    def from_request(cls, a: np.ndarray, size: int, max_side: int = MAX_IMAGE_SIDE) -> Transform:
        """A caller's TRANSFORM (as `medp_clip_encode` returned it) -> the transform `letterbox`
        made for that image, or InputError: FP32 [5], finite, no top/left padding, a whole
        height and width in 1..max_side, and the scale that letterboxing such an image to
        `size` gives (a transform from a model of another input size fails here). The messages
        name the rule, never the values sent."""
        a = np.asarray(a)
        if a.dtype != np.float32:
            raise InputError(f"TRANSFORM must be FP32, as medp_clip_encode returns it; {_RESEND}")
        if a.shape != (5,):
            raise InputError(
                "TRANSFORM must hold 5 values (scale, pad_x, pad_y, height, width), got shape "
                f"{list(a.shape)}; {_RESEND}"
            )
        if not np.isfinite(a).all():
            raise InputError(f"TRANSFORM contains NaN or infinite values; {_RESEND}")
        t = cls.from_array(a, size)
        scale, pad_x, pad_y, height, width = (float(v) for v in a)
        if scale <= 0:
            raise InputError(f"TRANSFORM scale must be positive; {_RESEND}")
        if pad_x != 0 or pad_y != 0:
            raise InputError(
                f"TRANSFORM padding must be 0 (this server pads at the bottom and right); {_RESEND}"
            )
        if height != t.height or width != t.width or min(t.height, t.width) < 1:
            raise InputError(f"TRANSFORM height and width must be whole numbers >= 1; {_RESEND}")
        if max(t.height, t.width) > max_side:
            raise InputError(
                f"TRANSFORM describes an image larger than this server accepts ({max_side} pixels "
                f"a side); {_RESEND}"
            )
        expected = size / max(t.height, t.width)
        if abs(scale - expected) > 1e-5 * expected:
            raise InputError(
                "TRANSFORM does not belong to this model: its scale is not this model's input "
                f"size ({size}) over the image's longest side, so it was made for another input "
                f"size or altered; {_RESEND}"
            )
        return cls(expected, t.height, t.width, size)  # exactly what letterbox made


_RESEND = "send what medp_clip_encode on this server returned, unchanged"


def check_image_tokens(tokens: np.ndarray, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """A caller's IMAGE_TOKENS (as `medp_clip_encode` returned them) -> the same array, or
    InputError: this model's `shape` (trunk tokens x width), `dtype`, finite values."""
    a = np.asarray(tokens)
    if a.dtype != np.dtype(dtype):
        raise InputError(
            f"IMAGE_TOKENS must be {np.dtype(dtype).name}, as medp_clip_encode returns them; "
            f"{_RESEND}"
        )
    if a.shape != tuple(shape):
        raise InputError(
            f"IMAGE_TOKENS must be {' x '.join(map(str, shape))} (this model's trunk tokens x "
            f"width), got shape {list(a.shape)}; tokens of another model do not fit: {_RESEND}"
        )
    if not np.isfinite(a).all():
        raise InputError(f"IMAGE_TOKENS contains NaN or infinite values; {_RESEND}")
    return a


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
    check_pixel_data(ds)
    _check_size(int(ds.get("Rows", 0)), int(ds.get("Columns", 0)), max_side)
    arr = decode_pixel_data(ds, frame=0)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        try:
            arr = apply_color_lut(arr, ds)  # indices -> RGB through the palette
        except (ValueError, KeyError, AttributeError, IndexError) as exc:
            # a PALETTE COLOR image without a usable lookup table is the sender's to fix
            raise InputError(
                "DICOM PhotometricInterpretation is PALETTE COLOR but its palette lookup table "
                f"is missing or unusable ({type(exc).__name__}); send the image with its "
                "Palette Color Lookup Table Module, or decode it and send PIXELS"
            ) from None
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


# --- DICOM pixel data: presence, length, decoders ----------------------------------------------
# Shared by the server (`decode_dicom`) and the client (`dicom.read_dicom`), so both refuse the
# same files with the same advice. Errors name transfer syntaxes, sizes and decoder names only.

_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
JPEG_EXTENDED_12BIT = "1.2.840.10008.1.2.4.51"
_GDCM_12BIT = "gdcm-12bit"  # our label in pydicom's decoder registry
_registry_lock = threading.Lock()


def check_pixel_data(ds: Dataset) -> None:
    """InputError unless `ds` has pixel data that is not visibly cut short.

    pydicom reads a file that ends inside encapsulated (compressed) pixel data as an empty data
    set or one without the element: that means a truncated file, not a report without pixels."""
    if len(ds) == 0:
        raise InputError(
            "DICOM file has no pixel data: its data set is empty or unreadable, so the file is "
            "truncated or corrupt (e.g. it ends inside its compressed pixel data); send the "
            "whole file"
        )
    if not any(k in ds for k in _PIXEL_KEYWORDS):
        if "Rows" in ds and "Columns" in ds:
            raise InputError(
                "DICOM pixel data is missing or truncated: the file describes an image "
                f"({int(ds.Columns)}x{int(ds.Rows)}) but has no pixel data element or one that "
                "ends before it is complete; send the whole file"
            )
        sop = ds.get("SOPClassUID")
        kind = sop.name if sop is not None else "unknown SOP class"
        raise InputError(f"DICOM instance has no pixel data ({kind}); send an image instance")
    _check_native_length(ds)


def _transfer_syntax(ds: Dataset) -> UID | None:
    meta = getattr(ds, "file_meta", None)
    return meta.get("TransferSyntaxUID") if meta is not None else None


def _syntax_name(ts: UID | None) -> str:
    return f"{ts} ({ts.name})" if ts is not None else "unknown transfer syntax"


def _check_native_length(ds: Dataset) -> None:
    """Uncompressed pixel data shorter than Rows x Columns x samples x frames needs: say so
    (pydicom's own error would be reported as an undecodable transfer syntax)."""
    from pydicom.pixels.utils import get_expected_length

    ts = _transfer_syntax(ds)
    # an unknown UID (e.g. JPEG XL to this pydicom) has no is_encapsulated: leave it to the
    # decoder, which says the syntax is not supported
    if ts is None or not ts.is_transfer_syntax or ts.is_encapsulated or "PixelData" not in ds:
        return
    try:
        expected = get_expected_length(ds, unit="bytes")
    except Exception:  # missing/odd Image Pixel attributes: pydicom's decoder reports them
        return
    got = len(ds.PixelData)
    if got < expected:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        raise InputError(
            f"DICOM pixel data is truncated: expected {expected} bytes ({frames} frame(s) of "
            f"{int(ds.Columns)}x{int(ds.Rows)} at {int(ds.BitsAllocated)} bits allocated, "
            f"{int(ds.get('SamplesPerPixel', 1))} sample(s) per pixel), got {got}; the file "
            "is incomplete or corrupt: send the whole file"
        )


def decode_pixel_data(ds: Dataset, frame: int = 0) -> np.ndarray:
    """Decode one frame (pydicom converts YBR to RGB). InputError says which of three things
    is wrong: pydicom has no decoder for the transfer syntax at all; it has one but none of its
    plugins is installed (the only case where installing something helps, named); or the
    installed plugins failed on this file (corrupt, cut short, an odd variant)."""
    from pydicom.pixels import get_decoder

    register_gdcm_12bit()
    ts = _transfer_syntax(ds)
    plugins: tuple[str, ...] = ()
    if ts is not None:
        try:
            decoder = get_decoder(ts)
        except NotImplementedError:
            raise InputError(
                f"DICOM pixel data could not be decoded: transfer syntax {_syntax_name(ts)}; "
                "no installed pixel data handler supports it (pydicom has no decoder for it): "
                "decode the file elsewhere and send pixels"
            ) from None
        if not decoder.is_available:
            raise InputError(_not_installed(ts, decoder.missing_dependencies))
        plugins = tuple(decoder.available_plugins)
    try:
        return _decode_frame(ds, frame, _preferred_plugin(ds, ts, plugins))
    except Exception as exc:
        used = f" ({', '.join(plugins)})" if plugins else ""
        raise InputError(
            f"DICOM pixel data could not be decoded: transfer syntax {_syntax_name(ts)}; the "
            f"installed pixel data handlers{used} failed on it ({type(exc).__name__}): the file "
            "may be corrupt or truncated; check that it opens in a DICOM viewer, or decode it "
            "elsewhere and send pixels"
        ) from None


def _preferred_plugin(ds: Dataset, ts: UID | None, plugins: tuple[str, ...]) -> str:
    """GDCM first for 12-bit monochrome JPEG Extended: pydicom's plugins would each fail (and
    log an ERROR with a traceback) before reaching it. "" = pydicom's own order."""
    twelve_bit = int(ds.get("BitsStored", 8) or 8) > 8 and int(ds.get("SamplesPerPixel", 1)) == 1
    if ts == JPEG_EXTENDED_12BIT and twelve_bit and _GDCM_12BIT in plugins:
        return _GDCM_12BIT
    return ""


def _decode_frame(ds: Dataset, frame: int, plugin: str) -> np.ndarray:
    from pydicom.pixels import pixel_array

    if plugin:
        try:
            return pixel_array(ds, index=frame, decoding_plugin=plugin)
        except Exception:  # noqa: BLE001 - the other installed plugins may still read it
            pass
    return pixel_array(ds, index=frame)


def _not_installed(ts: UID, missing: list[str]) -> str:
    needs = "; ".join(missing) or "a pydicom decoder plugin"
    return (
        f"DICOM pixel data could not be decoded: transfer syntax {_syntax_name(ts)}; no installed "
        f"pixel data handler supports it (needs one of: {needs}); install one (the client: "
        "pip install 'medpclip-client[dicom]'), or decode the file elsewhere and send pixels"
    )


def register_gdcm_12bit() -> bool:
    """Add GDCM as a decoder of 12-bit JPEG Extended (process 2/4) to pydicom (after its own
    plugins; `decode_pixel_data` asks for it first on 12-bit data). True when it is available
    (GDCM installed).

    pydicom's `gdcm` plugin refuses 12-bit precision and pylibjpeg/Pillow cannot read it either
    (nor non-conformant streams such as pydicom's JPEG-lossy.dcm), while GDCM decodes it with its
    12-bit IJG codec. Idempotent and thread-safe (pydicom's `add_plugin` is neither)."""
    from pydicom.pixels import get_decoder

    decoder = get_decoder(JPEG_EXTENDED_12BIT)
    with _registry_lock:
        # missing_dependencies reads "<label> - requires ..." for unavailable plugins
        unavailable = {m.split(" - ")[0] for m in decoder.missing_dependencies}
        if _GDCM_12BIT not in {*decoder.available_plugins, *unavailable}:
            decoder.add_plugin(_GDCM_12BIT, (__name__, "decode_gdcm_12bit_frame"))
    return _GDCM_12BIT in decoder.available_plugins


# pydicom's decoder-plugin interface (`Decoder.add_plugin` looks these names up in this module)
DECODER_DEPENDENCIES = {JPEG_EXTENDED_12BIT: ("python-gdcm>=3.0.10",)}


def is_available(uid: str) -> bool:
    """pydicom plugin interface: can `decode_gdcm_12bit_frame` decode `uid` here?"""
    if uid != JPEG_EXTENDED_12BIT:
        return False
    try:
        import gdcm  # noqa: F401
    except ImportError:
        return False
    return True


def decode_gdcm_12bit_frame(src: bytes, runner: DecodeRunner) -> bytes:
    """pydicom decoder plugin: one frame of 12-bit monochrome JPEG Extended through GDCM (as
    pydicom's gdcm plugin does for other syntaxes, without its 8-bit-only rule). 8-bit and
    colour data stay with pydicom's own plugins."""
    import gdcm

    if runner.bits_stored <= 8 or runner.samples_per_pixel != 1:
        raise NotImplementedError("only 12-bit monochrome JPEG Extended is decoded here")
    fragment = gdcm.Fragment()
    fragment.SetByteStringValue(src)
    fragments = gdcm.SequenceOfFragments.New()
    fragments.AddFragment(fragment)
    elem = gdcm.DataElement(gdcm.Tag(0x7FE0, 0x0010))
    elem.SetValue(fragments.__ref__())
    img = gdcm.Image()
    img.SetNumberOfDimensions(2)
    img.SetDimensions((runner.columns, runner.rows, 1))
    img.SetDataElement(elem)
    pi = gdcm.PhotometricInterpretation.GetPIType(str(runner.photometric_interpretation))
    img.SetPhotometricInterpretation(gdcm.PhotometricInterpretation(pi))
    img.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.GetTSType(JPEG_EXTENDED_12BIT)))
    bits = runner.bits_stored
    img.SetPixelFormat(
        gdcm.PixelFormat(1, runner.bits_allocated, bits, bits - 1, runner.pixel_representation)
    )
    buffer = img.GetBuffer()  # None when GDCM cannot decode the stream
    if buffer is None:
        raise ValueError("GDCM could not decode the JPEG stream")
    # GDCM's SWIG binding returns char* as str: re-encode the raw bytes
    frame = buffer.encode("utf-8", "surrogateescape")
    expected = runner.frame_length(unit="bytes")
    if len(frame) != expected:
        raise ValueError(f"GDCM returned {len(frame)} bytes for a {expected}-byte frame")
    return frame


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
                # no values in the message: an error never echoes request data
                "PIXELS has values outside [0, 255]; pass WINDOW (centre, width) for raw "
                "intensities such as Hounsfield units, or scale the pixels to 0-255"
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
