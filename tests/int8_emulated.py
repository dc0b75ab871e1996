"""Run under `qemu-x86_64 -cpu Haswell` by tests/test_int8.py: int8 agreement on an AVX2 CPU
without VNNI, where ONNX Runtime's u8 x s8 kernels sum pairs in saturating 16 bits.

    python tests/int8_emulated.py isa
    python tests/int8_emulated.py saturation DIR       # DIR: fp32.onnx, ours.onnx, plain.onnx
    python tests/int8_emulated.py canaries REPOSITORY  # every int8_canary.npz of an export

Prints one JSON object. QEMU's user-mode emulation executes the same ONNX Runtime binary and
answers CPUID as a Haswell would (AVX2, FMA, no AVX-512, no VNNI), so MLAS dispatches to its AVX2
kernels and their 16-bit saturation happens as on real hardware (it reproduced the base model's
0.894 mask-decoder cosine reported from a 2-core AVX2 EPYC to three digits).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

from medpclip_core import cpu
from medpclip_core.agreement import CANARY_FILE, agreement, canary_checks


def session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def main(argv: list[str]) -> dict:
    what = argv[0]
    if what == "isa":
        return {"isa": cpu.isa(), "vnni": cpu.has_vnni()}
    folder = Path(argv[1])
    if what == "saturation":
        x = np.load(folder / "x.npy")
        want = session(folder / "fp32.onnx").run(None, {"x": x})[0]
        out = {}
        for name in ("ours", "plain"):
            got = session(folder / f"{name}.onnx").run(None, {"x": x})[0]
            out[name] = agreement("y", got, want).value
        return out
    if what == "canaries":
        out = {}
        for canary in sorted(folder.glob(f"*/1/{CANARY_FILE}")):
            s = session(canary.parent / "model.onnx")
            checks = canary_checks(str(canary), s.run, [o.name for o in s.get_outputs()])
            out[canary.parent.parent.name] = {c.output: [c.kind, c.value, c.ok] for c in checks}
        return out
    raise SystemExit(f"unknown check {what!r}")


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])))
