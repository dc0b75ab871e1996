"""Synchronous gRPC client for the MedP-CLIP ensembles served by Triton.

Every request tensor is built from the declarations in `tensors.py` (name, wire dtype, rank), so
the client cannot drift from the server's model configs. Coordinates are pixels of the original
image: x = column, y = row, origin at the top-left corner.

    >>> client = MedPClipClient("127.0.0.1:8001")
    >>> result = client.infer(open("ct.dcm", "rb").read(), Region(box=(40, 60, 180, 200)),
    ...                       labels=["a lung nodule", "a cyst"], window=(-600, 1500))
    >>> result.top(1)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image

from .imaging import InputError
from .tensors import MEDP_CLIP, MEDP_CLIP_IMAGE, MEDP_CLIP_TEXT, ModelSpec, Tensor

__all__ = [
    "InputError",
    "MedPClipClient",
    "MedPClipError",
    "Region",
    "Result",
    "build_inputs",
    "build_outputs",
    "load_mask",
    "save_mask",
]

DEFAULT_URL = "127.0.0.1:8001"
_Client = TypeVar("_Client", bound="MedPClipClient")

STATUS_INVALID_ARGUMENT = "StatusCode.INVALID_ARGUMENT"
# statuses meaning "the service is not there (now)": retrying later may help
STATUS_UNAVAILABLE = (
    "StatusCode.UNAVAILABLE",
    "StatusCode.DEADLINE_EXCEEDED",
    "StatusCode.NOT_FOUND",
)


def _declared(tensors: Sequence[Tensor], name: str, where: str) -> Tensor:
    for t in tensors:
        if t.name == name:
            return t
    raise RuntimeError(f"tensors.py declares no tensor {name!r} in {where}; update the client")


# The roles the client fills, looked up once (at import) in the spec. The image inputs are the
# same tensors in `medp_clip` and `medp_clip_image`; `build_inputs` re-checks per model.
_IN = {
    role: _declared(MEDP_CLIP.inputs, role, MEDP_CLIP.name)
    for role in ("IMAGE", "PIXELS", "WINDOW", "POINTS", "POINT_LABELS", "BOX", "MASK", "LABELS")
}
_OUT = {
    role: _declared(MEDP_CLIP.outputs, role, MEDP_CLIP.name)
    for role in (
        "REGION_PROBS",
        "IMAGE_PROBS",
        "GLOBAL_EMBEDDING",
        "REGION_EMBEDDING",
        "PATCH_FEATURES",
        "REGION_MASK",
        "MASK_LOGITS",
        "IOU",
    )
}
_TEXT_IN = _declared(MEDP_CLIP_TEXT.inputs, "LABELS", MEDP_CLIP_TEXT.name)
_TEXT_OUT = _declared(MEDP_CLIP_TEXT.outputs, "TEXT_EMBEDDINGS", MEDP_CLIP_TEXT.name)


class MedPClipError(Exception):
    """A failed request: `.status` is the gRPC status ("StatusCode.INVALID_ARGUMENT", ...; None
    for a client-side failure) and `.message` the server's message."""

    def __init__(self, message: str, status: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status

    def __str__(self) -> str:
        return f"[{self.status}] {self.message}" if self.status else self.message

    @property
    def invalid_input(self) -> bool:
        """The server rejected the request's content (fix the input, do not retry)."""
        return self.status == STATUS_INVALID_ARGUMENT

    @property
    def unavailable(self) -> bool:
        """The server or model could not be reached, is not loaded, or did not answer in time."""
        return self.status in STATUS_UNAVAILABLE


@dataclass
class Region:
    """A region prompt in original image pixels (x = column, y = row). Any combination of
    points, box and mask may be given; all None means no region prompt."""

    points: list[tuple[float, float]] | None = None
    point_labels: list[int] | None = None  # 1 foreground, 0 background; default all 1
    box: tuple[float, float, float, float] | None = None  # x0, y0, x1, y1
    mask: np.ndarray | None = None  # uint8 H x W of the image's size, nonzero = region

    def is_empty(self) -> bool:
        return not self.points and self.box is None and self.mask is None


@dataclass
class Result:
    """One inference result. Probabilities are None when no labels were sent."""

    labels: list[str]
    region_probs: np.ndarray | None  # [T]
    image_probs: np.ndarray | None  # [T]
    global_embedding: np.ndarray  # [D], L2-normalised
    region_embedding: np.ndarray  # [D], L2-normalised
    patch_features: np.ndarray  # [P, W]
    mask: np.ndarray  # uint8 [H, W], 0/1, original image size
    mask_logits: np.ndarray  # [M, M], letterboxed frame
    iou: float  # the model's estimate of the mask's IoU

    @property
    def mask_area(self) -> int:
        """Number of mask pixels."""
        return int(np.count_nonzero(self.mask))

    def top(self, k: int | None = None) -> list[tuple[str, float, float | None]]:
        """(label, region probability, whole-image probability) rows, highest region
        probability first; at most k rows (all when k is None)."""
        if self.region_probs is None or not self.labels:
            return []
        order = np.argsort(-np.asarray(self.region_probs), kind="stable")
        if k is not None:
            order = order[: max(0, k)]
        image = self.image_probs
        return [
            (
                self.labels[i],
                float(self.region_probs[i]),
                None if image is None else float(image[i]),
            )
            for i in order
        ]


# --- request building (no server needed) ------------------------------------------------------


def _array(model: ModelSpec, tensor: Tensor, value: object) -> np.ndarray:
    """`value` as a numpy array of the tensor's declared dtype, rank and fixed dims."""
    if tensor not in model.inputs:
        raise RuntimeError(f"model {model.name} declares no input {tensor.name}")
    if tensor.dtype == "object":
        a = np.empty(len(value), dtype=np.object_)  # type: ignore[arg-type]
        a[:] = list(value)  # type: ignore[call-overload]
    else:
        a = np.ascontiguousarray(value, dtype=np.dtype(tensor.dtype))
    shape = tuple(tensor.shape)
    if model.max_batch_size > 0:
        shape = (-1, *shape)
    fixed = [(i, d) for i, d in enumerate(shape) if isinstance(d, int) and d >= 0]
    if a.ndim != len(shape) or any(a.shape[i] != d for i, d in fixed):
        want = ", ".join(str(d) for d in shape)
        raise InputError(f"{tensor.name} must have shape [{want}], got {list(a.shape)}")
    return a


def _points(points: Sequence[Sequence[float]]) -> np.ndarray:
    p = np.asarray(points, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != 2:
        raise InputError(f"points must be a list of (x, y) pairs, got shape {list(p.shape)}")
    return p


def request_arrays(
    model: ModelSpec,
    image: bytes | bytearray | memoryview | np.ndarray,
    region: Region | None = None,
    labels: Sequence[str] | None = None,
    window: tuple[float, float] | None = None,
) -> dict[str, tuple[Tensor, np.ndarray]]:
    """The request's tensors as {name: (declared tensor, array)}; optional inputs that are not
    used are left out. Checks only what is needed to build well-formed tensors; the server
    validates the content (sizes, coordinates, limits) and answers INVALID_ARGUMENT."""
    out: dict[str, tuple[Tensor, np.ndarray]] = {}

    def put(tensor: Tensor, value: object) -> None:
        out[tensor.name] = (tensor, _array(model, tensor, value))

    if isinstance(image, (bytes, bytearray, memoryview)):
        put(_IN["IMAGE"], [bytes(image)])
    elif isinstance(image, np.ndarray):
        pixels = image[..., None] if image.ndim == 2 else image
        if pixels.ndim != 3:
            raise InputError(
                f"pixels must be H x W or H x W x C (C = 1 or 3), got shape {list(image.shape)}"
            )
        put(_IN["PIXELS"], pixels)
    else:
        raise TypeError(f"image must be bytes or a numpy array, not {type(image).__name__}")
    if window is not None:
        put(_IN["WINDOW"], [float(v) for v in window])

    if region is not None:
        if region.points is not None and len(region.points):
            put(_IN["POINTS"], _points(region.points))
            if region.point_labels is not None:
                put(_IN["POINT_LABELS"], [int(v) for v in region.point_labels])
        elif region.point_labels is not None and len(region.point_labels):
            raise InputError("point_labels given without points")
        if region.box is not None:
            put(_IN["BOX"], [float(v) for v in region.box])
        if region.mask is not None:
            m = np.asarray(region.mask)
            if m.ndim != 2:
                raise InputError(f"mask must be H x W, got shape {list(m.shape)}")
            put(_IN["MASK"], m != 0)  # 0/1: uint8 casting would wrap 256 to 0

    if labels is not None and len(labels):
        if isinstance(labels, str):
            raise TypeError("labels must be a list of strings, not one string")
        put(_IN["LABELS"], [str(s).encode("utf-8") for s in labels])
    return out


def build_inputs(
    model: ModelSpec,
    image: bytes | bytearray | memoryview | np.ndarray,
    region: Region | None = None,
    labels: Sequence[str] | None = None,
    window: tuple[float, float] | None = None,
) -> list:
    """`tritonclient.grpc.InferInput`s for `model` (one of the image ensembles)."""
    from tritonclient.grpc import InferInput

    inputs = []
    for tensor, array in request_arrays(model, image, region, labels, window).values():
        inp = InferInput(tensor.name, list(array.shape), tensor.wire_type)
        inp.set_data_from_numpy(array)
        inputs.append(inp)
    return inputs


def build_outputs(model: ModelSpec) -> list:
    """One `InferRequestedOutput` per output that `model` declares."""
    from tritonclient.grpc import InferRequestedOutput

    return [InferRequestedOutput(t.name) for t in model.outputs]


def model_for(labels: Sequence[str] | None) -> ModelSpec:
    """`medp_clip` when labels are given, else `medp_clip_image`."""
    return MEDP_CLIP if labels else MEDP_CLIP_IMAGE


# --- client -----------------------------------------------------------------------------------


def _wrap(exc: Exception) -> MedPClipError:
    status = exc.status() if hasattr(exc, "status") and callable(exc.status) else None
    message = exc.message() if hasattr(exc, "message") and callable(exc.message) else None
    return MedPClipError(message or str(exc), status)


class MedPClipClient:
    """Blocking client for the `medp_clip`, `medp_clip_image` and `medp_clip_text` ensembles.

    `url` is host:port of Triton's gRPC endpoint; `timeout_s` bounds each call (None: no
    limit). Errors are raised as `MedPClipError`; use as a context manager to close the channel.
    """

    def __init__(self, url: str = DEFAULT_URL, timeout_s: float | None = 60) -> None:
        from tritonclient.grpc import InferenceServerClient
        from tritonclient.utils import InferenceServerException

        self.url = url
        self.timeout_s = timeout_s
        self._errors: tuple[type[Exception], ...] = (InferenceServerException,)
        try:
            self._client = InferenceServerClient(url=url)
        except InferenceServerException as exc:
            raise _wrap(exc) from None

    def close(self) -> None:
        self._client.close()

    def __enter__(self: _Client) -> _Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def ready(self) -> bool:
        """True when the server and all three ensembles are ready to serve."""
        try:
            if not self._client.is_server_ready(client_timeout=self.timeout_s):
                return False
            return all(
                self._client.is_model_ready(m.name, client_timeout=self.timeout_s)
                for m in (MEDP_CLIP, MEDP_CLIP_IMAGE, MEDP_CLIP_TEXT)
            )
        except self._errors:
            return False

    def _infer(self, model: ModelSpec, inputs: list) -> object:
        try:
            return self._client.infer(
                model.name, inputs, outputs=build_outputs(model), client_timeout=self.timeout_s
            )
        except self._errors as exc:
            raise _wrap(exc) from None

    def infer(
        self,
        image: bytes | np.ndarray,
        region: Region | None = None,
        labels: list[str] | None = None,
        window: tuple[float, float] | None = None,
    ) -> Result:
        """Score `labels` for the region and the whole image, and segment the region.

        `image`: PNG/JPEG/DICOM bytes (decoded by the server), or pixels H x W[ x C] (display
        values in [0, 255], or raw values such as Hounsfield units with `window`).
        `window`: (centre, width) display window; for DICOM it overrides the file's window.
        Without labels only embeddings and the mask are computed (`medp_clip_image`).
        Raises `InputError` (a ValueError) for arguments that cannot form a request, and
        `MedPClipError` when the server rejects the request or cannot be reached.
        """
        model = model_for(labels)
        try:
            inputs = build_inputs(model, image, region, labels, window)
        except self._errors as exc:
            raise _wrap(exc) from None
        res = self._infer(model, inputs)
        arrays = {t.name: res.as_numpy(t.name) for t in model.outputs}  # type: ignore[attr-defined]
        missing = [name for name, a in arrays.items() if a is None]
        if missing:
            raise MedPClipError(f"response lacks outputs {missing}")

        def get(role: str) -> np.ndarray | None:
            name = _OUT[role].name
            return np.array(arrays[name]) if name in arrays else None

        mask, logits, iou = get("REGION_MASK"), get("MASK_LOGITS"), get("IOU")
        glob, reg, patches = get("GLOBAL_EMBEDDING"), get("REGION_EMBEDDING"), get("PATCH_FEATURES")
        assert mask is not None and logits is not None and iou is not None  # declared by both
        assert glob is not None and reg is not None and patches is not None
        return Result(
            labels=list(labels or []),
            region_probs=get("REGION_PROBS"),
            image_probs=get("IMAGE_PROBS"),
            global_embedding=glob,
            region_embedding=reg,
            patch_features=patches,
            mask=mask.astype(np.uint8, copy=False),
            mask_logits=logits,
            iou=float(iou.reshape(-1)[0]),
        )

    def text_embeddings(self, labels: Sequence[str]) -> np.ndarray:
        """L2-normalised text embeddings [T, D] of `labels` (cache them for repeated sets)."""
        if isinstance(labels, str):
            raise TypeError("labels must be a list of strings, not one string")
        if not len(labels):
            raise InputError("labels is empty")
        try:
            from tritonclient.grpc import InferInput

            tensor = _TEXT_IN
            array = _array(MEDP_CLIP_TEXT, tensor, [str(s).encode("utf-8") for s in labels])
            inp = InferInput(tensor.name, list(array.shape), tensor.wire_type)
            inp.set_data_from_numpy(array)
        except self._errors as exc:
            raise _wrap(exc) from None
        res = self._infer(MEDP_CLIP_TEXT, [inp])
        out = res.as_numpy(_TEXT_OUT.name)  # type: ignore[attr-defined]
        if out is None:
            raise MedPClipError(f"response lacks output {_TEXT_OUT.name}")
        return np.array(out)


# --- masks ------------------------------------------------------------------------------------


def load_mask(path: str | Path) -> np.ndarray:
    """A mask image (PNG) -> uint8 H x W, 1 where any colour channel is nonzero (alpha ignored;
    palette images are judged by their colours)."""
    try:
        with Image.open(path) as img:
            if img.mode == "P":
                img = img.convert("RGBA")
            a = np.asarray(img)
    except OSError as exc:
        raise InputError(f"mask could not be read as an image: {exc.strerror or exc}") from None
    if a.ndim == 3:
        if a.shape[-1] in (2, 4):  # LA / RGBA: drop alpha
            a = a[..., :-1]
        a = (a != 0).any(axis=-1)
    return (a != 0).astype(np.uint8)


def save_mask(mask: np.ndarray, path: str | Path) -> None:
    """Write a mask as an 8-bit grayscale PNG, 0 outside and 255 inside."""
    m = np.asarray(mask)
    if m.ndim != 2:
        raise InputError(f"mask must be H x W, got shape {list(m.shape)}")
    Image.fromarray(np.where(m != 0, 255, 0).astype(np.uint8)).save(path, format="PNG")
