"""Real (not random) inputs for every exported model: a DICOM CT slice from pydicom's bundled
test files, preprocessed exactly as the server does, with point, box and mask prompts, and real
labels through the real tokenizer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from medpclip_core import imaging

from .model import MedPClip
from .tokenizer import load_tokenizer

LABELS = ["a round hyperdense nodule", "a dark cyst", "a spiculated mass", "normal tissue"]


def sample_dicom() -> bytes:
    from pydicom.data import get_testdata_file

    return Path(get_testdata_file("CT_small.dcm")).read_bytes()


def image_batch(model: MedPClip) -> dict[str, np.ndarray]:
    """Preprocessed CT slice, twice: a point + box prompt and a mask prompt (batch of 2)."""
    cfg = model.cfg
    image = imaging.decode_dicom(sample_dicom())
    pixels, t = imaging.letterbox(image, cfg.vision.image_size)
    h, w = image.shape[:2]
    mask = np.zeros((h, w), dtype=np.uint8)
    mask[h // 4 : h // 2, w // 3 : w // 2] = 1
    a = imaging.map_prompts(
        t,
        cfg.dims.M,
        points=np.array([[w * 0.4, h * 0.5]]),
        box=np.array([w * 0.2, h * 0.3, w * 0.6, h * 0.7]),
    )
    b = imaging.map_prompts(
        t,
        cfg.dims.M,
        points=np.array([[w * 0.3, h * 0.3], [10, 12]]),
        point_labels=np.array([1, 0]),
        mask=mask,
    )
    # same number of points in both, as the encoder batches equal shapes
    n = max(a.point_coords.shape[1], b.point_coords.shape[1])

    def pad(p: imaging.Prompts) -> tuple[np.ndarray, np.ndarray]:
        k = n - p.point_coords.shape[1]
        coords = np.concatenate([p.point_coords, np.zeros((1, k, 2), np.float32)], 1)
        labels = np.concatenate([p.point_labels, -np.ones((1, k), np.int32)], 1)
        return coords, labels

    (ca, la), (cb, lb) = pad(a), pad(b)
    return {
        "pixel_values": np.stack([pixels, pixels]),
        "point_coords": np.concatenate([ca, cb]),
        "point_labels": np.concatenate([la, lb]),
        "mask_input": np.concatenate([a.mask_input, b.mask_input]),
        "has_mask": np.concatenate([a.has_mask, b.has_mask]),
    }


def text_batch(
    tokenizer_json: Path, context_length: int, labels: list[str] = LABELS
) -> dict[str, np.ndarray]:
    enc = load_tokenizer(tokenizer_json, context_length).encode_batch(labels)
    return {
        "input_ids": np.array([e.ids for e in enc], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64),
    }


def real_inputs(model: MedPClip, tokenizer_json: Path) -> dict[str, dict[str, np.ndarray]]:
    """Inputs per exported model name, the intermediate ones computed by the PyTorch model."""
    img = image_batch(model)
    with torch.no_grad():
        out = model(
            *(
                torch.from_numpy(img[k])
                for k in ("pixel_values", "point_coords", "point_labels", "mask_input", "has_mask")
            )
        )
    o = {k: v.numpy() for k, v in out.items()}
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
    }
