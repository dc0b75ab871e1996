"""Tuning sweep for the CPU flavour: ONNX Runtime threads x encoder instances and the dynamic
batching queue delay, measured with perf_analyzer on the image ensemble, one server per setting.

    python perf/tune.py                       # base config; writes results/tuning-base.md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "perf"))

import perf_analyzer  # noqa: E402

SETTINGS = [  # (ORT intra-op threads, instances per encoder, queue delay us)
    (0, 1, 2000),
    (1, 2, 2000),
    (2, 2, 2000),
    (0, 1, 0),
    (0, 1, 20000),
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python perf/tune.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", default="base")
    p.add_argument("--concurrency-range", default="1:4:3", help="perf_analyzer range")
    p.add_argument("--out", type=Path, default=ROOT / "build" / "tune")
    p.add_argument("--results", type=Path, default=ROOT / "perf" / "results")
    args = p.parse_args(argv)
    from medpclip import export
    from medpclip_tools.serve import TritonServer

    lines = [
        "| ORT threads | instances | queue delay us | concurrency | image /s | p50 ms | p99 ms |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    inputs = None
    for threads, instances, delay in SETTINGS:
        result = export.export(
            config=args.config,
            out=args.out,
            skip_parity=True,
            ort_threads=threads,
            instances=instances,
            queue_delay_us=delay,
        )
        if inputs is None:
            inputs = perf_analyzer.write_inputs(args.out / "inputs", result.checkpoint)
        with TritonServer(args.out / "model_repository") as server:
            rows = perf_analyzer.sweep(
                server.grpc_url, ["medp_clip_image"], inputs, args.out, args.concurrency_range, 4000
            )
        for r in rows:
            line = (
                f"| {threads or 'all'} | {instances} | {delay} | {r['concurrency']} | "
                f"{r['throughput']:.2f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} |"
            )
            lines.append(line)
            print(line, flush=True)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"tuning-{args.config}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
