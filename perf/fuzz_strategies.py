"""Malformed requests for the three ensembles, as hypothesis strategies (one per validation path).

Shared by the CI property test (`tests/test_fuzz.py`, a few cases per path) and the big run
(`perf/fuzz.py --cases 10000`), so both send exactly the same kinds of bad input.

Every strategy builds a request that is valid except for one fault, and the fault is invalid by
the declared contract (`medpclip_core.tensors`, the README's limits, and what
`medpclip_core.inputs.prepare` validates), never a borderline value that may be legal: a
point exactly on the image's border, a box edge on it, -0.0. Where a generator cannot know for
sure (corrupted PNG/DICOM bytes, random bytes), its candidates are kept only if the shared decoder
(`medpclip_core.imaging.decode_image`, the server's own code) refuses them locally.

The property (`problems`): the answer is exactly INVALID_ARGUMENT (never OK, INTERNAL, UNKNOWN,
UNAVAILABLE, or a missed deadline), and the message does not echo request data (label text,
pixel values, DICOM patient tags). Tensors are sent raw with `tritonclient.grpc`, so wrong
datatypes and unknown input names reach the server as any client could send them.
"""

from __future__ import annotations

import io
import re
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
from hypothesis import assume
from hypothesis import strategies as st
from tritonclient.utils import InferenceServerException

from medpclip_core import imaging
from medpclip_core import tensors as T

IMAGE_MODELS = ("medp_clip", "medp_clip_image")
LABEL_MODELS = ("medp_clip", "medp_clip_text")
ENSEMBLES = ("medp_clip", "medp_clip_image", "medp_clip_text")

# Every wire datatype Triton 2.51 accepts (BF16 travels as float32 numpy, like tritonclient does).
WIRE_NUMPY: dict[str, type] = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
    "BF16": np.float32,
    "BYTES": np.object_,
}
# Labels that stay valid under every shipped model (a few WordPiece tokens each): a random
# "valid" label could itself exceed a small context length and make a case fail twice.
GOOD_LABELS = ("a nodule", "a cyst", "a mass", "a calcification", "normal lung", "fat")
# The largest text context of the shipped configs (`base`): an over-context label longer than
# this is over every model's context when the server's own value cannot be read.
LARGEST_CONTEXT = 256
SMALL_SIDE = 48  # base images up to 48 x 48: decode and letterbox cost next to nothing
UID = "1.2.826.0.1.3680043.10.1311"  # fixed UIDs: the same draw gives the same bytes


# Server bugs the fuzzing found that nobody has fixed yet, by (ensemble, path): the test keeps
# them as strict xfails (the case documents the bug; the fix turns it into an XPASS failure that
# says to remove the entry) and perf/fuzz.py reports them apart from new problems.
KNOWN_BUGS: dict[tuple[str, str], str] = {}


# --- requests -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Raw:
    """One input tensor exactly as it goes on the wire (any name, any datatype)."""

    name: str
    datatype: str
    array: np.ndarray

    def infer_input(self) -> grpcclient.InferInput:
        inp = grpcclient.InferInput(self.name, list(self.array.shape), self.datatype)
        inp.set_data_from_numpy(self.array)
        return inp

    def describe(self) -> str:
        small = self.array.size <= 8 and self.datatype != "BYTES"
        values = f"={self.array.tolist()}" if small else ""
        return f"{self.name}:{self.datatype}{list(self.array.shape)}{values}"


@dataclass(frozen=True)
class Case:
    """A malformed request: which ensemble, which validation path, the tensors, and the strings
    (label text, pixel values, patient tags) its error message must not contain."""

    model: str
    path: str
    tensors: tuple[Raw, ...]
    secrets: tuple[str, ...] = ()

    def __repr__(self) -> str:  # short: hypothesis prints it for a failing example
        return f"Case({self.model}, {self.path}, {[t.describe() for t in self.tensors]})"

    def _repr_pretty_(self, p, cycle: bool) -> None:  # hypothesis' printer uses this hook
        p.text(repr(self))


@dataclass
class Draft:
    """A valid request under construction; each path then applies exactly one fault."""

    model: str
    height: int = 0
    width: int = 0
    tensors: dict[str, Raw] = field(default_factory=dict)
    secrets: list[str] = field(default_factory=list)

    def put(self, name: str, array: np.ndarray, datatype: str | None = None) -> Draft:
        """Set an input; its datatype is the declared one unless given (wrong on purpose)."""
        wire = datatype or T.spec(self.model).input(name).wire_type
        self.tensors[name] = Raw(name, wire, np.asarray(array))
        return self

    def drop(self, *names: str) -> Draft:
        for name in names:
            self.tensors.pop(name, None)
        return self

    def case(self, path: str) -> Case:
        return Case(self.model, path, tuple(self.tensors.values()), tuple(self.secrets))


@dataclass(frozen=True)
class Limits:
    """The limits the server enforces (defaults: the declaration and the largest shipped model)."""

    max_labels: int = T.MAX_LABELS
    max_points: int = T.MAX_POINTS
    max_side: int = T.MAX_IMAGE_SIDE
    max_label_chars: int = T.MAX_LABEL_CHARS
    context_length: int = LARGEST_CONTEXT

    @classmethod
    def from_repository(cls, repository: Path | str) -> Limits:
        """Read the served values from the generated `config.pbtxt` files of a repository."""
        params = {}
        for model in ("preprocess", "tokenizer"):
            text = (Path(repository) / model / "config.pbtxt").read_text()
            pairs = re.findall(r'key:\s*"(\w+)"\s*value\s*\{\s*string_value:\s*"([^"]*)"', text)
            params.update(pairs)
        return cls(
            max_labels=int(params.get("max_labels", T.MAX_LABELS)),
            max_side=int(params.get("max_image_side", T.MAX_IMAGE_SIDE)),
            context_length=int(params.get("context_length", LARGEST_CONTEXT)),
        )


# --- sending and the property ---------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    status: str  # "OK" or the gRPC status name, e.g. "INVALID_ARGUMENT"
    message: str


def send(client: grpcclient.InferenceServerClient, case: Case, timeout_s: float = 30.0) -> Outcome:
    """Send the case once; a hang shows up as DEADLINE_EXCEEDED after `timeout_s`."""
    try:
        client.infer(case.model, [t.infer_input() for t in case.tensors], client_timeout=timeout_s)
    except InferenceServerException as exc:
        status = str(exc.status() or "UNKNOWN").removeprefix("StatusCode.")
        return Outcome(status, exc.message() or "")
    return Outcome("OK", "")


def problems(case: Case, outcome: Outcome) -> list[str]:
    """What is wrong with the server's answer to a malformed request (empty: nothing)."""
    found = []
    if outcome.status != "INVALID_ARGUMENT":
        found.append(f"status {outcome.status} (want INVALID_ARGUMENT): {outcome.message[:300]}")
    elif not outcome.message.strip():
        found.append("INVALID_ARGUMENT without a message saying what to fix")
    echoed = [s for s in case.secrets if s and s in outcome.message]
    if echoed:
        found.append(f"message echoes request data {echoed[:3]}: {outcome.message[:300]}")
    return found


# --- encoders -------------------------------------------------------------------------------------


def _gray(height: int, width: int, seed: int) -> np.ndarray:
    """A deterministic grey noise image (uint8 [H, W]): the same seed, the same bytes."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (height, width), dtype=np.uint8)


def png_bytes(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def dicom_bytes(array: np.ndarray, patient: str, mutate: Callable | None = None) -> bytes:
    """A CT Image Storage Part 10 file of `array` (stored uint16, slope 1, intercept -1024);
    `mutate(ds)` may break it before writing. `patient` is the secret the server must not echo."""
    from pydicom import Dataset
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = UID + ".1"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, UID + ".1"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = UID + ".2", UID + ".3"
    ds.Modality, ds.PatientName, ds.PatientID = "CT", f"FUZZ^{patient}", patient
    ds.Rows, ds.Columns = array.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.WindowCenter, ds.WindowWidth = 40, 400
    # OW stated explicitly: a mutation may remove BitsAllocated, which pydicom needs otherwise
    ds.add_new(0x7FE00010, "OW", (array.astype(np.uint16) * 8).tobytes())
    if mutate is not None:
        mutate(ds)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def undecodable(data: bytes, max_side: int = T.MAX_IMAGE_SIDE) -> bool:
    """True when the server's own decoder refuses these bytes (anything but a decoded image:
    an unexpected exception counts too, so that the server gets to show how it handles it)."""
    import warnings

    try:
        with warnings.catch_warnings():  # pydicom warns about every broken element
            warnings.simplefilter("ignore")
            imaging.decode_image(data, None, max_side)
    except Exception:
        return True
    return False


def object_array(items: list[bytes]) -> np.ndarray:
    """A BYTES tensor (numpy would turn a list of bytes into a fixed-width `S` array)."""
    out = np.empty(len(items), dtype=object)
    out[:] = items
    return out


# --- valid building blocks ----------------------------------------------------------------------

_seeds = st.integers(0, 2**32 - 1)
_markers = st.text(string.ascii_lowercase, min_size=10, max_size=14).map(lambda s: "zq" + s)


def _inside(limit: int) -> st.SearchStrategy[float]:
    """A coordinate strictly inside [0, limit) that float32 keeps as is."""
    return st.floats(0, limit, exclude_max=True, width=32)


def _negative() -> st.SearchStrategy[float]:
    # `< 0` also drops -0.0, which compares equal to 0 and is inside
    return st.floats(max_value=0, exclude_max=True, width=32, allow_infinity=False).filter(
        lambda v: v < 0
    )


def _beyond(limit: int) -> st.SearchStrategy[float]:
    """Strictly beyond `limit` (a point or box edge exactly on the border may be legal)."""
    return st.floats(min_value=limit, exclude_min=True, width=32, allow_infinity=False)


_nonfinite = st.sampled_from([float("nan"), float("inf"), float("-inf")])


def _pixels(height: int, width: int, channels: int, seed: int) -> np.ndarray:
    """Display intensities in [0, 255] with fractional parts (distinctive when echoed)."""
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 255, (height, width, channels)).astype(np.float32)


def _pixel_secrets(a: np.ndarray) -> list[str]:
    """Pixel values as the server would print them (`:g`); short ones could match by chance."""
    finite = a[np.isfinite(a)]
    if finite.size == 0:
        return []
    values = {f"{v:g}" for v in (finite.min(), finite.max(), finite.reshape(-1)[0])}
    return sorted(s for s in values if len(s) >= 4)


@st.composite
def _image(draw, d: Draft, kinds: tuple[str, ...] = ("png", "dicom", "pixels")) -> Draft:
    """A valid image (PNG, DICOM or PIXELS) of a random small size onto the draft."""
    d.height, d.width = draw(st.integers(1, SMALL_SIDE)), draw(st.integers(1, SMALL_SIDE))
    seed, kind = draw(_seeds), draw(st.sampled_from(kinds))
    gray = _gray(d.height, d.width, seed)
    if kind == "png":
        return d.put("IMAGE", object_array([png_bytes(gray)]))
    if kind == "dicom":
        patient = draw(_markers)
        d.secrets.append(patient)
        return d.put("IMAGE", object_array([dicom_bytes(gray, patient)]))
    pixels = _pixels(d.height, d.width, draw(st.sampled_from([1, 3])), seed)
    d.secrets.extend(_pixel_secrets(pixels))
    return d.put("PIXELS", pixels)


@st.composite
def _points(draw, d: Draft, count: st.SearchStrategy[int]) -> np.ndarray:
    n = draw(count)
    xs = draw(st.lists(_inside(d.width), min_size=n, max_size=n))
    ys = draw(st.lists(_inside(d.height), min_size=n, max_size=n))
    return np.array([xs, ys], dtype=np.float32).T.reshape(n, 2)


@st.composite
def _box(draw, d: Draft) -> np.ndarray:
    """x0 < x1 and y0 < y1 inside [0, W] x [0, H] (the far edge may touch the border)."""
    pair = st.lists(st.floats(0, d.width, width=32), min_size=2, max_size=2, unique=True)
    x0, x1 = sorted(draw(pair))
    y0, y1 = sorted(
        draw(st.lists(st.floats(0, d.height, width=32), min_size=2, max_size=2, unique=True))
    )
    return np.array([x0, y0, x1, y1], dtype=np.float32)


@st.composite
def _prompts(draw, d: Draft) -> Draft:
    """Sometimes valid points (with labels), a box, a mask, a window: the fault then hides among
    valid prompts as well as alone."""
    if draw(st.booleans()):
        pts = draw(_points(d, st.integers(1, 3)))
        d.put("POINTS", pts)
        if draw(st.booleans()):
            d.put(
                "POINT_LABELS",
                np.array(
                    draw(st.lists(st.sampled_from([0, 1]), min_size=len(pts), max_size=len(pts))),
                    dtype=np.int32,
                ),
            )
    if draw(st.booleans()):
        d.put("BOX", draw(_box(d)))
    if draw(st.booleans()):
        mask = np.zeros((d.height, d.width), np.uint8)
        mask[draw(st.integers(0, d.height - 1)), draw(st.integers(0, d.width - 1))] = 1
        d.put("MASK", mask)
    if draw(st.booleans()):
        centre = draw(st.floats(-1000, 1000, width=32))
        d.put("WINDOW", np.array([centre, draw(st.floats(1, 4000, width=32))], np.float32))
    return d


def _good_labels() -> st.SearchStrategy[list[str]]:
    return st.lists(st.sampled_from(GOOD_LABELS), min_size=1, max_size=4)


@st.composite
def _valid(draw, model: str, image: bool = True, prompts: bool = True) -> Draft:
    """A valid request for `model`; `image=False` leaves IMAGE/PIXELS out for the fault."""
    d = Draft(model)
    if model in IMAGE_MODELS and image:
        draw(_image(d))
        if prompts:
            draw(_prompts(d))
    elif model in IMAGE_MODELS:
        d.height, d.width = draw(st.integers(1, SMALL_SIDE)), draw(st.integers(1, SMALL_SIDE))
    if model in LABEL_MODELS:
        d.put("LABELS", object_array([s.encode() for s in draw(_good_labels())]))
    return d


# --- validation paths -----------------------------------------------------------------------------


@dataclass(frozen=True)
class PathSpec:
    name: str
    models: tuple[str, ...]
    strategy: Callable[[str, Limits], st.SearchStrategy[Case]]
    doc: str


PATHS: dict[str, PathSpec] = {}


def _path(name: str, models: tuple[str, ...], doc: str):
    """Register `fn(draw, model, limits) -> Case` as the strategy of one validation path."""

    def register(fn):
        PATHS[name] = PathSpec(name, models, st.composite(fn), doc)
        return fn

    return register


def targets() -> list[tuple[str, str]]:
    """Every (ensemble, validation path) pair to fuzz."""
    return [(m, p.name) for p in PATHS.values() for m in ENSEMBLES if m in p.models]


def cases(model: str, path: str, limits: Limits | None = None) -> st.SearchStrategy[Case]:
    return PATHS[path].strategy(model, limits or Limits())


# image: which one, and its bytes


@_path("image_empty", IMAGE_MODELS, "IMAGE holding zero bytes")
def _image_empty(draw, model, limits):
    return draw(_valid(model, image=False)).put("IMAGE", object_array([b""])).case("image_empty")


@_path("image_and_pixels", IMAGE_MODELS, "both IMAGE and PIXELS")
def _image_and_pixels(draw, model, limits):
    d = draw(_valid(model, image=False))
    gray = _gray(d.height, d.width, draw(_seeds))
    d.put("IMAGE", object_array([png_bytes(gray)])).put(
        "PIXELS", gray[..., None].astype(np.float32)
    )
    return d.case("image_and_pixels")


@_path("image_missing", IMAGE_MODELS, "neither IMAGE nor PIXELS (prompts only)")
def _image_missing(draw, model, limits):
    d = draw(_valid(model))
    return d.drop("IMAGE", "PIXELS").case("image_missing")


@_path("image_shape", IMAGE_MODELS, "IMAGE holding 0 or several files")
def _image_shape(draw, model, limits):
    d = draw(_valid(model, image=False))
    n = draw(st.sampled_from([0, 2, 3, 5]))
    files = [png_bytes(_gray(d.height, d.width, i)) for i in range(n)]
    return d.put("IMAGE", object_array(files)).case("image_shape")


_MAGICS = (b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"\0" * 128 + b"DICM", b"GIF89a", b"BM")


@_path("image_random_bytes", IMAGE_MODELS, "random bytes, bare or behind an image format's magic")
def _image_random_bytes(draw, model, limits):
    d = draw(_valid(model, image=False))
    data = draw(st.sampled_from(_MAGICS)) + draw(st.binary(min_size=1, max_size=600))
    assume(undecodable(data, limits.max_side))  # else some valid image: not malformed
    return d.put("IMAGE", object_array([data])).case("image_random_bytes")


def _bytes_case(draw, model, limits, path: str, make: Callable) -> Case:
    """A draft with IMAGE = make(draw, draft), kept only if the decoder refuses it."""
    d = draw(_valid(model, image=False))
    data = make(draw, d)
    assume(undecodable(data, limits.max_side))
    return d.put("IMAGE", object_array([data])).case(path)


def _png(draw, d: Draft) -> bytes:
    return png_bytes(_gray(d.height, d.width, draw(_seeds)))


@_path("png_truncated", IMAGE_MODELS, "a valid PNG cut short")
def _png_truncated(draw, model, limits):
    def make(draw, d):
        data = _png(draw, d)
        return data[: draw(st.integers(1, len(data) - 1))]

    return _bytes_case(draw, model, limits, "png_truncated", make)


@_path("png_corrupted", IMAGE_MODELS, "a valid PNG with bytes overwritten after its signature")
def _png_corrupted(draw, model, limits):
    def make(draw, d):
        data = bytearray(_png(draw, d))
        for _ in range(draw(st.integers(1, 8))):
            data[draw(st.integers(8, len(data) - 1))] = draw(st.integers(0, 255))
        return bytes(data)

    return _bytes_case(draw, model, limits, "png_corrupted", make)


def _dicom(draw, d: Draft, mutate: Callable | None = None) -> bytes:
    patient = draw(_markers)
    d.secrets.append(patient)
    return dicom_bytes(_gray(d.height, d.width, draw(_seeds)), patient, mutate)


@_path("dicom_truncated", IMAGE_MODELS, "a valid DICOM file cut short")
def _dicom_truncated(draw, model, limits):
    def make(draw, d):
        data = _dicom(draw, d)
        return data[: draw(st.integers(1, len(data) - 1))]

    return _bytes_case(draw, model, limits, "dicom_truncated", make)


def _set(**attrs) -> Callable:
    def mutate(ds) -> None:
        for key, value in attrs.items():
            if value is None:
                delattr(ds, key)
            else:
                setattr(ds, key, value)

    return mutate


def _short_pixels(ds) -> None:
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]


# Broken DICOM, one path each (they reach different decoding code): attributes that contradict
# the pixel data or are missing, a data set that is not DICOM, a transfer syntax that lies.
_DICOM_DEFECTS: dict[str, Callable] = {
    "pixel_data_short": _short_pixels,
    "rows_zero": _set(Rows=0),
    "size_lies": lambda ds: _set(Rows=ds.Rows * 3 + 1, Columns=ds.Columns + 2)(ds),
    "bits_allocated": _set(BitsAllocated=3),
    "bits_allocated_missing": _set(BitsAllocated=None),
    "bits_stored_over_allocated": _set(BitsStored=20, HighBit=19),
    "samples_per_pixel": _set(SamplesPerPixel=2),
    "palette_without_lut": _set(PhotometricInterpretation="PALETTE COLOR"),
    "photometric_unknown": _set(PhotometricInterpretation="NO_SUCH_COLOURS"),
    "photometric_missing": _set(PhotometricInterpretation=None),
    "pixel_representation": _set(PixelRepresentation=5),
    "frames_lie": _set(NumberOfFrames=4),
    "no_pixel_data": _set(PixelData=None),
    "file_window_width_zero": _set(WindowWidth=0),
}
# Same-length transfer syntax swaps (the meta header stays consistent; the data set does not).
_SYNTAX_SWAPS = (b"1.2.840.10008.1.2.5", b"1.2.840.10008.1.2.2")


def _register_dicom_defect(defect: str, mutate: Callable) -> None:
    def make(draw, d):
        return _dicom(draw, d, mutate)

    def build(draw, model, limits):
        return _bytes_case(draw, model, limits, f"dicom_{defect}", make)

    _path(f"dicom_{defect}", IMAGE_MODELS, f"DICOM: {defect.replace('_', ' ')}")(build)


for _defect, _mutate in _DICOM_DEFECTS.items():
    _register_dicom_defect(_defect, _mutate)


@_path("dicom_garbage_data_set", IMAGE_MODELS, "DICOM preamble and magic, then random bytes")
def _dicom_garbage(draw, model, limits):
    def make(draw, d):
        return b"\0" * 128 + b"DICM" + draw(st.binary(min_size=1, max_size=400))

    return _bytes_case(draw, model, limits, "dicom_garbage_data_set", make)


@_path("dicom_transfer_syntax", IMAGE_MODELS, "DICOM whose transfer syntax does not match")
def _dicom_transfer_syntax(draw, model, limits):
    def make(draw, d):
        swap = draw(st.sampled_from(_SYNTAX_SWAPS))
        return _dicom(draw, d).replace(b"1.2.840.10008.1.2.1", swap, 1)

    return _bytes_case(draw, model, limits, "dicom_transfer_syntax", make)


def _too_large(draw, limits) -> tuple[int, int]:
    big = draw(st.integers(limits.max_side + 1, 2 * limits.max_side))
    small = draw(st.integers(1, 3))
    return (big, small) if draw(st.booleans()) else (small, big)


@_path("image_too_large", IMAGE_MODELS, "a side over max_image_side in a PNG or DICOM header")
def _image_too_large(draw, model, limits):
    d = draw(_valid(model, image=False))
    h, w = _too_large(draw, limits)
    if draw(st.booleans()):
        from PIL import Image

        buf = io.BytesIO()
        Image.new("1", (w, h)).save(buf, format="PNG")  # 1-bit: a few hundred bytes
        d.put("IMAGE", object_array([buf.getvalue()]))
    else:  # the header says big; the pixel data need not be there (refused before decoding)
        gray = np.zeros((1, 1), np.uint8)
        d.put("IMAGE", object_array([dicom_bytes(gray, "BIG", _set(Rows=h, Columns=w))]))
    return d.case("image_too_large")


@_path("pixels_too_large", IMAGE_MODELS, "PIXELS with a side over max_image_side")
def _pixels_too_large(draw, model, limits):
    d = draw(_valid(model, image=False))
    h, w = _too_large(draw, limits)
    return d.put("PIXELS", np.zeros((h, w, draw(st.sampled_from([1, 3]))), np.float32)).case(
        "pixels_too_large"
    )


# PIXELS and WINDOW


@_path("pixels_shape", IMAGE_MODELS, "PIXELS with 0, 2 or 4+ channels, or not 3-D")
def _pixels_shape(draw, model, limits):
    d = draw(_valid(model, image=False))
    h, w = d.height, d.width
    shape = draw(
        st.sampled_from(
            [
                (h, w, 0),
                (h, w, 2),
                (h, w, 4),
                (h, w, 7),
                (h, w),
                (h * w,),
                (h, w, 3, 1),
                (1, h, w, 3),
            ]
        )
    )
    pixels = np.full(shape, 100.25, np.float32)
    return d.put("PIXELS", pixels).case("pixels_shape")


@_path("pixels_empty", IMAGE_MODELS, "PIXELS with zero rows or columns")
def _pixels_empty(draw, model, limits):
    d = draw(_valid(model, image=False))
    channels = draw(st.sampled_from([1, 3]))
    shape = draw(
        st.sampled_from([(0, d.width, channels), (d.height, 0, channels), (0, 0, channels)])
    )
    return d.put("PIXELS", np.zeros(shape, np.float32)).case("pixels_empty")


@_path("pixels_nonfinite", IMAGE_MODELS, "PIXELS with NaN or infinite values")
def _pixels_nonfinite(draw, model, limits):
    d = draw(_valid(model, image=False))
    pixels = _pixels(d.height, d.width, draw(st.sampled_from([1, 3])), draw(_seeds))
    flat = pixels.reshape(-1)
    for _ in range(draw(st.integers(1, 3))):
        flat[draw(st.integers(0, flat.size - 1))] = draw(_nonfinite)
    if draw(st.booleans()):  # a window does not excuse NaN
        d.put("WINDOW", np.array([40, 400], np.float32))
    d.secrets.extend(_pixel_secrets(pixels))
    return d.put("PIXELS", pixels).case("pixels_nonfinite")


@_path("pixels_range", IMAGE_MODELS, "PIXELS outside [0, 255] without a WINDOW")
def _pixels_range(draw, model, limits):
    d = draw(_valid(model, image=False))
    pixels = _pixels(d.height, d.width, draw(st.sampled_from([1, 3])), draw(_seeds))
    flat = pixels.reshape(-1)
    # k + 0.5: exact in float32 and printed as is by `:g`, so an echo is recognisable
    out = st.one_of(st.integers(256, 99_998), st.integers(-99_999, -1)).map(lambda k: k + 0.5)
    for _ in range(draw(st.integers(1, 3))):
        flat[draw(st.integers(0, flat.size - 1))] = draw(out)
    d.secrets.extend(_pixel_secrets(pixels))
    return d.drop("WINDOW").put("PIXELS", pixels).case("pixels_range")


@_path("window_bad", IMAGE_MODELS, "WINDOW width < 1, or a NaN/infinite centre or width")
def _window_bad(draw, model, limits):
    d = draw(_valid(model))
    centre, width = draw(st.floats(-1000, 1000, width=32)), draw(st.floats(1, 4000, width=32))
    fault = draw(st.sampled_from(["narrow", "centre", "width"]))
    if fault == "narrow":
        width = draw(st.floats(max_value=1, exclude_max=True, width=32, allow_nan=False))
    elif fault == "centre":
        centre = draw(_nonfinite)
    else:
        width = draw(_nonfinite)
    return d.put("WINDOW", np.array([centre, width], np.float32)).case("window_bad")


@_path("window_shape", IMAGE_MODELS, "WINDOW with other than 2 values")
def _window_shape(draw, model, limits):
    d = draw(_valid(model))
    n = draw(st.sampled_from([0, 1, 3, 4]))
    return d.put("WINDOW", np.full(n, 100.0, np.float32)).case("window_shape")


# points


@_path("points_too_many", IMAGE_MODELS, "more than 16 points (all inside the image)")
def _points_too_many(draw, model, limits):
    d = draw(_valid(model))
    pts = draw(_points(d, st.integers(limits.max_points + 1, 4 * limits.max_points)))
    return d.drop("POINT_LABELS").put("POINTS", pts).case("points_too_many")


@_path("points_nonfinite", IMAGE_MODELS, "a NaN or infinite point coordinate")
def _points_nonfinite(draw, model, limits):
    d = draw(_valid(model))
    pts = draw(_points(d, st.integers(1, limits.max_points)))
    for _ in range(draw(st.integers(1, 3))):
        pts[draw(st.integers(0, len(pts) - 1)), draw(st.integers(0, 1))] = draw(_nonfinite)
    return d.drop("POINT_LABELS").put("POINTS", pts).case("points_nonfinite")


@_path("points_outside", IMAGE_MODELS, "a point left/above of 0 or right/below of the image")
def _points_outside(draw, model, limits):
    d = draw(_valid(model))
    pts = draw(_points(d, st.integers(1, limits.max_points)))
    i, axis = draw(st.integers(0, len(pts) - 1)), draw(st.integers(0, 1))
    side = d.width if axis == 0 else d.height
    pts[i, axis] = draw(st.one_of(_negative(), _beyond(side)))
    return d.drop("POINT_LABELS").put("POINTS", pts).case("points_outside")


@_path("points_shape", IMAGE_MODELS, "POINTS not N x 2")
def _points_shape(draw, model, limits):
    d = draw(_valid(model))
    n = draw(st.integers(1, 4))
    shape = draw(st.sampled_from([(n, 1), (n, 3), (n, 0), (2,), (n, 2, 1)]))
    return d.drop("POINT_LABELS").put("POINTS", np.zeros(shape, np.float32)).case("points_shape")


def _point_labels(draw, model, limits, fault: str) -> Case:
    d = draw(_valid(model))
    pts = draw(_points(d, st.integers(1, limits.max_points)))
    labels = np.ones(len(pts), np.int32)
    if fault == "value":
        bad = st.integers(-(2**31), 2**31 - 1).filter(lambda v: v not in (0, 1))
        labels[draw(st.integers(0, len(pts) - 1))] = draw(bad)
    elif fault == "count":
        n = draw(st.integers(1, limits.max_points + 2).filter(lambda k: k != len(pts)))
        labels = np.ones(n, np.int32)
    d.put("POINTS", pts).put("POINT_LABELS", labels)
    if fault == "alone":
        d.drop("POINTS")
    return d.case(f"point_labels_{fault}")


@_path("point_labels_value", IMAGE_MODELS, "a POINT_LABELS value other than 0 or 1")
def _point_labels_value(draw, model, limits):
    return _point_labels(draw, model, limits, "value")


@_path("point_labels_count", IMAGE_MODELS, "POINT_LABELS of another count than POINTS")
def _point_labels_count(draw, model, limits):
    return _point_labels(draw, model, limits, "count")


@_path("point_labels_alone", IMAGE_MODELS, "POINT_LABELS without POINTS")
def _point_labels_alone(draw, model, limits):
    return _point_labels(draw, model, limits, "alone")


# box


@_path("box_nonfinite", IMAGE_MODELS, "a NaN or infinite box coordinate")
def _box_nonfinite(draw, model, limits):
    d = draw(_valid(model))
    box = draw(_box(d))
    for i in draw(st.lists(st.integers(0, 3), min_size=1, max_size=4, unique=True)):
        box[i] = draw(_nonfinite)
    return d.put("BOX", box).case("box_nonfinite")


@_path("box_inverted", IMAGE_MODELS, "x1 <= x0 or y1 <= y0 (inside the image)")
def _box_inverted(draw, model, limits):
    d = draw(_valid(model))
    x0, y0, x1, y1 = (float(v) for v in draw(_box(d)))
    axes = draw(st.sampled_from(["x", "y", "xy"]))
    if "x" in axes:
        x0, x1 = (x1, x1) if draw(st.booleans()) else (x1, x0)  # empty or inverted
    if "y" in axes:
        y0, y1 = (y1, y1) if draw(st.booleans()) else (y1, y0)
    return d.put("BOX", np.array([x0, y0, x1, y1], np.float32)).case("box_inverted")


@_path("box_outside", IMAGE_MODELS, "an ordered box reaching beyond the image")
def _box_outside(draw, model, limits):
    d = draw(_valid(model))
    box = draw(_box(d))
    edge = draw(st.integers(0, 3))
    box[edge] = draw(_negative() if edge < 2 else _beyond(d.width if edge == 2 else d.height))
    return d.put("BOX", box).case("box_outside")


@_path("box_shape", IMAGE_MODELS, "BOX with other than 4 values")
def _box_shape(draw, model, limits):
    d = draw(_valid(model))
    n = draw(st.sampled_from([0, 1, 2, 3, 5, 8]))
    return d.put("BOX", np.zeros(n, np.float32)).case("box_shape")


# mask


@_path("mask_empty", IMAGE_MODELS, "MASK of the image's size with no nonzero pixel")
def _mask_empty(draw, model, limits):
    d = draw(_valid(model))
    return d.put("MASK", np.zeros((d.height, d.width), np.uint8)).case("mask_empty")


@_path("mask_wrong_size", IMAGE_MODELS, "MASK of another size (transposed too), or not 2-D")
def _mask_wrong_size(draw, model, limits):
    d = draw(_valid(model))
    sizes = st.tuples(st.integers(1, 2 * SMALL_SIDE), st.integers(1, 2 * SMALL_SIDE))
    other = sizes.filter(lambda s: s != (d.height, d.width))
    shape = draw(
        st.one_of(
            other,
            st.just((d.width, d.height)).filter(lambda s: s[0] != s[1]),
            st.sampled_from([(d.height * d.width,), (d.height, d.width, 1)]),
        )
    )
    return d.put("MASK", np.ones(shape, np.uint8)).case("mask_wrong_size")


# labels


def _labels(d: Draft, items: list[bytes]) -> Draft:
    return d.put("LABELS", object_array(items))


_INVALID_UTF8 = (b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"\x80", b"\xe2\x82", b"\xf8\x88\x80\x80")


@_path("labels_non_utf8", LABEL_MODELS, "a label that is not UTF-8")
def _labels_non_utf8(draw, model, limits):
    d = draw(_valid(model))
    marker = draw(_markers)
    d.secrets.append(marker)
    bad = (
        marker.encode()[: draw(st.integers(0, len(marker)))]
        + draw(st.sampled_from(_INVALID_UTF8))
        + marker.encode()
    )
    items = [s.encode() for s in draw(_good_labels())]
    items.insert(draw(st.integers(0, len(items))), bad)
    return _labels(d, items).case("labels_non_utf8")


@_path("labels_too_many_chars", LABEL_MODELS, "a label over 512 characters")
def _labels_too_many_chars(draw, model, limits):
    d = draw(_valid(model))
    marker = draw(_markers)
    d.secrets.append(marker)
    unit = draw(st.sampled_from(["lesion ", "é", "肺", "a"]))
    n = draw(st.integers(limits.max_label_chars + 1, 4 * limits.max_label_chars))
    text = (marker + " " + unit * n)[:n]
    return _labels(d, [text.encode()]).case("labels_too_many_chars")


@_path("labels_over_context", LABEL_MODELS, "a label of more tokens than the text context")
def _labels_over_context(draw, model, limits):
    d = draw(_valid(model))
    marker = draw(_markers)
    d.secrets.append(marker)
    # each punctuation mark is one WordPiece token: >= context tokens in <= 512 characters
    room = limits.max_label_chars - len(marker) - 1
    assume(limits.context_length <= room)  # else no label fits the characters and not the context
    n = draw(st.integers(min(limits.context_length, room), room))
    marks = "".join(draw(st.lists(st.sampled_from("!?.,;:-()"), min_size=n, max_size=n)))
    items = [s.encode() for s in draw(_good_labels())]
    items.insert(draw(st.integers(0, len(items))), f"{marker} {marks}".encode())
    return _labels(d, items).case("labels_over_context")


@_path("labels_blank", LABEL_MODELS, "an empty or whitespace-only label")
def _labels_blank(draw, model, limits):
    d = draw(_valid(model))
    blank = draw(st.text(" \t\n\r\x0b\x0c\xa0\u2003\u3000", max_size=12))
    items = [s.encode() for s in draw(_good_labels())]
    items.insert(draw(st.integers(0, len(items))), blank.encode())
    return _labels(d, items).case("labels_blank")


@_path("labels_empty_list", LABEL_MODELS, "LABELS with no label")
def _labels_empty_list(draw, model, limits):
    return _labels(draw(_valid(model)), []).case("labels_empty_list")


@_path("labels_too_many", LABEL_MODELS, "more than 64 labels")
def _labels_too_many(draw, model, limits):
    d = draw(_valid(model))
    marker = draw(_markers)
    d.secrets.append(marker)
    n = draw(st.integers(limits.max_labels + 1, 4 * limits.max_labels))
    items = [f"{GOOD_LABELS[i % len(GOOD_LABELS)]} {marker}".encode() for i in range(n)]
    return _labels(d, items).case("labels_too_many")


@_path("labels_missing", LABEL_MODELS, "no LABELS at all (they are required)")
def _labels_missing(draw, model, limits):
    return draw(_valid(model)).drop("LABELS").case("labels_missing")


# any input


def _declared_shape(draw, d: Draft, t: T.Tensor) -> tuple[int, ...]:
    """A shape the declaration accepts, from the draft's image size for H and X."""
    sizes = {"H": d.height or 4, "X": d.width or 4}
    return tuple(
        dim
        if isinstance(dim, int) and dim > 0
        else sizes.get(dim, draw(st.integers(1, 3)) if dim != -1 else 1)
        for dim in t.shape
    )


def _array(wire: str, shape: tuple[int, ...]) -> np.ndarray:
    if wire == "BYTES":
        return object_array([b"x"] * int(np.prod(shape, dtype=int))).reshape(shape)
    return np.ones(shape, WIRE_NUMPY[wire])


@_path("wrong_dtype", ENSEMBLES, "a declared input sent with another datatype")
def _wrong_dtype(draw, model, limits):
    d = draw(_valid(model, prompts=False))
    t = draw(st.sampled_from(T.spec(model).inputs))
    wire = draw(st.sampled_from([w for w in WIRE_NUMPY if w != t.wire_type]))
    shape = _declared_shape(draw, d, t)
    return d.put(t.name, _array(wire, shape), datatype=wire).case("wrong_dtype")


_OTHER_NAMES = (
    "image",
    "LABEL",
    "POINT",
    "pixel_values",
    "input_ids",
    "transform",
    "REGION_PROBS",
    "TEXT_EMBEDDINGS",
    "IMAGE ",
    "LABELS\0",
)


@_path("unknown_input", ENSEMBLES, "an input name the ensemble does not declare")
def _unknown_input(draw, model, limits):
    d = draw(_valid(model, prompts=False))
    declared = {t.name for t in T.spec(model).inputs}
    others = {n for m in ENSEMBLES for n in (t.name for t in T.spec(m).inputs)} - declared
    name = draw(
        st.one_of(
            st.sampled_from(sorted(others) + list(_OTHER_NAMES)),
            st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,20}", fullmatch=True),
        ).filter(lambda n: n not in declared)
    )
    wire = draw(st.sampled_from(list(WIRE_NUMPY)))
    shape = tuple(draw(st.lists(st.integers(1, 3), min_size=1, max_size=3)))
    d.tensors[name] = Raw(name, wire, _array(wire, shape))
    return d.case("unknown_input")


# --- the good request, before and after ---------------------------------------------------------


def good_cases() -> list[Case]:
    """One fixed valid request per ensemble (with a point, a box and labels)."""
    gray = np.zeros((40, 60), np.uint8)
    gray[10:25, 20:40] = 200
    labels = object_array([b"a nodule", b"a cyst"])
    image = Draft("medp_clip").put("IMAGE", object_array([png_bytes(gray)]))
    image.put("POINTS", np.array([[30, 17]], np.float32)).put("LABELS", labels)
    region = Draft("medp_clip_image").put("PIXELS", gray[..., None].astype(np.float32))
    region.put("BOX", np.array([18, 8, 42, 27], np.float32))
    text = Draft("medp_clip_text").put("LABELS", labels)
    return [image.case("good"), region.case("good"), text.case("good")]


def answers(client: grpcclient.InferenceServerClient, case: Case) -> dict[str, np.ndarray]:
    """Every output of a good request (raises if the server refuses it)."""
    result = client.infer(case.model, [t.infer_input() for t in case.tensors], client_timeout=60)
    return {t.name: result.as_numpy(t.name) for t in T.spec(case.model).outputs}


def differences(before: dict, after: dict, tol: float = 1e-6) -> list[str]:
    """Outputs that changed (shape, dtype, or values by more than `tol`, absolute or relative).

    Relative too because dynamic batching (with another client's request, or the gateway's
    canary) moves a mask logit of ~15 by an ulp or two (3.8e-6 measured); bit-identical
    elsewhere."""
    changed = []
    for name, old in before.items():
        new = after.get(name)
        if new is None or new.shape != old.shape or new.dtype != old.dtype:
            changed.append(f"{name}: shape/dtype changed")
        elif old.dtype.kind == "f" and not np.allclose(old, new, rtol=tol, atol=tol):
            changed.append(f"{name}: max |diff| {float(np.max(np.abs(old - new))):g}")
        elif old.dtype.kind != "f" and not np.array_equal(old, new):
            changed.append(f"{name}: values changed")
    return changed
