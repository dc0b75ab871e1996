"""The CPU INT8 flavour against fp32: embedding cosine on real inputs, with ONNX Runtime sessions
on the fp32 and int8 files. (Zero-shot agreement on phantoms: medpclip_tools.evaluate.)"""

from __future__ import annotations

from pathlib import Path

from .model import MedPClip
from .onnx_export import INT8_MODELS, cosine_rows, ort_session
from .real_inputs import real_inputs


def check_int8(model: MedPClip, onnx_dir: Path, tokenizer_json: Path, log=print) -> float:
    """Smallest cosine between fp32 and int8 outputs on real inputs, printed per model."""
    inputs = real_inputs(model, tokenizer_json)
    worst = 1.0
    for name in INT8_MODELS:
        fp32 = ort_session(onnx_dir / f"{name}.onnx").run(None, inputs[name])
        int8 = ort_session(onnx_dir / f"{name}.int8.onnx").run(None, inputs[name])
        cos = min(cosine_rows(a, b) for a, b in zip(fp32, int8, strict=True))
        log(f"  {name:15s} int8 vs fp32: cosine min {cos:.5f}")
        worst = min(worst, cos)
    return worst
