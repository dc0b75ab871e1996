"""The TensorRT parity rules (medpclip.tensorrt_parity), on arrays: what the export's gate and
`python -m medpclip_tools.tensorrt_parity` accept. Running engines needs TensorRT
(tests/test_tensorrt.py, skipped where it cannot be installed)."""

from __future__ import annotations

import numpy as np
import pytest

from medpclip import tensorrt_parity
from medpclip_core import tensors as T


def test_scalars_are_compared_by_absolute_error():
    """iou is one number per row: its cosine with the reference is only its sign, so a wrong
    value of the right sign passed before; now its absolute error decides."""
    want = np.array([[0.10], [0.80]], np.float32)
    wrong = np.array([[0.90], [0.80]], np.float32)  # cosine 1.0 per row
    check = tensorrt_parity.compare("mask_decoder", "iou", "real", wrong, want)
    assert (check.kind, check.ok) == ("abs", False) and check.value == pytest.approx(0.8)
    close = want + np.float32(tensorrt_parity.SCALAR_ATOL / 2)
    assert tensorrt_parity.compare("mask_decoder", "iou", "real", close, want).ok
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(3, 64)).astype(np.float32)
    noisy = emb + rng.normal(scale=1e-3, size=emb.shape).astype(np.float32)
    vector = tensorrt_parity.compare("image_encoder", "global_embedding", "real", noisy, emb)
    assert (vector.kind, vector.ok) == ("cosine", True)
    flipped = emb.copy()
    flipped[1] *= -1
    assert not tensorrt_parity.compare("image_encoder", "x", "real", flipped, emb).ok
    zeros = np.zeros((2, 4), np.float32)
    assert tensorrt_parity.compare("m", "x", "real", zeros, zeros).ok
    assert not tensorrt_parity.compare("m", "x", "real", zeros, np.ones((2, 4))).ok
    assert not tensorrt_parity.compare("m", "x", "real", zeros, np.zeros((3, 4))).ok
    # the declaration agrees: the scalar outputs are exactly those declared with one value
    scalars = {(s.name, t.name) for s in T.ENCODERS for t in s.outputs if t.shape == (1,)}
    assert scalars == {("mask_decoder", "iou")}
