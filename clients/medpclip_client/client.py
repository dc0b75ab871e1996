"""Synchronous gRPC client for the MedP-CLIP ensembles served by Triton, and what the
asyncio client (`aio.AsyncMedPClipClient`) shares with it.

Every request tensor is built from the declarations in `tensors.py` (name, wire dtype, rank), so
the client cannot drift from the server's model configs. Coordinates are pixels of the original
image: x = column, y = row, origin at the top-left corner.

    >>> client = MedPClipClient("127.0.0.1:8001")
    >>> result = client.infer(open("ct.dcm", "rb").read(), Region(box=(40, 60, 180, 200)),
    ...                       labels=["a lung nodule", "a cyst"], window=(-600, 1500))
    >>> result.top(1)

Several regions of one image: `client.session(image)` encodes the image once
(`medp_clip_encode`) and answers each `session.infer(region, labels)` with one call that
carries the encoded image tokens instead of the image (`medp_clip_prompt`); the answers are
`infer`'s, within float tolerance. The server keeps no state: the session holds the tokens.

Connections: a client holds one gRPC channel for its lifetime; reuse one client for many calls
(it is thread-safe) instead of opening one per request, which would pay a TCP (and TLS)
handshake each time. Deadlines: `timeout_s` bounds a whole call, retries and their waits
included. Retries: only UNAVAILABLE (nothing listening, connection lost, server shutting down)
is retried, with exponential backoff and jitter; INVALID_ARGUMENT would fail the same way again
and DEADLINE_EXCEEDED means the time budget is spent, so neither is retried. Inference has no
side effects, so a retried request cannot be applied twice.

Deadlines and cancellations are safe: the server's gateway (`python -m medpclip_tools.serve`) never
passes them on to Triton, which crashes on them in 2.51 (server#7368). Keys: `api_key=` (or the
environment variable MEDPCLIP_API_KEY) is sent as `authorization: Bearer <key>`.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from PIL import Image

from medpclip_core.auth import AUTH_HEADER, read_key_file  # noqa: F401 (read_key_file: API)
from medpclip_core.errors import InputError
from medpclip_core.tensors import (
    ENSEMBLES,
    MEDP_CLIP,
    MEDP_CLIP_ENCODE,
    MEDP_CLIP_IMAGE,
    MEDP_CLIP_PROMPT,
    MEDP_CLIP_PROMPT_IMAGE,
    MEDP_CLIP_TEXT,
    ModelSpec,
    Tensor,
)

__all__ = [
    "InputError",
    "MedPClipClient",
    "MedPClipError",
    "Region",
    "Request",
    "Result",
    "RetryPolicy",
    "Session",
    "build_inputs",
    "build_outputs",
    "load_mask",
    "save_mask",
]

DEFAULT_URL = "127.0.0.1:8001"
_Client = TypeVar("_Client", bound="MedPClipClient")
_T = TypeVar("_T")

STATUS_INVALID_ARGUMENT = "StatusCode.INVALID_ARGUMENT"
STATUS_RETRYABLE = "StatusCode.UNAVAILABLE"  # the only status a client retries
API_KEY_ENV = "MEDPCLIP_API_KEY"
# The served model's identity: parameters of every ensemble's config, written by the
# repository generator (medpclip.repository.IDENTITY_KEYS; the client does not import the
# export library), read by `MedPClipClient.model_identity` from the ensemble it calls: behind
# the medpclip gateway an ensemble's config needs only the API key, as inference does.
MODEL_IDENTITY_KEYS = ("model_name", "model_config", "checkpoint_sha256", "medpclip_version")
STATUS_DEADLINE_EXCEEDED = "StatusCode.DEADLINE_EXCEEDED"
# statuses meaning "the service is not there (now)": the CLI's exit code 4
STATUS_UNAVAILABLE = (
    STATUS_RETRYABLE,
    STATUS_DEADLINE_EXCEEDED,
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
# "Encode once, prompt many": the encode ensemble answers the image tokens and the letterbox
# transform; the prompt ensembles take them back (the server keeps nothing between calls) with
# a region prompt, `medp_clip_prompt` answering as `medp_clip` and `medp_clip_prompt_image` as
# `medp_clip_image`. The tokens' dtype is the declaration's (and the response's), never fixed.
TOKENS, TRANSFORM = "IMAGE_TOKENS", "TRANSFORM"
for _name in (TOKENS, TRANSFORM):  # checked at import, as the roles above
    _declared(MEDP_CLIP_ENCODE.outputs, _name, MEDP_CLIP_ENCODE.name)
    _declared(MEDP_CLIP_PROMPT.inputs, _name, MEDP_CLIP_PROMPT.name)
    _declared(MEDP_CLIP_PROMPT_IMAGE.inputs, _name, MEDP_CLIP_PROMPT_IMAGE.name)
_TEXT_OUT = _declared(MEDP_CLIP_TEXT.outputs, "TEXT_EMBEDDINGS", MEDP_CLIP_TEXT.name)
_ENSEMBLES = ENSEMBLES  # ready() = every entry point loaded


class MedPClipError(Exception):
    """A failed request: `.status` is the gRPC status ("StatusCode.INVALID_ARGUMENT", ...; None
    for a client-side failure), `.message` the server's message and `.attempts` how many times
    the request was sent (more than 1 after retries)."""

    def __init__(self, message: str, status: str | None = None, attempts: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.attempts = attempts

    def __str__(self) -> str:
        tries = f" ({self.attempts} attempts)" if self.attempts > 1 else ""
        return f"[{self.status}] {self.message}{tries}" if self.status else self.message + tries

    @property
    def invalid_input(self) -> bool:
        """The server rejected the request's content (fix the input, do not retry)."""
        return self.status == STATUS_INVALID_ARGUMENT

    @property
    def denied(self) -> bool:
        """The server refused the caller: no or a wrong API key, or an admin-only method."""
        return self.status in ("StatusCode.UNAUTHENTICATED", "StatusCode.PERMISSION_DENIED")

    @property
    def unavailable(self) -> bool:
        """The server or model could not be reached, is not loaded, or did not answer in time."""
        return self.status in STATUS_UNAVAILABLE

    @property
    def retryable(self) -> bool:
        """Sending the same request again later may succeed (UNAVAILABLE only)."""
        return self.status == STATUS_RETRYABLE


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
class Request:
    """One `infer` call as data, for batches (`AsyncMedPClipClient.infer_many`).

    `image`: file bytes (PNG/JPEG/DICOM, decoded by the server) or pixels H x W[ x C];
    `window`: (centre, width); `tag`: the caller's own reference (e.g. a file name), never
    sent to the server."""

    image: bytes | np.ndarray
    region: Region | None = None
    labels: Sequence[str] | None = None
    window: tuple[float, float] | None = None
    tag: Any = None


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


# --- request building (no server needed; shared by the sync and asyncio clients) -----------------


def _array(model: ModelSpec, tensor: Tensor, value: object) -> np.ndarray:
    """`value` as a numpy array of the tensor's declared dtype, rank and fixed dims."""
    if all(t.name != tensor.name for t in model.inputs):
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
    image: bytes | bytearray | memoryview | np.ndarray | None,
    region: Region | None = None,
    labels: Sequence[str] | None = None,
    window: tuple[float, float] | None = None,
    *,
    tokens: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict[str, tuple[Tensor, np.ndarray]]:
    """The request's tensors as {name: (declared tensor, array)}; optional inputs that are not
    used are left out. Each tensor is `model`'s own declaration (name, dtype, rank). The image
    is `image` (bytes or pixels, with `window`) or, for the prompt ensembles, `tokens`: the
    (IMAGE_TOKENS, TRANSFORM) an encode call answered. Checks only what is needed to build
    well-formed tensors; the server validates the content (sizes, coordinates, limits) and
    answers INVALID_ARGUMENT."""
    out: dict[str, tuple[Tensor, np.ndarray]] = {}

    def put(role: Tensor | str, value: object) -> None:
        name = role if isinstance(role, str) else role.name
        tensor = _declared(model.inputs, name, model.name)
        out[name] = (tensor, _array(model, tensor, value))

    if tokens is not None:
        if image is not None or window is not None:
            raise TypeError("give the image (and window) or the encoded tokens, not both")
        put(TOKENS, tokens[0])
        put(TRANSFORM, tokens[1])
    elif isinstance(image, (bytes, bytearray, memoryview)):
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
    image: bytes | bytearray | memoryview | np.ndarray | None,
    region: Region | None = None,
    labels: Sequence[str] | None = None,
    window: tuple[float, float] | None = None,
    *,
    tokens: tuple[np.ndarray, np.ndarray] | None = None,
) -> list:
    """`tritonclient.grpc.InferInput`s for `model` (one of the image or prompt ensembles)."""
    from tritonclient.grpc import InferInput

    inputs = []
    arrays = request_arrays(model, image, region, labels, window, tokens=tokens)
    for tensor, array in arrays.values():
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


def prepare(request: Request) -> tuple[ModelSpec, list, list]:
    """(model, InferInputs, InferRequestedOutputs) of one image request; the one place the
    sync and asyncio clients build requests."""
    from tritonclient.utils import InferenceServerException

    model = model_for(request.labels)
    try:
        inputs = build_inputs(model, request.image, request.region, request.labels, request.window)
    except InferenceServerException as exc:
        raise _wrap(exc) from None
    return model, inputs, build_outputs(model)


def prepare_encode(
    image: bytes | np.ndarray, window: tuple[float, float] | None
) -> tuple[ModelSpec, list, list]:
    """(model, InferInputs, InferRequestedOutputs) of a session's encode call."""
    from tritonclient.utils import InferenceServerException

    model = MEDP_CLIP_ENCODE
    try:
        inputs = build_inputs(model, image, window=window)
    except InferenceServerException as exc:
        raise _wrap(exc) from None
    return model, inputs, build_outputs(model)


def parse_encode(model: ModelSpec, response: Any) -> tuple[np.ndarray, np.ndarray]:
    """(IMAGE_TOKENS, TRANSFORM) of an encode `InferResult`, in the dtypes the server sent."""
    out = []
    for name in (TOKENS, TRANSFORM):
        _declared(model.outputs, name, model.name)
        a = response.as_numpy(name)
        if a is None:
            raise MedPClipError(f"response lacks output {name}")
        out.append(np.ascontiguousarray(a))
    return out[0], out[1]


def prepare_prompt(
    tokens: tuple[np.ndarray, np.ndarray],
    region: Region | None,
    labels: Sequence[str] | None,
) -> tuple[ModelSpec, list, list]:
    """(model, InferInputs, InferRequestedOutputs) of one prompt of a session:
    `medp_clip_prompt` with labels, else `medp_clip_prompt_image`."""
    from tritonclient.utils import InferenceServerException

    model = MEDP_CLIP_PROMPT if labels else MEDP_CLIP_PROMPT_IMAGE
    try:
        inputs = build_inputs(model, None, region, labels, tokens=tokens)
    except InferenceServerException as exc:
        raise _wrap(exc) from None
    return model, inputs, build_outputs(model)


def text_inputs(labels: Sequence[str]) -> list:
    """The `medp_clip_text` request's `InferInput`s."""
    from tritonclient.grpc import InferInput

    if isinstance(labels, str):
        raise TypeError("labels must be a list of strings, not one string")
    if not len(labels):
        raise InputError("labels is empty")
    array = _array(MEDP_CLIP_TEXT, _TEXT_IN, [str(s).encode("utf-8") for s in labels])
    inp = InferInput(_TEXT_IN.name, list(array.shape), _TEXT_IN.wire_type)
    inp.set_data_from_numpy(array)
    return [inp]


# --- response parsing (shared by the sync and asyncio clients) --------------------------------


def parse_result(model: ModelSpec, labels: Sequence[str] | None, response: Any) -> Result:
    """A `Result` from an image ensemble's `InferResult` (sync or asyncio, same class)."""
    arrays = {t.name: response.as_numpy(t.name) for t in model.outputs}
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


def parse_text(response: Any) -> np.ndarray:
    """[T, D] text embeddings from a `medp_clip_text` `InferResult`."""
    out = response.as_numpy(_TEXT_OUT.name)
    if out is None:
        raise MedPClipError(f"response lacks output {_TEXT_OUT.name}")
    return np.array(out)


# --- retries, deadlines, connection options (shared by the sync and asyncio clients) ----------


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter, for UNAVAILABLE only.

    Retry n (1-based) waits `min(backoff_max_s, backoff_s * 2**(n-1))` times a random factor in
    [0.5, 1]: the jitter keeps many clients that lost the same server from reconnecting in
    lockstep, the lower bound keeps a real pause. The defaults (10 retries: 0.25, 0.5, 1, 2, then
    4 s each, about 14 to 28 s in all, always within the call's deadline) ride out a server
    restart (stop, start, models loaded: under 15 s for the default model), not a long outage.
    """

    retries: int = 10
    backoff_s: float = 0.25
    backoff_max_s: float = 4.0

    def __post_init__(self) -> None:
        if self.retries < 0:
            raise ValueError(f"retries must be >= 0, got {self.retries}")
        if not (0 < self.backoff_s <= self.backoff_max_s):
            raise ValueError("need 0 < backoff_s <= backoff_max_s")

    def delay(self, retry: int) -> float:
        """Seconds to wait before retry number `retry` (1-based)."""
        cap = min(self.backoff_max_s, self.backoff_s * 2 ** (retry - 1))
        return cap * random.uniform(0.5, 1.0)


# Called before each backoff wait with (failed attempt number, its error, seconds to wait).
RetryHook = Callable[[int, MedPClipError, float], None]


def _wrap(exc: Exception, attempts: int = 1) -> MedPClipError:
    status = exc.status() if hasattr(exc, "status") and callable(exc.status) else None
    message = exc.message() if hasattr(exc, "message") and callable(exc.message) else None
    return MedPClipError(message or str(exc), status, attempts)


class _Attempts:
    """The attempts of one call under a deadline: `timeout()` for the next attempt, `failed()`
    decides between waiting (returns the delay) and giving up (raises). The sync and asyncio
    clients differ only in how they wait."""

    def __init__(self, policy: RetryPolicy, timeout_s: float | None, hook: RetryHook | None):
        self.policy, self.hook = policy, hook
        self.end = None if timeout_s is None else time.monotonic() + timeout_s
        self.attempt = 1

    def timeout(self) -> float | None:
        """Time left for the next attempt (the gRPC deadline), None without a limit."""
        return None if self.end is None else max(0.0, self.end - time.monotonic())

    def failed(self, exc: Exception) -> float:
        """Seconds to wait before the next attempt, or raise the `MedPClipError`: not
        UNAVAILABLE, retries used up, or the wait would pass the deadline."""
        error = _wrap(exc, self.attempt)
        if not error.retryable or self.attempt > self.policy.retries:
            raise error from None
        delay = self.policy.delay(self.attempt)
        left = self.timeout()
        if left is not None and delay >= left:
            raise error from None
        if self.hook is not None:
            self.hook(self.attempt, error, delay)
        self.attempt += 1
        return delay


class _Unset:
    """Marks "use the client's `timeout_s`" (None already means no limit)."""


UNSET: Any = _Unset()

MAX_GRPC_MESSAGE_BYTES = 2**31 - 1  # tritonclient's own default: images can be large


class _ClientBase:
    """Options and connection set-up shared by `MedPClipClient` and `AsyncMedPClipClient`
    (the options are documented on `MedPClipClient`)."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        timeout_s: float | None = 60,
        *,
        retries: int = RetryPolicy.retries,
        backoff_s: float = 0.25,
        backoff_max_s: float = 4.0,
        ssl: bool = False,
        root_certificates: str | Path | None = None,
        private_key: str | Path | None = None,
        certificate_chain: str | Path | None = None,
        headers: Mapping[str, str] | None = None,
        on_retry: RetryHook | None = None,
        api_key: str | None = None,
    ) -> None:
        from tritonclient.utils import InferenceServerException

        self.url = url
        self.timeout_s = timeout_s
        self.retry = RetryPolicy(retries, backoff_s, backoff_max_s)
        self.headers = {str(k).lower(): str(v) for k, v in (headers or {}).items()}
        api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None
        if api_key is not None and AUTH_HEADER not in self.headers:
            self.headers[AUTH_HEADER] = f"Bearer {api_key.strip()}"
        self.on_retry = on_retry
        self._errors: tuple[type[Exception], ...] = (InferenceServerException,)
        self._tls = {
            "root_certificates": root_certificates,
            "private_key": private_key,
            "certificate_chain": certificate_chain,
        }
        self.ssl = bool(ssl) or any(v is not None for v in self._tls.values())
        self._client = self._connect()

    @staticmethod
    def _triton_class() -> type:
        """tritonclient's client class (sync or asyncio), imported when a client is made."""
        raise NotImplementedError

    def _connect(self) -> Any:
        """The tritonclient client: one gRPC channel, reused for every call of this client."""
        tls = {k: None if v is None else str(v) for k, v in self._tls.items()}
        for what, path in tls.items():
            if path is not None and not Path(path).is_file():
                raise MedPClipError(f"TLS {what} file not found: {path}")
        try:
            return self._triton_class()(
                url=self.url, ssl=self.ssl, channel_args=self._channel_args(), **tls
            )
        except self._errors as exc:
            raise _wrap(exc) from None

    @property
    def triton(self) -> Any:
        """The underlying tritonclient client (for calls this class does not wrap)."""
        return self._client

    def _channel_args(self) -> list[tuple[str, int]]:
        """tritonclient's defaults, plus a reconnect backoff no longer than ours: after a
        failure gRPC waits (1 s growing to 120 s by default) before reconnecting and fails calls
        fast meanwhile, which would turn our retries into no-ops."""
        from tritonclient.grpc import KeepAliveOptions

        keepalive = KeepAliveOptions()
        min_ms = max(1, int(self.retry.backoff_s * 1000))
        return [
            ("grpc.max_send_message_length", MAX_GRPC_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE_BYTES),
            ("grpc.keepalive_time_ms", keepalive.keepalive_time_ms),
            ("grpc.keepalive_timeout_ms", keepalive.keepalive_timeout_ms),
            ("grpc.keepalive_permit_without_calls", keepalive.keepalive_permit_without_calls),
            ("grpc.http2.max_pings_without_data", keepalive.http2_max_pings_without_data),
            ("grpc.initial_reconnect_backoff_ms", min_ms),
            ("grpc.min_reconnect_backoff_ms", min_ms),
            ("grpc.max_reconnect_backoff_ms", max(min_ms, int(self.retry.backoff_max_s * 1000))),
        ]

    def _attempts(self, timeout_s: Any, retry: bool = True) -> _Attempts:
        policy = self.retry if retry else RetryPolicy(0)
        return _Attempts(policy, self.timeout_s if timeout_s is UNSET else timeout_s, self.on_retry)


# --- sync client ------------------------------------------------------------------------------


class MedPClipClient(_ClientBase):
    """Blocking client for the `medp_clip`, `medp_clip_image` and `medp_clip_text` ensembles.

    url: host:port of Triton's gRPC endpoint. timeout_s: deadline of each call, retries and
    their waits included (None: no limit; each method also takes `timeout_s=`).
    retries, backoff_s, backoff_max_s: retries on UNAVAILABLE, see `RetryPolicy`.
    ssl: use TLS. root_certificates (CA bundle to verify the server; default the system's),
    private_key and certificate_chain (a client certificate, for mutual TLS): PEM file paths,
    as tritonclient takes them; giving any of them turns TLS on.
    headers: gRPC metadata sent with every call (keys are lower-cased, as gRPC requires; values
    are never logged). api_key: the server's API key, sent as "authorization: Bearer <key>";
    default: the environment variable MEDPCLIP_API_KEY, if set.
    on_retry: called as on_retry(attempt, error, delay_s) before each backoff wait.

    Errors are raised as `MedPClipError`; use as a context manager to close the channel. One
    instance may be shared by threads (tritonclient's gRPC client is thread-safe).
    """

    @staticmethod
    def _triton_class() -> type:
        from tritonclient.grpc import InferenceServerClient

        return InferenceServerClient

    def close(self) -> None:
        self._client.close()
        # tritonclient's __del__ closes the channel again; at interpreter exit under gevent
        # (locust) that second close deadlocks inside gRPC. Once closed, closing is a no-op.
        self._client.close = lambda: None

    def __enter__(self: _Client) -> _Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(
        self, method: str, *args: Any, timeout_s: Any = UNSET, retry: bool = True, **kwargs: Any
    ) -> Any:
        """`self.triton.<method>(*args, **kwargs)` with the headers, deadline and retries."""
        attempts = self._attempts(timeout_s, retry)
        while True:
            try:
                fn = getattr(self._client, method)
                return fn(*args, headers=self.headers, client_timeout=attempts.timeout(), **kwargs)
            except self._errors as exc:
                time.sleep(attempts.failed(exc))

    def ready(self) -> bool:
        """True when the server and all three ensembles are ready to serve (one try each: a
        readiness probe reports the present, it does not wait)."""
        try:
            if not self._call("is_server_ready", retry=False):
                return False
            return all(self._call("is_model_ready", m.name, retry=False) for m in _ENSEMBLES)
        except MedPClipError:
            return False

    def infer(
        self,
        image: bytes | np.ndarray,
        region: Region | None = None,
        labels: Sequence[str] | None = None,
        window: tuple[float, float] | None = None,
        *,
        timeout_s: float | None = UNSET,
    ) -> Result:
        """Score `labels` for the region and the whole image, and segment the region.

        `image`: PNG/JPEG/DICOM bytes (decoded by the server), or pixels H x W[ x C] (display
        values in [0, 255], or raw values such as Hounsfield units with `window`; see
        `dicom.to_request`). `window`: (centre, width) display window; for DICOM it overrides
        the file's window. Without labels only embeddings and the mask are computed
        (`medp_clip_image`). `timeout_s` overrides the client's deadline for this call.
        Raises `InputError` (a ValueError) for arguments that cannot form a request, and
        `MedPClipError` when the server rejects the request or cannot be reached.
        """
        model, inputs, outputs = prepare(Request(image, region, labels, window))
        response = self._call("infer", model.name, inputs, outputs=outputs, timeout_s=timeout_s)
        return parse_result(model, labels, response)

    def session(
        self,
        image: bytes | np.ndarray,
        window: tuple[float, float] | None = None,
        *,
        timeout_s: float | None = UNSET,
    ) -> Session:
        """Encode `image` once and ask about many regions of it:

            with client.session(dicom_bytes) as s:          # one encode call, here
                a = s.infer(Region(points=[(62, 70)]), labels)
                b = s.infer(Region(box=(10, 20, 60, 80)), labels)

        `image` and `window` as for `infer`. Each `s.infer(region, labels)` returns what
        `client.infer(image, region, labels, window)` returns (within float tolerance), with
        one call that carries the image tokens (`s.tokens_nbytes`) instead of the image, and
        skips decoding and the prompt-independent blocks of the image encoder. The server keeps
        nothing between calls: the session holds the tokens, and calls go through this client
        (its retries, deadline, headers, TLS; `timeout_s` overrides the deadline for the
        session's calls). Entering the `with` block encodes, so a bad image fails there;
        without `with`, the first `infer` (or `encode()`) does.
        """
        return Session(self, image, window, timeout_s)

    def model_identity(
        self, model: str = MEDP_CLIP.name, *, timeout_s: float | None = UNSET
    ) -> dict[str, str]:
        """The served model as the server's repository names it (`MODEL_IDENTITY_KEYS`: model
        name, config name, SHA-256 of the checkpoint's weights, medpclip version of the export),
        from the `parameters` of the config of `model`, the ensemble the client calls
        (`medp_clip` by default; every ensemble states the same). Keys the server does not
        state are absent (an older repository).

        Behind the medpclip gateway an ensemble's configuration needs what inference needs (the
        API key, when the server has one); any other model's is admin-only. A refusal raises
        `MedPClipError` with `.denied`."""
        response = self._call("get_model_config", model, timeout_s=timeout_s)
        params = response.config.parameters
        return {k: params[k].string_value for k in MODEL_IDENTITY_KEYS if k in params}

    def text_embeddings(
        self, labels: Sequence[str], *, timeout_s: float | None = UNSET
    ) -> np.ndarray:
        """L2-normalised text embeddings [T, D] of `labels` (cache them for repeated sets)."""
        inputs = text_inputs(labels)
        response = self._call("infer", MEDP_CLIP_TEXT.name, inputs, timeout_s=timeout_s)
        return parse_text(response)


# --- encode once, prompt many -----------------------------------------------------------------


class _SessionBase:
    """What the sync and asyncio sessions share: the image, the encoded tokens and how to
    build and read their calls (`prepare_encode`, `prepare_prompt`, `parse_result`)."""

    def __init__(
        self,
        image: bytes | bytearray | memoryview | np.ndarray,
        window: tuple[float, float] | None = None,
        timeout_s: Any = UNSET,
    ) -> None:
        if not isinstance(image, (bytes, bytearray, memoryview, np.ndarray)):
            raise TypeError(f"image must be bytes or a numpy array, not {type(image).__name__}")
        self.image: bytes | np.ndarray | None = (
            image if isinstance(image, np.ndarray) else bytes(image)
        )
        self.window = window
        self.timeout_s = timeout_s
        self.tokens: tuple[np.ndarray, np.ndarray] | None = None
        self.encodes = 0  # encode calls made (1 once encoded)

    @property
    def encoded(self) -> bool:
        return self.tokens is not None

    @property
    def tokens_nbytes(self) -> int:
        """Bytes of IMAGE_TOKENS and TRANSFORM that each prompt call uploads (the tensor
        payload; the image itself is uploaded once, by the encode call). 0 before encoding."""
        return 0 if self.tokens is None else int(sum(a.nbytes for a in self.tokens))

    @property
    def tokens_dtype(self) -> np.dtype | None:
        """The dtype of the image tokens as the server sent them (float16 or float32)."""
        return None if self.tokens is None else self.tokens[0].dtype

    def _encode_request(self) -> tuple[ModelSpec, list, list]:
        if self.image is None:
            raise RuntimeError("the session is closed")
        return prepare_encode(self.image, self.window)

    def _encoded(self, model: ModelSpec, response: Any) -> None:
        self.tokens = parse_encode(model, response)
        self.encodes += 1
        self.image = None  # the tokens replace it: no need to keep the upload in memory

    def _prompt_request(
        self, region: Region | None, labels: Sequence[str] | None
    ) -> tuple[ModelSpec, list, list]:
        assert self.tokens is not None
        return prepare_prompt(self.tokens, region, labels)

    def _timeout(self, timeout_s: Any) -> Any:
        return self.timeout_s if timeout_s is UNSET else timeout_s

    def _close(self) -> None:
        self.tokens = None
        self.image = None


class Session(_SessionBase):
    """One image, encoded once (`medp_clip_encode`), asked about any number of regions
    (`medp_clip_prompt`, or `medp_clip_prompt_image` without labels). Made by
    `MedPClipClient.session`; see there. Threads may share one session, as they share a
    client: the tokens are only read once encoded."""

    def __init__(
        self,
        client: MedPClipClient,
        image: bytes | np.ndarray,
        window: tuple[float, float] | None = None,
        timeout_s: Any = UNSET,
    ) -> None:
        super().__init__(image, window, timeout_s)
        self.client = client
        self._lock = threading.Lock()

    def encode(self, *, timeout_s: float | None = UNSET) -> Session:
        """Encode the image (once: later calls, and concurrent first ones, use that encode)."""
        if self.tokens is not None:
            return self
        with self._lock:
            if self.tokens is None:
                model, inputs, outputs = self._encode_request()
                response = self.client._call(
                    "infer",
                    model.name,
                    inputs,
                    outputs=outputs,
                    timeout_s=self._timeout(timeout_s),
                )
                self._encoded(model, response)
        return self

    def infer(
        self,
        region: Region | None = None,
        labels: Sequence[str] | None = None,
        *,
        timeout_s: float | None = UNSET,
    ) -> Result:
        """As `MedPClipClient.infer` for this session's image (and window), without sending
        the image again: one call to the prompt ensemble with the session's tokens."""
        self.encode(timeout_s=timeout_s)
        model, inputs, outputs = self._prompt_request(region, labels)
        response = self.client._call(
            "infer", model.name, inputs, outputs=outputs, timeout_s=self._timeout(timeout_s)
        )
        return parse_result(model, labels, response)

    def close(self) -> None:
        """Drop the tokens (the server holds nothing to release)."""
        self._close()

    def __enter__(self) -> Session:
        return self.encode()

    def __exit__(self, *exc: object) -> None:
        self.close()


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
