"""How close an int8 model's outputs are to its fp32 original's, per output.

The one rule the export's int8 gate and the served int8 encoders' start-up canary
(`backend/onnx_runner.py`) both apply: a vector per batch row (embeddings, features, mask
logits) must keep cosine >= MIN_COSINE with fp32's in every row; a scalar per row (`iou`,
[B, 1]) has no direction, its cosine would only compare signs, so it must stay within
SCALAR_ATOL in absolute value.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

CANARY_FILE = "int8_canary.npz"  # beside an int8 model.onnx: real inputs, fp32 outputs
MIN_COSINE = 0.99  # int8 vs fp32, every vector output on real inputs
SCALAR_ATOL = 0.02  # iou, a score in [0, 1]: 2 % of its range


@dataclass(frozen=True)
class Agreement:
    output: str
    kind: str  # "cosine" or "abs"
    value: float  # smallest row cosine, or largest |diff|

    @property
    def ok(self) -> bool:
        if self.kind == "cosine":
            return self.value >= MIN_COSINE
        return self.value <= SCALAR_ATOL

    def __str__(self) -> str:
        limit = f">= {MIN_COSINE}" if self.kind == "cosine" else f"<= {SCALAR_ATOL:g}"
        return f"{self.output} {self.kind} {self.value:.5f} ({limit})"


def agreement(output: str, got: np.ndarray, want: np.ndarray) -> Agreement:
    """`got` (int8) against `want` (fp32), both [B, ...]."""
    g = np.asarray(got, np.float64).reshape(len(got), -1)
    w = np.asarray(want, np.float64).reshape(len(want), -1)
    if g.shape != w.shape:
        return Agreement(output, "shape", float("nan"))
    if g.shape[1] == 1:
        return Agreement(output, "abs", float(np.abs(g - w).max()) if g.size else 0.0)
    ng, nw = np.linalg.norm(g, axis=1), np.linalg.norm(w, axis=1)
    cos = np.where((ng == 0) & (nw == 0), 1.0, (g * w).sum(1) / np.maximum(ng * nw, 1e-30))
    return Agreement(output, "cosine", float(cos.min()) if cos.size else 1.0)


def canary_checks(
    path: str, run: Callable[[list[str], dict[str, np.ndarray]], list], outputs: Sequence[str]
) -> list[Agreement]:
    """Run an int8 model (`run(output_names, feed)`, e.g. an ONNX Runtime session's `run`) on
    the canary at `path` (`in/<input>` arrays and its fp32 original's `out/<output>`), and
    judge each of `outputs` the canary holds."""
    with np.load(path) as data:
        feed = {k[3:]: data[k] for k in data.files if k.startswith("in/")}
        want = {k[4:]: data[k] for k in data.files if k.startswith("out/")}
    names = [n for n in outputs if n in want]
    got = run(names, feed)
    return [agreement(n, g, want[n]) for n, g in zip(names, got, strict=True)]
