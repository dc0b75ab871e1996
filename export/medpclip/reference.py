"""The served pipeline run in-process with the PyTorch model: what the ensemble must return.

Preprocessing and postprocessing are the same numpy functions the server's python models call;
only the four encoders are PyTorch here instead of ONNX Runtime.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from medpclip_core import imaging

from .model import MedPClip
from .real_inputs import text_batch


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


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
    """Outputs named as the `medp_clip` ensemble's."""
    cfg = model.cfg
    if isinstance(image, bytes):
        display = imaging.decode_image(image, window)
    else:
        display = imaging.pixels_to_image(image, window)
    pixels, t = imaging.letterbox(display, cfg.vision.image_size)
    p = imaging.map_prompts(t, cfg.dims.M, points, point_labels, box, mask)
    out = model(
        torch.from_numpy(pixels[None]),
        torch.from_numpy(p.point_coords),
        torch.from_numpy(p.point_labels),
        torch.from_numpy(p.mask_input),
        torch.from_numpy(p.has_mask),
    )
    o = {k: v[0].numpy() for k, v in out.items()}
    result = {
        "GLOBAL_EMBEDDING": o["global_embedding"],
        "REGION_EMBEDDING": o["region_embedding"],
        "PATCH_FEATURES": o["patch_features"],
        "MASK_LOGITS": o["mask_logits"],
        "REGION_MASK": imaging.mask_from_logits(o["mask_logits"], t),
        "IOU": o["iou"].reshape(1),
    }
    if labels:
        tb = text_batch(tokenizer_json, cfg.text.context_length, labels)
        text = model.encode_text(
            torch.from_numpy(tb["input_ids"]), torch.from_numpy(tb["attention_mask"])
        ).numpy()
        scale = float(model.logit_scale.exp())
        result["REGION_PROBS"] = softmax(scale * text @ o["region_embedding"])
        result["IMAGE_PROBS"] = softmax(scale * text @ o["global_embedding"])
    return result
