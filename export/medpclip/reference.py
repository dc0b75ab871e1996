"""The served pipeline run in-process with the PyTorch model: what the ensemble must return.

Preprocessing (`medpclip_core.inputs.prepare`, `prepare_prompt`) and scoring
(`medpclip_core.scoring`) are the same numpy functions the server's python models call; only the
encoders are PyTorch here instead of ONNX Runtime. `run` is `medp_clip`; `encode` and
`run_prompt` are `medp_clip_encode` and `medp_clip_prompt`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from medpclip_core import imaging
from medpclip_core import tensors as T
from medpclip_core.inputs import prepare, prepare_prompt
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
def trunk(model: MedPClip, pixel_values: np.ndarray) -> np.ndarray:
    """Trunk tokens [B,K,W] of `pixel_values` [B,3,S,S] in the declared wire dtype."""
    tokens = model.image_encoder.forward_trunk(torch.from_numpy(pixel_values))
    return tokens.numpy().astype(T.TOKENS_DTYPE)


@torch.no_grad()
def encode(
    model: MedPClip, image: bytes | np.ndarray, window: tuple[float, float] | None = None
) -> dict[str, np.ndarray]:
    """Outputs named as the `medp_clip_encode` ensemble's: IMAGE_TOKENS [K,W], TRANSFORM [5]."""
    cfg = model.cfg
    x = prepare(image, cfg.vision.image_size, cfg.dims.M, window=window)
    return {
        "IMAGE_TOKENS": trunk(model, x.pixel_values)[0],
        "TRANSFORM": x.transform.as_array(),
    }


@torch.no_grad()
def run_prompt(
    model: MedPClip,
    image_tokens: np.ndarray,
    transform: np.ndarray,
    tokenizer_json: Path,
    points: np.ndarray | None = None,
    point_labels: np.ndarray | None = None,
    box: np.ndarray | None = None,
    mask: np.ndarray | None = None,
    labels: list[str] | None = None,
) -> dict[str, np.ndarray]:
    """Outputs named as the `medp_clip_prompt` ensemble's (`medp_clip_prompt_image`'s without
    labels) for tokens and transform from `encode`. Refuses (InputError) what the server's
    `prompt_preprocess` refuses."""
    cfg = model.cfg
    tok = load_tokenizer(tokenizer_json, cfg.text.context_length) if labels else None
    x = prepare_prompt(
        image_tokens,
        transform,
        cfg.vision.image_size,
        cfg.dims.M,
        (cfg.dims.K, cfg.dims.W),
        points=points,
        point_labels=point_labels,
        box=box,
        mask=mask,
        labels=labels or None,
        tokenizer=tok,
    )
    p = {k: torch.from_numpy(v) for k, v in x.arrays().items() if k not in ("transform",)}
    sparse, dense, region = model.prompt_encoder(
        p["point_coords"], p["point_labels"], p["mask_input"], p["has_mask"]
    )
    tokens = p["image_tokens"].to(torch.float32)
    global_emb, region_emb, patches = model.image_encoder.forward_prompted(tokens, dense, region)
    masks, iou = model.mask_decoder(patches, sparse, dense)
    return _outputs(
        model,
        {
            "global_embedding": global_emb.numpy()[0],
            "region_embedding": region_emb.numpy()[0],
            "patch_features": patches.numpy()[0],
            "mask_logits": masks.numpy()[0],
            "iou": iou.numpy()[0],
        },
        x.transform,
        x.input_ids,
        x.attention_mask,
    )


def _outputs(
    model: MedPClip,
    o: dict[str, np.ndarray],
    transform: imaging.Transform,
    input_ids: np.ndarray | None,
    attention_mask: np.ndarray | None,
) -> dict[str, np.ndarray]:
    """The ensemble outputs from one item's encoder outputs, as `postprocess` makes them."""
    result = {
        "GLOBAL_EMBEDDING": o["global_embedding"],
        "REGION_EMBEDDING": o["region_embedding"],
        "PATCH_FEATURES": o["patch_features"],
        "MASK_LOGITS": o["mask_logits"],
        "REGION_MASK": imaging.mask_from_logits(o["mask_logits"], transform),
        "IOU": o["iou"].reshape(1),
    }
    if input_ids is not None:
        text = embed_text(model, {"input_ids": input_ids, "attention_mask": attention_mask})
        scale = float(model.logit_scale.exp())
        result["REGION_PROBS"] = label_probs(o["region_embedding"], text, scale)
        result["IMAGE_PROBS"] = label_probs(o["global_embedding"], text, scale)
    return result


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
    return _outputs(model, o, x.transform, x.input_ids, x.attention_mask)
