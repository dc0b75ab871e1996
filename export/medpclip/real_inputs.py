"""Real (not random) inputs for every exported model: a DICOM CT slice from pydicom's bundled
test files, preprocessed exactly as the server does (`medpclip_core.inputs.prepare`), with
point, box and mask prompts, and real labels through the server's tokenizer loader."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medpclip_core.inputs import prepare, stack
from medpclip_core.labels import load_tokenizer, tokenize

from .model import MedPClip
from .reference import forward, trunk

LABELS = ["a round hyperdense nodule", "a dark cyst", "a spiculated mass", "normal tissue"]


def sample_dicom() -> bytes:
    from pydicom.data import get_testdata_file

    return Path(get_testdata_file("CT_small.dcm")).read_bytes()


def image_batch(model: MedPClip) -> dict[str, np.ndarray]:
    """Preprocessed CT slice, twice: a point + box prompt and a mask prompt (batch of 2)."""
    cfg = model.cfg
    x = prepare(sample_dicom(), cfg.vision.image_size, cfg.dims.M)
    h, w = x.transform.height, x.transform.width
    mask = np.zeros((h, w), dtype=np.uint8)
    mask[h // 4 : h // 2, w // 3 : w // 2] = 1
    a = x.with_prompts(
        points=np.array([[w * 0.4, h * 0.5]]),
        box=np.array([w * 0.2, h * 0.3, w * 0.6, h * 0.7]),
    )
    b = x.with_prompts(
        points=np.array([[w * 0.3, h * 0.3], [10, 12]]), point_labels=np.array([1, 0]), mask=mask
    )
    return stack([a, b])


def text_batch(
    tokenizer_json: Path, context_length: int, labels: list[str] = LABELS
) -> dict[str, np.ndarray]:
    """`labels` tokenized as the server's `tokenizer` and `preprocess` models do (padded to the
    model config's `context_length`; InputError for what they refuse, such as a label longer
    than the context)."""
    ids, attention = tokenize(load_tokenizer(tokenizer_json, context_length), labels)
    return {"input_ids": ids, "attention_mask": attention}


def real_inputs(model: MedPClip, tokenizer_json: Path) -> dict[str, dict[str, np.ndarray]]:
    """Inputs per exported model name, the intermediate ones computed by the PyTorch model."""
    img = image_batch(model)
    o = forward(model, img)
    return {
        "prompt_encoder": {
            k: img[k] for k in ("point_coords", "point_labels", "mask_input", "has_mask")
        },
        "image_encoder": {
            "pixel_values": img["pixel_values"],
            "dense_embeddings": o["dense_embeddings"],
            "region_map": o["region_map"],
        },
        "mask_decoder": {
            "patch_features": o["patch_features"],
            "sparse_embeddings": o["sparse_embeddings"],
            "dense_embeddings": o["dense_embeddings"],
        },
        "text_encoder": text_batch(tokenizer_json, model.cfg.text.context_length),
        "image_trunk": {"pixel_values": img["pixel_values"]},
        "image_prompted": {
            "image_tokens": trunk(model, img["pixel_values"]),
            "dense_embeddings": o["dense_embeddings"],
            "region_map": o["region_map"],
        },
    }
