"""What the gateway costs: the same requests through the gateway and to Triton directly, side by
side in one run (alternating, so both see the same machine noise).

    python perf/gateway_overhead.py --repository build/model_repository --requests 200

Prints p50/p99 latency of each path for `medp_clip` (a point prompt and 4 labels) and
`medp_clip_text`, at concurrency 1 and 4, and the ratio gateway / direct.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

LABELS = ["a nodule", "a cyst", "a spiculated mass", "a calcification"]


def _latencies(url: str, call: str, requests: int, concurrency: int) -> list[float]:
    from medpclip_client import MedPClipClient, Region

    pixels = np.random.default_rng(0).integers(0, 255, (256, 256), dtype=np.uint8)
    region = Region(points=[(120.0, 90.0)])

    def one(client: MedPClipClient) -> float:
        t = time.perf_counter()
        if call == "medp_clip":
            client.infer(pixels, region, LABELS)
        else:
            client.text_embeddings(LABELS)
        return time.perf_counter() - t

    with MedPClipClient(url) as client:
        for _ in range(3):
            one(client)  # warm-up
        with ThreadPoolExecutor(concurrency) as pool:
            return list(pool.map(lambda _: one(client), range(requests)))


def _p(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] * 1000


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python perf/gateway_overhead.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--repository", type=Path, default=Path("build/model_repository"))
    p.add_argument("--requests", type=int, default=200, help="per path and setting")
    args = p.parse_args(argv)
    from medpclip_tools.serve import ServeProcess

    with ServeProcess(args.repository) as server:
        print(f"{'call':<15} {'conc':>4} {'path':<8} {'p50 ms':>8} {'p99 ms':>8}")
        for call in ("medp_clip", "medp_clip_text"):
            for concurrency in (1, 4):
                p50 = {}
                # alternate in rounds of 25 so drift hits both paths alike
                runs: dict[str, list[float]] = {"gateway": [], "direct": []}
                for _ in range(max(1, args.requests // 25)):
                    for path, url in (("gateway", server.grpc_url), ("direct", server.triton_url)):
                        runs[path] += _latencies(url, call, 25, concurrency)
                for path, values in runs.items():
                    p50[path] = _p(values, 50)
                    print(
                        f"{call:<15} {concurrency:>4} {path:<8} {p50[path]:>8.2f} "
                        f"{_p(values, 99):>8.2f}"
                    )
                print(f"{'':<15} {'':>4} ratio    {p50['gateway'] / p50['direct']:>8.3f}  "
                      f"(+{p50['gateway'] - p50['direct']:.2f} ms p50)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
