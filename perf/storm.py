"""Short deadlines and cancellations of every kind, while honest clients keep asking.

Triton 2.51 segfaults when a request is cancelled while a python-backend model answers it
(server#7368, #8034): 8 of 8 fresh servers died within 12-56 such requests. This storm sends
requests that give up after 1-50 ms in five ways (tritonclient's `client_timeout`, its
`async_infer` + `cancel()`, a cancelled grpc.aio task, and our own sync and asyncio clients with a
short `timeout_s`), while one "honest" client sends ordinary requests and checks each answer
against the one it got before the storm. The server must stay up and ready, and every honest
request must be answered, correctly.

    python perf/storm.py --repository build/model_repository --requests 1000
    python perf/storm.py --url 127.0.0.1:8001 --pid PID --requests 1000
    python perf/storm.py --repository build/model_repository --direct   # bare Triton: crashes

exit codes: 0 the server survived and every honest request was right, 1 otherwise, 2 usage.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

KINDS = ("client_timeout", "async_cancel", "aio_task_cancel", "ours_sync", "ours_async")
LABELS = ["a nodule", "a cyst", "a calcification"]
DEADLINES_S = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05)


@dataclass
class StormReport:
    requests: int = 0
    by_kind: dict[str, dict[str, int]] = field(default_factory=dict)
    honest_ok: int = 0
    honest_failed: int = 0
    honest_wrong: int = 0
    server_alive: bool = True
    ready_after: bool = True
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return (
            self.server_alive
            and self.ready_after
            and self.honest_failed == 0
            and self.honest_wrong == 0
            and self.honest_ok > 0
        )


def _request():
    from medpclip_client import Region
    from medpclip_client.client import Request, prepare

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (160, 240), dtype=np.uint8)
    return prepare(Request(pixels, Region(points=[(60.0, 50.0)]), LABELS))


def _status(exc: BaseException) -> str:
    if isinstance(exc, asyncio.CancelledError):
        return "CANCELLED"
    status = getattr(exc, "status", None)
    text = status() if callable(status) else status
    return str(text or type(exc).__name__).replace("StatusCode.", "")


class _Loop:
    """One event loop in its own thread for every asyncio request: grpc.aio keeps per-loop
    state, and a loop per request (asyncio.run in many threads) leaves it behind noisily."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

    def run(self, coro) -> None:
        asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)


def _abuse(kind: str, url: str, deadline: float, loop: _Loop) -> str:
    """One request of ``kind`` that gives up after ``deadline`` seconds; its outcome."""
    import tritonclient.grpc as grpcclient
    import tritonclient.grpc.aio as aioclient

    from medpclip_client import AsyncMedPClipClient, MedPClipClient, Region

    model, inputs, outputs = _request()
    pixels = np.full((160, 240), 90, np.uint8)
    try:
        if kind == "client_timeout":
            with grpcclient.InferenceServerClient(url) as c:
                c.infer(model.name, inputs, outputs=outputs, client_timeout=deadline)
        elif kind == "async_cancel":
            with grpcclient.InferenceServerClient(url) as c:
                done = threading.Event()
                call = c.async_infer(model.name, inputs, lambda *_: done.set(), outputs=outputs)
                if not done.wait(deadline):
                    call.cancel()
                    return "CANCELLED"
        elif kind == "aio_task_cancel":

            async def cancelled() -> None:
                async with aioclient.InferenceServerClient(url) as c:
                    task = asyncio.ensure_future(c.infer(model.name, inputs, outputs=outputs))
                    await asyncio.sleep(deadline)
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)

            loop.run(cancelled())
            return "CANCELLED"
        elif kind == "ours_sync":
            with MedPClipClient(url, timeout_s=deadline, retries=0) as c:
                c.infer(pixels, Region(points=[(5, 5)]), LABELS)
        else:

            async def ours() -> None:
                async with AsyncMedPClipClient(url, timeout_s=deadline, retries=0) as c:
                    await c.infer(pixels, Region(box=(1, 1, 50, 40)), LABELS)

            loop.run(ours())
    except BaseException as exc:  # noqa: BLE001 - every outcome is counted
        return _status(exc)
    return "OK"


def _honest(url: str, stop: threading.Event, report: StormReport) -> None:
    """Ordinary requests with the client's defaults, each checked against the first answer."""
    from medpclip_client import MedPClipClient, Region

    pixels = np.random.default_rng(1).integers(0, 255, (128, 192), dtype=np.uint8)
    region = Region(points=[(40.0, 30.0)])
    with MedPClipClient(url) as c:
        reference = c.infer(pixels, region, LABELS)
        while not stop.is_set():
            try:
                r = c.infer(pixels, region, LABELS)
            except Exception:  # noqa: BLE001 - counted
                report.honest_failed += 1
                continue
            same = np.allclose(r.region_probs, reference.region_probs, atol=1e-6) and np.allclose(
                r.region_embedding, reference.region_embedding, atol=1e-6
            )
            if same:
                report.honest_ok += 1
            else:
                report.honest_wrong += 1


def storm(
    url: str,
    requests: int = 200,
    concurrency: int = 8,
    seed: int = 0,
    alive=lambda: True,
    ready=lambda: True,
) -> StormReport:
    """Send ``requests`` abusive requests (round-robin over KINDS, random deadlines) with
    ``concurrency`` threads while one honest client runs; ``alive``/``ready`` probe the server
    afterwards."""
    rng = random.Random(seed)
    plan = [(KINDS[i % len(KINDS)], rng.choice(DEADLINES_S)) for i in range(requests)]
    report = StormReport(requests=requests)
    counts: dict[str, collections.Counter] = {k: collections.Counter() for k in KINDS}
    stop = threading.Event()
    honest = threading.Thread(target=_honest, args=(url, stop, report), daemon=True)
    start = time.monotonic()
    honest.start()
    loop = _Loop()
    try:
        with ThreadPoolExecutor(concurrency) as pool:
            futures = [(kind, pool.submit(_abuse, kind, url, d, loop)) for kind, d in plan]
            for kind, fut in futures:
                counts[kind][fut.result()] += 1
        time.sleep(1.0)  # answers of the abandoned requests are still arriving: keep asking
    finally:
        stop.set()
        honest.join(120)
        loop.close()
    report.seconds = time.monotonic() - start
    report.by_kind = {k: dict(v) for k, v in counts.items()}
    report.server_alive = alive()
    report.ready_after = report.server_alive and ready()
    return report


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python perf/storm.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    where = p.add_mutually_exclusive_group()
    where.add_argument("--url", help="a running server's gRPC host:port")
    where.add_argument(
        "--repository",
        type=Path,
        default=Path("build/model_repository"),
        help="start `python -m medpclip_tools.serve` on this repository (default: %(default)s)",
    )
    p.add_argument("--pid", type=int, help="with --url: the server's pid, to check it survived")
    p.add_argument(
        "--direct",
        action="store_true",
        help="with --repository: a bare tritonserver, no gateway (shows the crash it prevents)",
    )
    p.add_argument("--requests", type=int, default=1000, help="abusive requests (default 1000)")
    p.add_argument("--concurrency", type=int, default=8, help="threads (default 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write the report here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.requests < 1 or args.concurrency < 1:
        print("error: --requests and --concurrency must be >= 1", file=sys.stderr)
        return 2
    import os

    from medpclip_tools.serve import ServeProcess, TritonServer

    def pid_alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True

    if args.url:
        alive = (lambda: pid_alive(args.pid)) if args.pid else (lambda: True)
        report = storm(args.url, args.requests, args.concurrency, args.seed, alive)
    elif args.direct:
        with TritonServer(args.repository) as server:
            report = storm(
                server.grpc_url, args.requests, args.concurrency, args.seed, lambda: server.running
            )
    else:
        with ServeProcess(args.repository) as server:
            report = storm(
                server.grpc_url,
                args.requests,
                args.concurrency,
                args.seed,
                lambda: server.running,
                server.ready,
            )
    data = asdict(report) | {"passed": report.passed}
    print(json.dumps(data, indent=2))
    if args.json:
        args.json.write_text(json.dumps(data, indent=2))
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "export"))
    sys.exit(main())
