"""The served pipeline run in-process with the PyTorch model: what the ensemble must return.

Preprocessing (`medpclip_core.inputs.prepare`) and scoring (`medpclip_core.scoring`) are the
same numpy functions the server's python models call; only the four encoders are PyTorch here
instead of ONNX Runtime.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from medpclip_core import imaging
from medpclip_core.inputs import prepare
from medpclip_core.labels import load_tokenizer
from medpclip_core.scoring import label_probs

from .model import MedPClip


@torch.no_grad()
def forward(model: MedPClip, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The image path on numpy inputs named as `ModelInputs.image_arrays()` or `inputs.stack`
    give them -> every output of `MedPClip.forward` as numpy (batch axis kept)."""
    out = model(**{k: torch.from_numpy(v) for k, v in arrays.items()})
    return {k: v.numpy() for k, v in out.items()}


@torch.no_grad()
def embed_text(model: MedPClip, arrays: dict[str, np.ndarray]) -> np.ndarray:
    """Text embeddings [T, D] of `input_ids` and `attention_mask` (`ModelInputs.text_arrays()`,
    `real_inputs.text_batch`)."""
    return model.encode_text(**{k: torch.from_numpy(v) for k, v in arrays.items()}).numpy()


@torch.no_grad()
def run(
    model: MedPClip,
    image: bytes | np.ndarray,
    tokenizer_json: Path,
    points: np.ndarray | None = None,
    point_labels: np.ndarray | None = None,
    box: np.ndarray | None = None,
    mask: np.ndarray | None = None,
    labels: list[str] | None = None,
    window: tuple[float, float] | None = None,
) -> dict[str, np.ndarray]:
    """Outputs named as the `medp_clip` ensemble's. Refuses (InputError) what the server's
    `preprocess` refuses, labels longer than the text context included."""
    cfg = model.cfg
    tok = load_tokenizer(tokenizer_json, cfg.text.context_length) if labels else None
    x = prepare(
        image,
        cfg.vision.image_size,
        cfg.dims.M,
        window=window,
        points=points,
        point_labels=point_labels,
        box=box,
        mask=mask,
        labels=labels or None,
        tokenizer=tok,
    )
    o = {k: v[0] for k, v in forward(model, x.image_arrays()).items()}
    result = {
        "GLOBAL_EMBEDDING": o["global_embedding"],
        "REGION_EMBEDDING": o["region_embedding"],
        "PATCH_FEATURES": o["patch_features"],
        "MASK_LOGITS": o["mask_logits"],
        "REGION_MASK": imaging.mask_from_logits(o["mask_logits"], x.transform),
        "IOU": o["iou"].reshape(1),
    }
    if x.input_ids is not None:
        text = embed_text(model, x.text_arrays())
        scale = float(model.logit_scale.exp())
        result["REGION_PROBS"] = label_probs(o["region_embedding"], text, scale)
        result["IMAGE_PROBS"] = label_probs(o["global_embedding"], text, scale)
    return result
