"""Zero-shot label scores: softmax over the scaled cosine similarities of one embedding with
every label's text embedding (both L2-normalised by the model)."""

from __future__ import annotations

import numpy as np


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def label_probs(embedding: np.ndarray, text: np.ndarray, logit_scale: float) -> np.ndarray:
    """[D] embedding, [T, D] text embeddings -> float32 [T] probabilities (empty for T = 0)."""
    if len(text) == 0:
        return np.zeros(0, dtype=np.float32)
    return softmax(logit_scale * text @ embedding).astype(np.float32)
