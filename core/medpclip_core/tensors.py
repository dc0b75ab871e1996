"""The one declaration of every served model's tensors.

Each model (ONNX encoder, python-backend step or ensemble) is a `ModelSpec` listing its inputs and
outputs once: name, dtype, per-item shape and whether the input is optional. The ONNX export takes
input/output names and dynamic axes from here, the repository generator writes `config.pbtxt`
from here, and the client builds its requests from here, so the three cannot drift apart.

Shapes use symbols that are resolved from the model config (`Dims`):
  S  image side in pixels          g  patch grid side (S / patch)     P  g*g patches
  M  low-res mask side (4*g)       W  image encoder width             C  prompt/decoder width
  D  shared embedding dim          L  text context length
  K  1 + P trunk tokens (CLS first)
Any other symbol (N = number of prompt points, T = number of labels, Q = tokens per label in
this request, at most L, H, X = image size) is dynamic and becomes -1. For batched models
(`max_batch_size > 0`) the shape excludes the batch axis.

This module is deliberately dependency-free: the client installs without torch or numpy extras.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# numpy dtype name -> (Triton config type, Triton wire datatype)
DTYPES: dict[str, tuple[str, str]] = {
    "float32": ("TYPE_FP32", "FP32"),
    "float16": ("TYPE_FP16", "FP16"),
    "int64": ("TYPE_INT64", "INT64"),
    "int32": ("TYPE_INT32", "INT32"),
    "uint8": ("TYPE_UINT8", "UINT8"),
    "bool": ("TYPE_BOOL", "BOOL"),
    "object": ("TYPE_STRING", "BYTES"),
}


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str
    shape: tuple[int | str, ...]
    optional: bool = False
    doc: str = ""

    @property
    def triton_type(self) -> str:
        return DTYPES[self.dtype][0]

    @property
    def wire_type(self) -> str:
        return DTYPES[self.dtype][1]

    def dims(self, dims: Dims | None = None) -> list[int]:
        """Concrete dims for a config file; unknown symbols are dynamic (-1)."""
        return [d if isinstance(d, int) else (dims.get(d) if dims else -1) for d in self.shape]

    def dynamic_axes(self, batched: bool) -> dict[int, str]:
        """ONNX dynamic axes: the batch axis plus every dynamic symbol."""
        axes = {0: "batch"} if batched else {}
        offset = 1 if batched else 0
        for i, d in enumerate(self.shape):
            if isinstance(d, str) and d not in STATIC_SYMBOLS:
                axes[i + offset] = d
        return axes


STATIC_SYMBOLS = ("S", "g", "P", "M", "W", "C", "D", "L", "K")


@dataclass(frozen=True)
class Dims:
    """Model-size dependent dims, read from the model config (see `medpclip.config`)."""

    S: int
    g: int
    W: int
    C: int
    D: int
    L: int

    @property
    def P(self) -> int:
        return self.g * self.g

    @property
    def M(self) -> int:
        return 4 * self.g

    @property
    def K(self) -> int:
        return 1 + self.P

    def get(self, symbol: str) -> int:
        return int(getattr(self, symbol)) if symbol in STATIC_SYMBOLS else -1


@dataclass(frozen=True)
class ModelSpec:
    name: str
    backend: str  # "onnx" (an exported encoder), "python" or "ensemble"
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    max_batch_size: int = 0
    doc: str = ""
    parameters: dict[str, str] = field(default_factory=dict)

    def input(self, name: str) -> Tensor:
        return next(t for t in self.inputs if t.name == name)

    def output(self, name: str) -> Tensor:
        return next(t for t in self.outputs if t.name == name)


# Limits that the API states; the server enforces them with INVALID_ARGUMENT.
MAX_LABELS = 64  # labels per request (= text encoder max_batch_size, so one request is one batch)
MAX_POINTS = 16  # points per request
MAX_IMAGE_SIDE = 8192  # pixels, either side, before letterboxing
MAX_LABEL_CHARS = 512

# Labels are padded to the longest label of the request, rounded up to a multiple of this (and
# at most the context L): short labels cost a fraction of the full context (compute grows with
# the length, squared in attention), and few distinct lengths let requests batch together.
TOKEN_BUCKET = 8

# (min, opt, max) of each dynamic non-batch symbol, for TensorRT optimisation profiles; a string
# is a static symbol of the model config. N counts prompt points after preprocessing: the points
# plus two box corners. Q: tokens per label (the bucketed length, at most the context L).
DYNAMIC_BOUNDS: dict[str, tuple[int | str, int | str, int | str]] = {
    "N": (1, 3, MAX_POINTS + 2),
    "Q": (TOKEN_BUCKET, 2 * TOKEN_BUCKET, "L"),
}


def bounds(symbol: str, dims: Dims) -> tuple[int, int, int]:
    """(min, opt, max) of a dynamic symbol for this model size (each clamped to max)."""
    lo, mid, hi = (dims.get(v) if isinstance(v, str) else v for v in DYNAMIC_BOUNDS[symbol])
    return min(lo, hi), min(mid, hi), hi


# The batch a profile is tuned for (min is 1, max is the model's max_batch_size).
OPT_BATCH: dict[str, int] = {"text_encoder": 8}

# --- exported encoders (ONNX; TensorRT in the GPU flavour) -----------------------------------

PROMPT_ENCODER = ModelSpec(
    name="prompt_encoder",
    backend="onnx",
    max_batch_size=8,
    doc="Points/box corners/mask (letterboxed pixels) -> sparse tokens, dense map, region map.",
    inputs=(
        Tensor("point_coords", "float32", ("N", 2), doc="x, y in model input pixels"),
        Tensor("point_labels", "int32", ("N",), doc="1 fg, 0 bg, 2/3 box corners, -1 padding"),
        Tensor("mask_input", "float32", (1, "M", "M"), doc="region mask on the low-res grid"),
        Tensor("has_mask", "float32", (1,), doc="1 when mask_input holds a mask"),
    ),
    outputs=(
        Tensor("sparse_embeddings", "float32", ("N", "C")),
        Tensor("dense_embeddings", "float32", ("C", "g", "g")),
        Tensor("region_map", "float32", ("P",), doc="soft region weight per patch, in [0, 1]"),
    ),
)

IMAGE_ENCODER = ModelSpec(
    name="image_encoder",
    backend="onnx",
    max_batch_size=8,
    doc="ViT with region integration in the last blocks; embeddings are L2-normalised.",
    inputs=(
        Tensor("pixel_values", "float32", (3, "S", "S")),
        Tensor("dense_embeddings", "float32", ("C", "g", "g")),
        Tensor("region_map", "float32", ("P",)),
    ),
    outputs=(
        Tensor("global_embedding", "float32", ("D",)),
        Tensor("region_embedding", "float32", ("D",)),
        Tensor("patch_features", "float32", ("P", "W"), doc="visual tokens (MLLM, mask decoder)"),
    ),
)

TEXT_ENCODER = ModelSpec(
    name="text_encoder",
    backend="onnx",
    max_batch_size=MAX_LABELS,
    doc="BERT-style text tower; embedding is L2-normalised.",
    inputs=(
        Tensor("input_ids", "int64", ("Q",), doc="padded to the request's longest label"),
        Tensor("attention_mask", "int64", ("Q",)),
    ),
    outputs=(Tensor("text_embedding", "float32", ("D",)),),
)

MASK_DECODER = ModelSpec(
    name="mask_decoder",
    backend="onnx",
    max_batch_size=8,
    doc="SAM-style two-way transformer -> low-res mask logits and an IoU estimate.",
    inputs=(
        Tensor("patch_features", "float32", ("P", "W")),
        Tensor("sparse_embeddings", "float32", ("N", "C")),
        Tensor("dense_embeddings", "float32", ("C", "g", "g")),
    ),
    outputs=(
        Tensor("mask_logits", "float32", ("M", "M")),
        Tensor("iou", "float32", (1,)),
    ),
)

# Encode once, prompt many: the image encoder split where the prompt first enters. The trunk
# (every block before the last `prompt_blocks`) never sees the prompt, so its tokens can be
# computed once per image (`medp_clip_encode`) and sent back with each prompt
# (`medp_clip_prompt`). They travel in FP32: rounded to FP16 they move PATCH_FEATURES by up to
# 1.1e-3 (default model) / 1.5e-3 (seeded base) and MASK_LOGITS by 6.9e-3 (default model), beyond
# the 1e-4 that the prompt ensembles keep to `medp_clip` (model_repository/README.md).
TOKENS_DTYPE = "float32"

IMAGE_TRUNK = ModelSpec(
    name="image_trunk",
    backend="onnx",
    max_batch_size=8,
    doc="The prompt-free first blocks of the image encoder: pixels -> trunk tokens.",
    inputs=(Tensor("pixel_values", "float32", (3, "S", "S")),),
    outputs=(
        Tensor("image_tokens", TOKENS_DTYPE, ("K", "W"), doc="CLS and patch tokens, pre-prompt"),
    ),
)

IMAGE_PROMPTED = ModelSpec(
    name="image_prompted",
    backend="onnx",
    max_batch_size=8,
    doc="The last (prompted) blocks of the image encoder: trunk tokens + region -> embeddings.",
    inputs=(
        Tensor("image_tokens", TOKENS_DTYPE, ("K", "W")),
        Tensor("dense_embeddings", "float32", ("C", "g", "g")),
        Tensor("region_map", "float32", ("P",)),
    ),
    outputs=IMAGE_ENCODER.outputs,
)

ENCODERS = (
    PROMPT_ENCODER,
    IMAGE_ENCODER,
    TEXT_ENCODER,
    MASK_DECODER,
    IMAGE_TRUNK,
    IMAGE_PROMPTED,
)

# --- python-backend steps (not batched: one request, leading 1 feeds the batched encoders) ----

PREPROCESS = ModelSpec(
    name="preprocess",
    backend="python",
    doc="Validate everything, decode PNG/JPEG/DICOM or raw pixels, letterbox, map the prompts the "
    "same way, and tokenize LABELS when given.",
    inputs=(
        Tensor("IMAGE", "object", (1,), optional=True, doc="encoded PNG, JPEG or DICOM Part 10"),
        Tensor("PIXELS", "float32", ("H", "X", -1), optional=True, doc="H x W x 1|3 pixels"),
        Tensor("WINDOW", "float32", (2,), optional=True, doc="window centre, width"),
        Tensor("POINTS", "float32", ("N", 2), optional=True, doc="x, y in image pixels"),
        Tensor("POINT_LABELS", "int32", ("N",), optional=True, doc="1 foreground, 0 background"),
        Tensor("BOX", "float32", (4,), optional=True, doc="x0, y0, x1, y1 in image pixels"),
        Tensor("MASK", "uint8", ("H", "X"), optional=True, doc="region mask, image size"),
        Tensor("LABELS", "object", ("T",), optional=True, doc="candidate labels, UTF-8"),
    ),
    outputs=(
        Tensor("pixel_values", "float32", (1, 3, "S", "S")),
        Tensor("point_coords", "float32", (1, "N", 2)),
        Tensor("point_labels", "int32", (1, "N")),
        Tensor("mask_input", "float32", (1, 1, "M", "M")),
        Tensor("has_mask", "float32", (1, 1)),
        Tensor("transform", "float32", (5,), doc="scale, pad_x, pad_y, height, width"),
        Tensor("input_ids", "int64", ("T", "Q"), doc="only when LABELS is given"),
        Tensor("attention_mask", "int64", ("T", "Q"), doc="only when LABELS is given"),
    ),
)

TOKENIZER = ModelSpec(
    name="tokenizer",
    backend="python",
    doc="WordPiece tokenization of the candidate labels.",
    inputs=(Tensor("LABELS", "object", ("T",), doc="candidate labels, UTF-8"),),
    outputs=(
        Tensor("input_ids", "int64", ("T", "Q")),
        Tensor("attention_mask", "int64", ("T", "Q")),
    ),
)

POSTPROCESS = ModelSpec(
    name="postprocess",
    backend="python",
    doc="Scores labels, un-letterboxes the mask to the original image size.",
    inputs=(
        Tensor("global_embedding", "float32", (1, "D")),
        Tensor("region_embedding", "float32", (1, "D")),
        Tensor("patch_features", "float32", (1, "P", "W")),
        Tensor("text_embedding", "float32", ("T", "D"), optional=True),
        Tensor("mask_logits", "float32", (1, "M", "M")),
        Tensor("iou", "float32", (1, 1)),
        Tensor("transform", "float32", (5,)),
    ),
    outputs=(
        Tensor("REGION_PROBS", "float32", ("T",), doc="label probabilities for the region"),
        Tensor("IMAGE_PROBS", "float32", ("T",), doc="label probabilities for the whole image"),
        Tensor("GLOBAL_EMBEDDING", "float32", ("D",), doc="L2-normalised image embedding"),
        Tensor("REGION_EMBEDDING", "float32", ("D",), doc="L2-normalised region embedding"),
        Tensor("PATCH_FEATURES", "float32", ("P", "W"), doc="visual tokens for an MLLM"),
        Tensor(
            "REGION_MASK", "uint8", ("H", "X"), doc="region mask at the original image size (0/1)"
        ),
        Tensor("MASK_LOGITS", "float32", ("M", "M"), doc="low-res mask logits, letterboxed"),
        Tensor("IOU", "float32", (1,), doc="predicted IoU of REGION_MASK"),
    ),
)

PROMPT_PREPROCESS = ModelSpec(
    name="prompt_preprocess",
    backend="python",
    doc="Validate encoded image tokens and their letterbox transform (this model's dims, dtype, "
    "finite values, the transform of an image this server could have encoded), map the prompts "
    "with that transform, and tokenize LABELS when given.",
    inputs=(
        Tensor("IMAGE_TOKENS", TOKENS_DTYPE, ("K", "W"), doc="from medp_clip_encode, unchanged"),
        Tensor("TRANSFORM", "float32", (5,), doc="from medp_clip_encode, unchanged"),
        *(t for t in PREPROCESS.inputs if t.name not in ("IMAGE", "PIXELS", "WINDOW")),
    ),
    outputs=(
        Tensor("image_tokens", TOKENS_DTYPE, (1, "K", "W")),
        *(t for t in PREPROCESS.outputs if t.name != "pixel_values"),
    ),
)

PYTHON_MODELS = (PREPROCESS, TOKENIZER, POSTPROCESS, PROMPT_PREPROCESS)


# --- ensembles: what clients call ------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    model: str
    input_map: dict[str, str]  # model input -> ensemble tensor
    output_map: dict[str, str]  # model output -> ensemble tensor


# Every check happens in `preprocess`, the first step, before the graph branches: Triton 2.51
# can leave an ensemble request hanging (and the ensemble wedged) when one branch fails while
# another branch of the same request is still running. So `medp_clip` tokenizes its labels in
# `preprocess` too, and the separate tokenizer serves only the text-only ensemble.
def _identity(tensors: tuple[Tensor, ...], skip: tuple[str, ...] = ()) -> dict[str, str]:
    return {t.name: t.name for t in tensors if t.name not in skip}


_IMAGE_INPUTS = tuple(t for t in PREPROCESS.inputs if t.name != "LABELS")
_TEXT_ONLY = ("LABELS", "input_ids", "attention_mask")


def _preprocess_step(with_text: bool) -> Step:
    skip = () if with_text else _TEXT_ONLY
    return Step(
        "preprocess", _identity(PREPROCESS.inputs, skip), _identity(PREPROCESS.outputs, skip)
    )


_ENCODER_STEPS = tuple(
    Step(m.name, _identity(m.inputs), _identity(m.outputs))
    for m in (PROMPT_ENCODER, IMAGE_ENCODER, MASK_DECODER)
)
_TEXT_ENCODER_STEP = Step(
    "text_encoder", _identity(TEXT_ENCODER.inputs), _identity(TEXT_ENCODER.outputs)
)
_IMAGE_OUTPUTS = tuple(
    t for t in POSTPROCESS.outputs if t.name not in ("REGION_PROBS", "IMAGE_PROBS")
)


def _postprocess_step(with_text: bool, outputs: tuple[Tensor, ...]) -> Step:
    inputs = {t.name: t.name for t in POSTPROCESS.inputs if with_text or not t.optional}
    return Step("postprocess", inputs, _identity(outputs))


@dataclass(frozen=True)
class EnsembleSpec(ModelSpec):
    steps: tuple[Step, ...] = ()


MEDP_CLIP = EnsembleSpec(
    name="medp_clip",
    backend="ensemble",
    doc="Image + optional region prompt + candidate labels -> probabilities, embeddings, mask.",
    inputs=PREPROCESS.inputs,
    outputs=POSTPROCESS.outputs,
    steps=(
        _preprocess_step(True),
        *_ENCODER_STEPS,
        _TEXT_ENCODER_STEP,
        _postprocess_step(True, POSTPROCESS.outputs),
    ),
)

MEDP_CLIP_IMAGE = EnsembleSpec(
    name="medp_clip_image",
    backend="ensemble",
    doc="Image + optional region prompt -> embeddings, mask, visual tokens (no labels).",
    inputs=_IMAGE_INPUTS,
    outputs=_IMAGE_OUTPUTS,
    steps=(_preprocess_step(False), *_ENCODER_STEPS, _postprocess_step(False, _IMAGE_OUTPUTS)),
)

MEDP_CLIP_TEXT = EnsembleSpec(
    name="medp_clip_text",
    backend="ensemble",
    doc="Labels -> L2-normalised text embeddings (cache them for repeated label sets).",
    inputs=TOKENIZER.inputs,
    outputs=(Tensor("TEXT_EMBEDDINGS", "float32", ("T", "D")),),
    steps=(
        Step("tokenizer", _identity(TOKENIZER.inputs), _identity(TOKENIZER.outputs)),
        Step("text_encoder", _identity(TEXT_ENCODER.inputs), {"text_embedding": "TEXT_EMBEDDINGS"}),
    ),
)


# --- encode once, prompt many (stateless: the client holds the tokens) ----------------------

MEDP_CLIP_ENCODE = EnsembleSpec(
    name="medp_clip_encode",
    backend="ensemble",
    doc="Image -> trunk tokens and letterbox transform, what medp_clip_prompt needs per prompt.",
    inputs=tuple(t for t in PREPROCESS.inputs if t.name in ("IMAGE", "PIXELS", "WINDOW")),
    outputs=(
        Tensor("IMAGE_TOKENS", TOKENS_DTYPE, ("K", "W"), doc="prompt-free trunk tokens"),
        Tensor("TRANSFORM", "float32", (5,), doc="scale, pad_x, pad_y, height, width"),
    ),
    steps=(
        # preprocess without prompts: its prompt outputs are computed and left unmapped
        Step(
            "preprocess",
            {n: n for n in ("IMAGE", "PIXELS", "WINDOW")},
            {"pixel_values": "pixel_values", "transform": "TRANSFORM"},
        ),
        Step("image_trunk", _identity(IMAGE_TRUNK.inputs), {"image_tokens": "IMAGE_TOKENS"}),
    ),
)


def _prompt_preprocess_step(with_text: bool) -> Step:
    skip = () if with_text else _TEXT_ONLY
    return Step(
        "prompt_preprocess",
        _identity(PROMPT_PREPROCESS.inputs, skip),
        _identity(PROMPT_PREPROCESS.outputs, skip),
    )


_PROMPTED_STEPS = tuple(
    Step(m.name, _identity(m.inputs), _identity(m.outputs))
    for m in (PROMPT_ENCODER, IMAGE_PROMPTED, MASK_DECODER)
)

MEDP_CLIP_PROMPT = EnsembleSpec(
    name="medp_clip_prompt",
    backend="ensemble",
    doc="Encoded image (medp_clip_encode) + optional region prompt + candidate labels -> "
    "what medp_clip returns.",
    inputs=PROMPT_PREPROCESS.inputs,
    outputs=POSTPROCESS.outputs,
    steps=(
        _prompt_preprocess_step(True),
        *_PROMPTED_STEPS,
        _TEXT_ENCODER_STEP,
        _postprocess_step(True, POSTPROCESS.outputs),
    ),
)

MEDP_CLIP_PROMPT_IMAGE = EnsembleSpec(
    name="medp_clip_prompt_image",
    backend="ensemble",
    doc="Encoded image (medp_clip_encode) + optional region prompt -> what medp_clip_image "
    "returns.",
    inputs=tuple(t for t in PROMPT_PREPROCESS.inputs if t.name != "LABELS"),
    outputs=_IMAGE_OUTPUTS,
    steps=(
        _prompt_preprocess_step(False),
        *_PROMPTED_STEPS,
        _postprocess_step(False, _IMAGE_OUTPUTS),
    ),
)

# What clients call: the deployment's list of served entry points (health, canary, probes).
ENSEMBLES = (
    MEDP_CLIP,
    MEDP_CLIP_IMAGE,
    MEDP_CLIP_TEXT,
    MEDP_CLIP_ENCODE,
    MEDP_CLIP_PROMPT,
    MEDP_CLIP_PROMPT_IMAGE,
)
ALL_MODELS: tuple[ModelSpec, ...] = ENCODERS + PYTHON_MODELS + ENSEMBLES


def spec(name: str) -> ModelSpec:
    return next(m for m in ALL_MODELS if m.name == name)
