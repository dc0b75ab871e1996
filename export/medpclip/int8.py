"""The CPU INT8 flavour against fp32, where it is exported and where it is served.

At export: every output of every int8 model on real inputs, against the fp32 ONNX file
(`medpclip_core.agreement`: cosine >= 0.99 per row for vectors, |diff| <= 0.02 for a scalar per
row), on this machine's CPU, whose instruction set is logged beside the figures. Zero-shot answer
agreement on phantoms: medpclip_tools.int8_agreement.

Where served: the int8 kernels ONNX Runtime picks depend on the CPU (`medpclip_core.cpu`), so a
repository that agreed on the export machine can drift on another. `write_canaries` puts each
int8 model's real inputs and fp32 outputs beside it (`int8_canary.npz`); the served encoder
(`medpclip_core.backend.onnx_runner`) runs them when it loads and refuses to load on that CPU
when the same rule fails.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medpclip_core import cpu
from medpclip_core.agreement import CANARY_FILE, Agreement, agreement

from .model import MedPClip
from .onnx_export import INT8_MODELS, ort_session
from .real_inputs import real_inputs


@dataclass
class Int8Check:
    """What `check_int8` ran: the real inputs and fp32 outputs per int8 model (the canaries
    are these), and every output's agreement."""

    inputs: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    fp32: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    checks: list[tuple[str, Agreement]] = field(default_factory=list)


def check_int8(model: MedPClip, onnx_dir: Path, tokenizer_json: Path, log=print) -> Int8Check:
    """Every int8 output against fp32 on real inputs, logged per model."""
    inputs = real_inputs(model, tokenizer_json)
    log(f"  int8 kernels of this CPU: {cpu.isa()}")
    found = Int8Check()
    for name in INT8_MODELS:
        fp32_session = ort_session(onnx_dir / f"{name}.onnx")
        names = [o.name for o in fp32_session.get_outputs()]
        fp32 = fp32_session.run(None, inputs[name])
        int8 = ort_session(onnx_dir / f"{name}.int8.onnx").run(None, inputs[name])
        checks = [agreement(n, b, a) for n, a, b in zip(names, fp32, int8, strict=True)]
        bad = [c for c in checks if not c.ok]
        log(f"  {name:15s} int8 vs fp32: " + ", ".join(map(str, checks)) + (" FAIL" if bad else ""))
        found.inputs[name] = inputs[name]
        found.fp32[name] = dict(zip(names, fp32, strict=True))
        found.checks += [(name, c) for c in checks]
    return found


def write_canaries(checked: Int8Check, repository: Path) -> int:
    """`int8_canary.npz` (inputs `in/<name>`, fp32 outputs `out/<name>`, as `check_int8` ran
    them) beside every served int8 model; the number written."""
    written = 0
    for name, feed in checked.inputs.items():
        folder = repository / name / "1"
        if not (folder / "model.onnx").is_file():
            continue
        arrays = {f"in/{k}": v for k, v in feed.items()}
        arrays |= {f"out/{k}": v for k, v in checked.fp32[name].items()}
        np.savez_compressed(folder / CANARY_FILE, **arrays)
        written += 1
    return written
