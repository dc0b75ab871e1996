"""TensorRT engines against ONNX Runtime on the same inputs: the check the export runs before it
writes a repository that serves the engines (and `python -m medpclip_tools.tensorrt_parity`).

Limits, per output and batch row: a vector (embeddings, features, mask logits, region map)
must keep cosine >= COSINE_MIN with ONNX Runtime's; a scalar per row (`iou`, [B, 1]) has no
direction (its cosine is only its sign), so it must stay within SCALAR_ATOL in absolute value.
Both limits hold for FP16 engines and for FP32 ones (TensorRT runs FP32 matrix products in TF32
by default, about FP16's precision on the inputs). They are set from the FP16 precision of the
engines, not measured here: no TensorRT runs on the project's machines.

The comparison itself (`compare`) is plain numpy and is tested everywhere; running the engines
needs TensorRT and polygraphy's runners, on the GPU the engines were built for.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medpclip_core import tensors as T
from medpclip_core.agreement import agreement

from .tensorrt_engine import EngineError, engine_name

COSINE_MIN = 0.999
SCALAR_ATOL = 1e-2  # iou: a score in [0, 1], 1 % of its range


@dataclass(frozen=True)
class Check:
    model: str
    output: str
    inputs: str  # "random" or "real"
    kind: str  # "cosine" (vector rows) or "abs" (a scalar per row)
    value: float  # smallest row cosine, or largest |diff|
    max_abs: float
    ok: bool

    def line(self) -> str:
        limit = f">= {COSINE_MIN}" if self.kind == "cosine" else f"<= {SCALAR_ATOL:g}"
        return (
            f"  {self.model:15s} {self.output:18s} {self.inputs:6s} {self.kind} {self.value:.5f} "
            f"(limit {limit})  max|diff| {self.max_abs:.2e}  {'ok' if self.ok else 'FAIL'}"
        )


def compare(model: str, output: str, inputs: str, got: np.ndarray, want: np.ndarray) -> Check:
    """One output of one model: TensorRT's `got` against ONNX Runtime's `want`, [B, ...]
    (measured as the int8 gate measures, `medpclip_core.agreement`; TensorRT's own limits)."""
    a = agreement(output, got, want)
    if a.kind == "shape":
        return Check(model, output, inputs, "shape", float("nan"), float("nan"), False)
    diff = np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64))
    max_abs = float(diff.max()) if diff.size else 0.0
    ok = a.value >= COSINE_MIN if a.kind == "cosine" else a.value <= SCALAR_ATOL
    return Check(model, output, inputs, a.kind, a.value, max_abs, ok)


def check_engines(
    engines_dir: Path,
    onnx_dir: Path,
    feeds: dict[str, dict[str, dict[str, np.ndarray]]],
    specs: tuple[T.ModelSpec, ...] = T.ENCODERS,
    log: Callable[[str], object] = print,
) -> list[Check]:
    """Run each engine built for this GPU and its ONNX under ONNX Runtime on `feeds`
    (inputs kind -> model -> input arrays) and compare every output. EngineError where TensorRT
    or a plan is missing."""
    try:
        import tensorrt  # noqa: F401  (polygraphy imports it lazily; fail early and clearly)
        from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner
    except ImportError as exc:
        raise EngineError(
            f"TensorRT is not available here ({exc}): run this in NVIDIA's "
            "TensorRT/PyTorch container on the target GPU"
        ) from None
    from .tensorrt_engine import gpu_identity

    _, cc = gpu_identity()
    checks = []
    for spec in specs:
        plan = engines_dir / spec.name / engine_name(cc)
        if not plan.is_file():
            raise EngineError(f"no engine {plan} for this GPU (sm {cc}): build it first")
        trt_runner = TrtRunner(EngineFromBytes(plan.read_bytes()))
        ort_runner = OnnxrtRunner(SessionFromOnnx(str(onnx_dir / f"{spec.name}.onnx")))
        with trt_runner, ort_runner:
            for kind, per_model in feeds.items():
                feed = per_model[spec.name]
                got, want = trt_runner.infer(feed), ort_runner.infer(feed)
                for t in spec.outputs:
                    check = compare(spec.name, t.name, kind, got[t.name], want[t.name])
                    log(check.line())
                    checks.append(check)
    return checks
