"""(image or pixels, prompts, labels) -> the model's input arrays and the transform.

The one sequence "decode -> letterbox -> map prompts -> tokenize" that the server's `preprocess`
model, the PyTorch reference, the export's parity and calibration inputs, training, benchmarks
and tests all run, so that "the same preprocessed input" is the same code everywhere.

`prepare_prompt` is its second half for an image encoded once (`medp_clip_encode`): the caller's
trunk tokens and transform, checked, with the prompts mapped and the labels tokenized, as the
server's `prompt_preprocess` model and the reference's `run_prompt` run it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from . import imaging
from .errors import InputError
from .imaging import Prompts, Transform
from .labels import tokenize
from .tensors import MAX_IMAGE_SIDE, MAX_LABELS, TOKENS_DTYPE

Window = tuple[float, float]


@dataclass(frozen=True)
class ModelInputs:
    """One request's model inputs (batch of one), named as `tensors.PREPROCESS` outputs them."""

    pixel_values: np.ndarray  # [1,3,S,S] float32, normalised, letterboxed
    prompts: Prompts  # point_coords [1,N,2], point_labels [1,N], mask_input [1,1,M,M], has_mask
    transform: Transform  # original image -> letterbox (to map prompts and masks back)
    mask_side: int  # M, the low-resolution mask grid of the prompt encoder and mask decoder
    input_ids: np.ndarray | None = None  # [T,L] int64, when labels were given
    attention_mask: np.ndarray | None = None  # [T,L] int64

    def prompt_arrays(self) -> dict[str, np.ndarray]:
        """Inputs of the prompt encoder, by tensor name."""
        p = self.prompts
        return {
            "point_coords": p.point_coords,
            "point_labels": p.point_labels,
            "mask_input": p.mask_input,
            "has_mask": p.has_mask,
        }

    def image_arrays(self) -> dict[str, np.ndarray]:
        """Inputs of the image branch (prompt encoder, image encoder), by tensor name, in the
        order the PyTorch model's forward takes them."""
        return {"pixel_values": self.pixel_values, **self.prompt_arrays()}

    def text_arrays(self) -> dict[str, np.ndarray]:
        """Inputs of the text encoder; empty when no labels were given."""
        if self.input_ids is None:
            return {}
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}

    def arrays(self) -> dict[str, np.ndarray]:
        """Every output of the `preprocess` model, by name (transform included)."""
        return {
            **self.image_arrays(),
            "transform": self.transform.as_array(),
            **self.text_arrays(),
        }

    def with_prompts(
        self,
        points: Any = None,
        point_labels: Any = None,
        box: Any = None,
        mask: Any = None,
    ) -> ModelInputs:
        """The same image with other prompts (several regions of one image: training,
        calibration), without decoding and letterboxing it again."""
        prompts = imaging.map_prompts(
            self.transform, self.mask_side, points, point_labels, box, mask
        )
        return replace(self, prompts=prompts)


def decode(
    image: bytes | np.ndarray, window: Window | None = None, max_side: int = MAX_IMAGE_SIDE
) -> np.ndarray:
    """Encoded file bytes (PNG, JPEG, DICOM Part 10) or raw pixels -> display image [H,W,3] in
    [0, 1]. Pixels outside [0, 255] need a window (centre, width)."""
    if isinstance(image, bytes | bytearray | memoryview):
        return imaging.decode_image(bytes(image), window, max_side)
    return imaging.pixels_to_image(np.asarray(image), window, max_side)


def prepare(
    image: bytes | np.ndarray,
    size: int,
    mask_side: int,
    *,
    window: Window | None = None,
    points: Any = None,
    point_labels: Any = None,
    box: Any = None,
    mask: Any = None,
    labels: Sequence[bytes | str] | None = None,
    tokenizer: Any = None,
    max_side: int = MAX_IMAGE_SIDE,
    max_labels: int = MAX_LABELS,
) -> ModelInputs:
    """Decode, letterbox to `size`, map the prompts (original image pixels, x = column) onto the
    `mask_side` grid, and tokenize `labels` with `tokenizer` (`labels.load_tokenizer`).

    Raises InputError for anything the caller must fix, before any model runs."""
    display = decode(image, window, max_side)
    pixel_values, t = imaging.letterbox(display, size)
    prompts = imaging.map_prompts(t, mask_side, points, point_labels, box, mask)
    ids, attention = _tokens(labels, tokenizer, max_labels)
    return ModelInputs(pixel_values[None], prompts, t, mask_side, ids, attention)


def _tokens(
    labels: Sequence[bytes | str] | None, tokenizer: Any, max_labels: int
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(input_ids, attention_mask) of `labels`, or (None, None) without labels."""
    if labels is None:
        return None, None
    if tokenizer is None:  # a programming error, not the caller's input
        raise TypeError("labels need the tokenizer (labels.load_tokenizer)")
    return tokenize(tokenizer, labels, max_labels)


@dataclass(frozen=True)
class PromptInputs:
    """One prompt on an encoded image (batch of one), named as `tensors.PROMPT_PREPROCESS`
    outputs them."""

    image_tokens: np.ndarray  # [1,K,W] trunk tokens, checked
    prompts: Prompts
    transform: Transform  # as `letterbox` made it for the encoded image
    input_ids: np.ndarray | None = None  # [T,L] int64, when labels were given
    attention_mask: np.ndarray | None = None

    def arrays(self) -> dict[str, np.ndarray]:
        """Every output of the `prompt_preprocess` model, by name."""
        p = self.prompts
        out = {
            "image_tokens": self.image_tokens,
            "point_coords": p.point_coords,
            "point_labels": p.point_labels,
            "mask_input": p.mask_input,
            "has_mask": p.has_mask,
            "transform": self.transform.as_array(),
        }
        if self.input_ids is not None:
            out.update(input_ids=self.input_ids, attention_mask=self.attention_mask)
        return out


def prepare_prompt(
    image_tokens: np.ndarray,
    transform: np.ndarray,
    size: int,
    mask_side: int,
    tokens_shape: tuple[int, int],
    *,
    tokens_dtype: str = TOKENS_DTYPE,
    points: Any = None,
    point_labels: Any = None,
    box: Any = None,
    mask: Any = None,
    labels: Sequence[bytes | str] | None = None,
    tokenizer: Any = None,
    max_side: int = MAX_IMAGE_SIDE,
    max_labels: int = MAX_LABELS,
) -> PromptInputs:
    """Check the trunk tokens (`tokens_shape` = (K, W) of this model, `tokens_dtype`, finite)
    and the letterbox transform (`Transform.from_request`) that `medp_clip_encode` returned,
    map the prompts with that transform and tokenize `labels`, as `prepare` does.

    Raises InputError for anything the caller must fix, before any model runs."""
    tokens = imaging.check_image_tokens(image_tokens, tokens_shape, tokens_dtype)
    t = Transform.from_request(transform, size, max_side)
    prompts = imaging.map_prompts(t, mask_side, points, point_labels, box, mask)
    ids, attention = _tokens(labels, tokenizer, max_labels)
    return PromptInputs(tokens[None], prompts, t, ids, attention)


def stack(items: Sequence[ModelInputs]) -> dict[str, np.ndarray]:
    """Image-branch inputs of several requests as one batch; shorter point lists are padded
    with SAM's "no point" (label -1), as the encoders batch equal shapes only."""
    if not items:
        raise InputError("no inputs to batch")
    n = max(i.prompts.point_coords.shape[1] for i in items)

    def pad(p: Prompts) -> tuple[np.ndarray, np.ndarray]:
        k = n - p.point_coords.shape[1]
        coords = np.concatenate([p.point_coords, np.zeros((1, k, 2), np.float32)], 1)
        labels = np.concatenate([p.point_labels, np.full((1, k), imaging.PAD_LABEL, np.int32)], 1)
        return coords, labels

    padded = [pad(i.prompts) for i in items]
    return {
        "pixel_values": np.concatenate([i.pixel_values for i in items]),
        "point_coords": np.concatenate([c for c, _ in padded]),
        "point_labels": np.concatenate([lab for _, lab in padded]),
        "mask_input": np.concatenate([i.prompts.mask_input for i in items]),
        "has_mask": np.concatenate([i.prompts.has_mask for i in items]),
    }
