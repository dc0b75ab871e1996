"""TensorRT vs ONNX Runtime parity per model (polygraphy runners), and end to end through Triton.

    python -m medpclip_tools.tensorrt_parity --out build                  # per engine, this GPU
    python -m medpclip_tools.tensorrt_parity --out build --url HOST:8001  # a served repository

Limits: embeddings (and every other output) cosine >= 0.999 per row; max |diff| is printed.
Needs TensorRT (NVIDIA's containers on the target GPU); elsewhere it says so and exits 1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from medpclip.model import load_checkpoint
from medpclip.onnx_export import cosine_rows
from medpclip.real_inputs import real_inputs
from medpclip.tensorrt_engine import EngineError, engine_name, gpu_identity
from medpclip_core import tensors as T

COSINE_MIN = 0.999


def compare_engines(out: Path, checkpoint: Path) -> bool:
    try:
        import tensorrt  # noqa: F401  (polygraphy imports it lazily; fail early and clearly)
        from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner
    except ImportError as exc:
        raise EngineError(
            f"TensorRT is not available here ({exc}): run this in NVIDIA's "
            "TensorRT/PyTorch container on the target GPU"
        ) from None
    model = load_checkpoint(checkpoint)
    inputs = real_inputs(model, checkpoint / "tokenizer.json")
    _, cc = gpu_identity()
    ok = True
    for spec in T.ENCODERS:
        plan = out / "engines" / spec.name / engine_name(cc)
        feed = inputs[spec.name]
        trt_runner = TrtRunner(EngineFromBytes(plan.read_bytes()))
        ort_runner = OnnxrtRunner(SessionFromOnnx(str(out / "onnx" / f"{spec.name}.onnx")))
        with trt_runner, ort_runner:
            got, want = trt_runner.infer(feed), ort_runner.infer(feed)
        for t in spec.outputs:
            cos = cosine_rows(np.asarray(got[t.name]), np.asarray(want[t.name]))
            diff = float(np.abs(np.asarray(got[t.name]) - np.asarray(want[t.name])).max())
            good = cos >= COSINE_MIN
            ok &= good
            print(
                f"  {spec.name:15s} {t.name:18s} cosine {cos:.5f}  max|diff| {diff:.2e}  "
                f"{'ok' if good else 'FAIL'}"
            )
    return ok


def compare_served(url: str, checkpoint: Path, images: int = 8) -> bool:
    """The served ensemble (any flavour) against the PyTorch reference on phantoms."""
    from medpclip import reference
    from medpclip_client import MedPClipClient, Region

    from .evaluate import centre_point
    from .phantoms import CANONICAL, phantoms, to_dicom

    model = load_checkpoint(checkpoint)
    worst, agree, total = 1.0, 0, 0
    with MedPClipClient(url) as client:
        for i, p in enumerate(phantoms(3000, images)):
            data = to_dicom(p, i)
            for f in p.findings:
                pt = centre_point(f)
                served = client.infer(data, Region(points=[pt]), labels=CANONICAL)
                ref = reference.run(
                    model,
                    data,
                    checkpoint / "tokenizer.json",
                    points=np.array([pt], np.float32),
                    labels=CANONICAL,
                )
                for name, got in (
                    ("REGION_EMBEDDING", served.region_embedding),
                    ("GLOBAL_EMBEDDING", served.global_embedding),
                ):
                    worst = min(worst, cosine_rows(got[None], ref[name][None]))
                agree += int(np.argmax(served.region_probs) == np.argmax(ref["REGION_PROBS"]))
                total += 1
    print(f"  end to end: embedding cosine min {worst:.5f}, top-1 label agreement {agree}/{total}")
    return worst >= COSINE_MIN and agree == total


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m medpclip_tools.tensorrt_parity",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", type=Path, default=Path("build"), help="the export's output folder")
    p.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="checkpoint the ONNX came from (default: the embedded model)",
    )
    p.add_argument("--url", help="also compare a served repository end to end")
    args = p.parse_args(argv)
    from medpclip.export import DEFAULT_CHECKPOINT

    checkpoint = args.checkpoint or DEFAULT_CHECKPOINT
    try:
        ok = compare_engines(args.out, checkpoint)
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.url:
        ok &= compare_served(args.url, checkpoint)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
