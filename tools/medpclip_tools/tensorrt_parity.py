"""TensorRT vs ONNX Runtime parity per model (polygraphy runners), and end to end through Triton.

    python -m medpclip_tools.tensorrt_parity --out build                  # per engine, this GPU
    python -m medpclip_tools.tensorrt_parity --out build --url HOST:8001  # a served repository

Per engine, the export's own check (medpclip.tensorrt_parity, run by `python -m medpclip.export
--flavour tensorrt` before it writes a repository): cosine >= 0.999 per row for vectors, |diff|
<= 0.01 for a scalar per row (iou); max |diff| is printed. End to end: embedding cosine >= 0.999,
IoU within 0.01 and the same top-1 label as the PyTorch model on phantoms. Needs TensorRT
(NVIDIA's containers on the target GPU); elsewhere it says so and exits 1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from medpclip import onnx_export, tensorrt_parity
from medpclip.model import load_checkpoint
from medpclip.onnx_export import cosine_rows
from medpclip.real_inputs import real_inputs
from medpclip.tensorrt_engine import EngineError

COSINE_MIN = tensorrt_parity.COSINE_MIN


def compare_engines(out: Path, checkpoint: Path) -> bool:
    """Every engine built for this GPU under `out/engines` against its ONNX in `out/onnx`, on
    the random and real inputs the export checks with."""
    model = load_checkpoint(checkpoint)
    feeds = {
        "random": {n: ex.sample_inputs(model.cfg) for n, ex in onnx_export.EXPORTABLES.items()},
        "real": real_inputs(model, checkpoint / "tokenizer.json"),
    }
    checks = tensorrt_parity.check_engines(out / "engines", out / "onnx", feeds)
    return all(c.ok for c in checks)


def compare_served(url: str, checkpoint: Path, images: int = 8) -> bool:
    """The served ensemble (any flavour) against the PyTorch reference on phantoms."""
    from medpclip import reference
    from medpclip_client import MedPClipClient, Region

    from .evaluate import centre_point
    from .phantoms import CANONICAL, phantoms, to_dicom

    model = load_checkpoint(checkpoint)
    worst, iou_diff, agree, total = 1.0, 0.0, 0, 0
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
                # one number per region: its error, not a cosine (which would be only its sign)
                iou_diff = max(iou_diff, abs(served.iou - float(ref["IOU"].reshape(-1)[0])))
                agree += int(np.argmax(served.region_probs) == np.argmax(ref["REGION_PROBS"]))
                total += 1
    print(
        f"  end to end: embedding cosine min {worst:.5f}, IoU |diff| max {iou_diff:.2e}, "
        f"top-1 label agreement {agree}/{total}"
    )
    return worst >= COSINE_MIN and iou_diff <= tensorrt_parity.SCALAR_ATOL and agree == total


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
