"""Soak test: hold a MedP-CLIP server at saturation for N minutes, count failed requests and
measure how the server's memory grows.

    .venv/bin/python perf/soak.py --minutes 30                          # own server
    .venv/bin/python perf/soak.py --minutes 30 --url HOST:8001 --pid PID  # a running one

Short load tests (locust, perf_analyzer) show speed; leaks, slow fragmentation, a stub that dies
after hours or a request mixed up with another under concurrency only show in a long run with
the real client and a real mix of requests. Run `--help` for what is measured and judged.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from medpclip_client import MedPClipClient, MedPClipError, Region

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_REPOSITORY = ROOT / "build" / "model_repository"
TARGET_FAILED = 0
TARGET_GROWTH_PCT = 5.0
MB = 1024 * 1024

# The label set real users send again and again (the response cache answers the text half), and
# the vocabulary "fresh" label sets are drawn from (each one new to the server and its cache).
LABELS = ["a lung nodule", "a cyst", "a calcification", "normal soft tissue"]
LONG_LABELS = LABELS + [
    "a hypodense lesion",
    "a hyperdense lesion",
    "a vessel",
    "bone",
    "air",
    "fat",
    "a metastasis",
    "an abscess",
]
_WORDS = ["small", "large", "irregular", "round", "hypodense", "enhancing", "calcified", "cystic"]
_NOUNS = ["lesion", "mass", "nodule", "opacity", "collection", "focus", "density", "structure"]
_FRESH = itertools.count()  # next() is atomic under the GIL: labels never repeat across threads

PROB_TOLERANCE = 1e-3  # float32 softmax over <= 64 labels sums to 1 well within this
NORM_TOLERANCE = 1e-3
# Same request twice must give the same answer; a looser bound than float noise from different
# dynamic batch compositions, far tighter than another request's answer (a mix-up).
REPEAT_TOLERANCE = 1e-3


# --------------------------------------------------------------------------------------------
# Inputs: real images, prompts, and the checks every answer must pass
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One input image as a client sends it."""

    name: str
    data: bytes
    shape: tuple[int, int]  # rows, cols of the original image
    window: tuple[float, float] | None = None

    def regions(self) -> dict[str, Region]:
        """The prompts sent with this image, in its own pixel coordinates."""
        rows, cols = self.shape
        cx, cy = cols / 2, rows / 2
        yy, xx = np.mgrid[:rows, :cols]
        disk = ((yy - cy) ** 2 + (xx - cx) ** 2 < (min(rows, cols) / 5) ** 2).astype(np.uint8)
        return {
            "point": Region(points=[(cx, cy)]),
            "point+background": Region(
                points=[(cx, cy), (cols / 8, rows / 8)], point_labels=[1, 0]
            ),
            "box": Region(box=(cols / 4, rows / 4, 3 * cols / 4, 3 * rows / 4)),
            "mask": Region(mask=disk),
        }


def dicom_case() -> Case:
    """pydicom's CT_small.dcm as file bytes (the server decodes it), soft-tissue window."""
    import pydicom
    from pydicom.data import get_testdata_file

    path = get_testdata_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    return Case("CT_small.dcm", Path(path).read_bytes(), (int(ds.Rows), int(ds.Columns)), (40, 400))


def png_case() -> Case:
    """The same slice windowed and cropped to a non-square PNG (exercises letterboxing)."""
    import pydicom
    from PIL import Image
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    hu = ds.pixel_array * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
    grey = np.clip((hu - (40 - 200)) / 400 * 255, 0, 255).astype(np.uint8)[:, 14:114]
    buf = io.BytesIO()
    Image.fromarray(grey).save(buf, format="PNG")
    return Case("CT_small.png", buf.getvalue(), grey.shape)


class BadAnswer(Exception):
    """An answer that arrived but is wrong (shape, probabilities, norms, changed)."""


def _check_probs(p: np.ndarray | None, n: int, what: str) -> None:
    if p is None or p.shape != (n,):
        raise BadAnswer(f"{what}: shape {None if p is None else p.shape}, want ({n},)")
    if not np.all(np.isfinite(p)) or p.min() < 0 or abs(float(p.sum()) - 1) > PROB_TOLERANCE:
        raise BadAnswer(f"{what}: not a distribution (sum {float(p.sum()):.6f})")


def _check_unit_rows(e: np.ndarray, what: str) -> None:
    norms = np.linalg.norm(np.atleast_2d(e), axis=-1)
    if not np.all(np.abs(norms - 1) < NORM_TOLERANCE):
        raise BadAnswer(f"{what}: not L2-normalised (norms {norms.min():.4f}..{norms.max():.4f})")


def check_result(r: Any, case: Case, labels: Sequence[str] | None) -> None:
    """Raise BadAnswer unless an image answer has the declared shapes and sane values."""
    if labels:
        _check_probs(r.region_probs, len(labels), "REGION_PROBS")
        _check_probs(r.image_probs, len(labels), "IMAGE_PROBS")
    elif r.region_probs is not None:
        raise BadAnswer("probabilities returned without labels")
    if r.mask.shape != case.shape:
        raise BadAnswer(f"mask shape {r.mask.shape}, want {case.shape} (the image's)")
    if r.global_embedding.ndim != 1 or r.region_embedding.shape != r.global_embedding.shape:
        raise BadAnswer(f"embedding shapes {r.global_embedding.shape}, {r.region_embedding.shape}")
    _check_unit_rows(r.global_embedding, "GLOBAL_EMBEDDING")
    _check_unit_rows(r.region_embedding, "REGION_EMBEDDING")
    if not np.isfinite(r.iou) or r.patch_features.ndim != 2:
        raise BadAnswer(f"IOU {r.iou} or PATCH_FEATURES shape {r.patch_features.shape}")


def check_text(e: np.ndarray, n: int) -> None:
    """Raise BadAnswer unless text embeddings are [n, D] and unit rows."""
    if e.ndim != 2 or e.shape[0] != n:
        raise BadAnswer(f"TEXT_EMBEDDINGS shape {e.shape}, want ({n}, D)")
    _check_unit_rows(e, "TEXT_EMBEDDINGS")


class References:
    """The first answer to each repeated request; later answers must match it. Catches answers
    swapped between concurrent requests, which shape checks alone cannot see."""

    def __init__(self) -> None:
        self._seen: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()

    def check(self, key: str, value: np.ndarray) -> None:
        with self._lock:
            ref = self._seen.setdefault(key, np.array(value, copy=True))
        if ref.shape != value.shape or not np.allclose(ref, value, atol=REPEAT_TOLERANCE):
            raise BadAnswer(f"{key}: answer differs from the first answer to the same request")


# --------------------------------------------------------------------------------------------
# The task mix
# --------------------------------------------------------------------------------------------


@dataclass
class Context:
    """What a task needs: a client of its own, inputs, references, a random source."""

    client: MedPClipClient
    cases: Sequence[Case]
    refs: References
    rng: random.Random


def _classify(ctx: Context, prompt: str) -> None:
    case = ctx.rng.choice(ctx.cases)
    r = ctx.client.infer(case.data, case.regions()[prompt], labels=LABELS, window=case.window)
    check_result(r, case, LABELS)
    ctx.refs.check(f"medp_clip {case.name} {prompt}", r.region_probs)


def task_point(ctx: Context) -> None:
    _classify(ctx, ctx.rng.choice(["point", "point+background"]))


def task_box(ctx: Context) -> None:
    _classify(ctx, "box")


def task_mask(ctx: Context) -> None:
    _classify(ctx, "mask")


def task_image(ctx: Context) -> None:
    """Embeddings and a mask only (`medp_clip_image`), as retrieval and segmentation use it."""
    case = ctx.rng.choice(ctx.cases)
    prompt = ctx.rng.choice(["point", "box"])
    r = ctx.client.infer(case.data, case.regions()[prompt], window=case.window)
    check_result(r, case, None)
    ctx.refs.check(f"medp_clip_image {case.name} {prompt}", r.region_embedding)


def task_text_repeated(ctx: Context) -> None:
    labels = ctx.rng.choice([LABELS, LONG_LABELS])
    e = ctx.client.text_embeddings(labels)
    check_text(e, len(labels))
    ctx.refs.check(f"medp_clip_text {len(labels)} labels", e)


def task_text_fresh(ctx: Context) -> None:
    """Labels the server has never seen: a response-cache miss and a new cache entry."""
    labels = [
        f"a {ctx.rng.choice(_WORDS)} {ctx.rng.choice(_NOUNS)} number {next(_FRESH)}"
        for _ in range(ctx.rng.randint(1, 8))
    ]
    check_text(ctx.client.text_embeddings(labels), len(labels))


@dataclass(frozen=True)
class Task:
    name: str
    weight: float
    run: Callable[[Context], None]


# Weights: region classification dominates real use; embeddings-only and label-set embedding
# calls are frequent; brand-new label sets are the exception ("sometimes").
TASKS = (
    Task("medp_clip point", 3, task_point),
    Task("medp_clip box", 2, task_box),
    Task("medp_clip mask", 1, task_mask),
    Task("medp_clip_image", 2, task_image),
    Task("medp_clip_text repeated", 2, task_text_repeated),
    Task("medp_clip_text fresh", 0.5, task_text_fresh),
)


# --------------------------------------------------------------------------------------------
# Recording requests
# --------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    task: str
    start: float  # seconds since the run began
    latency: float  # seconds
    status: str | None  # None = ok; else the gRPC status ("UNAVAILABLE"), BAD_ANSWER, ...


class Recorder:
    """Thread-safe log of every request, plus the first few messages of each failure kind."""

    def __init__(self) -> None:
        self.outcomes: list[Outcome] = []
        self.examples: dict[str, list[str]] = {}
        self._lock = threading.Lock()

    def add(self, outcome: Outcome, message: str = "") -> None:
        with self._lock:
            self.outcomes.append(outcome)
            if outcome.status is not None:
                seen = self.examples.setdefault(outcome.status, [])
                if len(seen) < 3:
                    seen.append(f"{outcome.task}: {message}"[:300])

    def snapshot(self) -> list[Outcome]:
        with self._lock:
            return list(self.outcomes)


def classify_error(exc: Exception) -> str:
    """The failure kind of an exception: the gRPC status without its prefix when there is one."""
    if isinstance(exc, BadAnswer):
        return "BAD_ANSWER"
    if isinstance(exc, MedPClipError):
        return exc.status.removeprefix("StatusCode.") if exc.status else "CLIENT_ERROR"
    return type(exc).__name__


def worker(
    url: str,
    cfg: Config,
    cases: Sequence[Case],
    refs: References,
    rec: Recorder,
    stop: threading.Event,
    t0: float,
    seed: int,
) -> None:
    """Send requests back to back until `stop`; one client (one gRPC channel) per worker, like
    independent callers. retries=0: a soak must see every UNAVAILABLE, not have it hidden."""
    rng = random.Random(seed)
    weights = [t.weight for t in TASKS]
    with MedPClipClient(url, timeout_s=cfg.timeout_s, retries=0, headers=cfg.headers) as client:
        ctx = Context(client, cases, refs, rng)
        while not stop.is_set():
            task = rng.choices(TASKS, weights)[0]
            start = time.monotonic()
            try:
                task.run(ctx)
            except Exception as exc:  # every failure is counted, none stops the soak
                rec.add(
                    Outcome(task.name, start - t0, time.monotonic() - start, classify_error(exc)),
                    str(exc),
                )
                stop.wait(0.1)  # a dead server must not turn the client into a busy loop
                continue
            rec.add(Outcome(task.name, start - t0, time.monotonic() - start, None))


# --------------------------------------------------------------------------------------------
# Server memory: RSS summed over the process tree
# --------------------------------------------------------------------------------------------


def _label(proc: psutil.Process) -> str:
    """A readable name: argv[0]'s base name, plus `-m module` for python launchers (the
    kernel's comm name truncates the backend stub to 15 characters)."""
    try:
        argv = proc.cmdline()
    except (psutil.Error, OSError):
        argv = []
    if not argv:
        try:
            return proc.name()
        except psutil.Error:
            return "?"
    name = os.path.basename(argv[0])
    if len(argv) > 2 and argv[1] == "-m":
        name += f" -m {argv[2]}"
    return name


@dataclass
class MemorySample:
    t: float  # seconds since the run began
    rss: int  # bytes, summed over the tree
    processes: int
    by_name: dict[str, dict[str, float]] = field(default_factory=dict)
    pids: frozenset[int] = frozenset()
    cache: dict[str, float] | None = None  # Triton's response-cache gauges, at both ends


def memory_sample(pid: int, t: float) -> MemorySample | None:
    """RSS of `pid` and all its descendants (launcher, gateway, tritonserver, backend stubs);
    None once `pid` is gone. Shared pages (libraries, shm) count once per process that maps
    them: this is an upper bound, but a steady one, which is what growth needs."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return None
    total, count, names, pids = 0, 0, {}, set()
    for p in procs:
        try:
            rss = p.memory_info().rss
        except psutil.Error:  # a child that exited between listing and reading
            continue
        total, count = total + rss, count + 1
        pids.add(p.pid)
        entry = names.setdefault(_label(p), {"count": 0, "rss_mb": 0.0})
        entry["count"] += 1
        entry["rss_mb"] = round(entry["rss_mb"] + rss / MB, 1)
    return MemorySample(t, total, count, names, frozenset(pids))


# Triton's response cache (the text ensemble's) fills with every new label set until its size
# is reached: bounded growth that is not a leak, so it is measured apart.
CACHE_GAUGES = ("nv_cache_num_entries", "nv_cache_util", "nv_cache_num_evictions")


def scrape_cache(metrics_url: str) -> dict[str, float] | None:
    """The global response-cache gauges from Triton's Prometheus page, None if unreadable."""
    try:
        with urllib.request.urlopen(metrics_url, timeout=5) as r:
            text = r.read().decode("utf-8", "replace")
    except OSError:
        return None
    found = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in CACHE_GAUGES:
            found[name] = float(value)
    return found or None


def cache_size_bytes() -> int | None:
    """The response-cache size every deployment passes to tritonserver (medpclip_tools.deployment);
    None when that module is not importable here."""
    try:
        from medpclip_tools.deployment import SERVER_FLAGS
    except ImportError:
        return None
    for flag in SERVER_FLAGS:
        found = re.search(r"--cache-config=local,size=(\d+)", flag)
        if found:
            return int(found.group(1))
    return None


def cache_stats(start: MemorySample | None, end: MemorySample | None) -> dict[str, Any] | None:
    """Response-cache entries and fill after warm-up, and the RSS growth left without it."""
    if start is None or end is None or not start.cache or not end.cache:
        return None
    a, b = start.cache, end.cache
    size = cache_size_bytes()
    filled = None
    if size is not None and "nv_cache_util" in a and "nv_cache_util" in b:
        filled = (b["nv_cache_util"] - a["nv_cache_util"]) * size
    return {
        "entries_start": a.get("nv_cache_num_entries"),
        "entries_end": b.get("nv_cache_num_entries"),
        "evictions_end": b.get("nv_cache_num_evictions"),
        "util_start": a.get("nv_cache_util"),
        "util_end": b.get("nv_cache_util"),
        "size_mb": None if size is None else round(size / MB, 1),
        "filled_mb": None if filled is None else round(filled / MB, 2),
        "growth_pct_without_cache": None
        if filled is None
        else round((end.rss - start.rss - filled) / start.rss * 100, 2),
    }


# --------------------------------------------------------------------------------------------
# A server of our own (--repository)
# --------------------------------------------------------------------------------------------


def ensure_repository(repository: Path) -> None:
    """Export the embedded default model when the default repository is missing."""
    if repository.is_dir():
        return
    print(f"soak: {repository} missing; exporting the default model", flush=True)
    out = repository.parent
    subprocess.run([sys.executable, "-m", "medpclip.export", "--out", str(out)], check=True)


@contextmanager
def managed(cfg: Config, report: dict[str, Any]) -> Iterator[tuple[str, int]]:
    """(url, launcher pid) of a server we start; its stop's exit code lands in `report`."""
    assert cfg.repository is not None
    ensure_repository(cfg.repository)
    log = cfg.server_log or Path(tempfile.mkstemp(prefix="soak-server-", suffix=".log")[1])
    from medpclip_tools.deployment import DRAIN_S
    from medpclip_tools.serve import ServeProcess

    # the launcher's own stop sequence, drain included, as a deployment stops it
    server = ServeProcess(
        cfg.repository, log_file=log, drain_s=DRAIN_S, startup_timeout=cfg.startup_s
    )
    print(f"soak: starting {' '.join(server.command())} (log: {log})", flush=True)
    server.start()
    report["server"] = {"command": server.command(), "log": str(log)}
    cfg.metrics_url = cfg.metrics_url or server.metrics_url
    try:
        yield server.grpc_url, server.pid
    finally:
        code = server.stop(cfg.stop_s)
        report["server"]["exit_code"] = code
        print(f"soak: server stopped, exit code {code}", flush=True)


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


@dataclass
class Config:
    minutes: float
    concurrency: int
    warmup_s: float
    interval_s: float
    timeout_s: float
    seed: int
    headers: dict[str, str]
    url: str | None = None
    pid: int | None = None
    repository: Path | None = None
    server_log: Path | None = None  # None: a temporary file, made when the server starts
    startup_s: float = 300.0
    stop_s: float = 60.0
    max_growth_pct: float = TARGET_GROWTH_PCT
    metrics_url: str | None = None  # Triton's /metrics, for the response cache

    @property
    def duration_s(self) -> float:
        return self.minutes * 60


class Interrupted(Exception):
    """SIGTERM while soaking: stop, report what was measured."""


def sample_memory(
    pid: int, cfg: Config, t0: float, stop: threading.Event
) -> tuple[list[MemorySample], MemorySample | None, MemorySample | None, str | None]:
    """Sample the tree every `interval_s` until the run's end (the main thread's job while the
    workers load the server). Returns (samples, baseline at the end of warm-up, end sample,
    why it stopped early or None)."""
    samples: list[MemorySample] = []
    baseline = end_sample = None
    next_t, warm_t, end_t = 0.0, cfg.warmup_s, cfg.duration_s
    while True:
        now = time.monotonic() - t0
        is_base = baseline is None and now >= warm_t
        is_end = now >= end_t
        if is_base or is_end or now >= next_t:
            s = memory_sample(pid, round(now, 2))
            if s is None:
                return samples, baseline, end_sample, f"server process {pid} is gone"
            if (is_base or is_end) and cfg.metrics_url:
                s.cache = scrape_cache(cfg.metrics_url)
            samples.append(s)
            baseline = s if is_base else baseline
            if is_end:
                return samples, baseline, s, None
            next_t = now + cfg.interval_s
        wake = min(next_t, end_t, warm_t if baseline is None else end_t)
        try:
            stop.wait(max(0.0, wake - (time.monotonic() - t0)))
        except (KeyboardInterrupt, Interrupted):
            return samples, baseline, end_sample, "interrupted"


def soak(url: str, pid: int, cfg: Config) -> dict[str, Any]:
    """Run the workers for the configured time and return the measurements."""
    cases = [dicom_case(), png_case()]
    refs, rec, stop = References(), Recorder(), threading.Event()
    t0 = time.monotonic()
    threads = [
        threading.Thread(
            target=worker, args=(url, cfg, cases, refs, rec, stop, t0, cfg.seed + i), daemon=True
        )
        for i in range(cfg.concurrency)
    ]
    for t in threads:
        t.start()
    samples, baseline, end_sample, early = sample_memory(pid, cfg, t0, stop)
    stopped_at = time.monotonic() - t0
    stop.set()
    for t in threads:  # in-flight requests finish (never cancelled: Triton 2.51 crashes on it)
        t.join(cfg.timeout_s + 5)
    return {
        "requests": request_stats(rec, cfg.warmup_s, stopped_at),
        "memory": memory_stats(samples, baseline, end_sample),
        "stopped_early": early,
        "elapsed_s": round(stopped_at, 1),
    }


# --------------------------------------------------------------------------------------------
# Numbers and targets
# --------------------------------------------------------------------------------------------


def _latency_ms(latencies: Sequence[float]) -> dict[str, float | None]:
    if not latencies:
        return {"p50": None, "p99": None, "mean": None, "max": None}
    a = np.asarray(latencies) * 1000
    return {
        "p50": round(float(np.percentile(a, 50)), 2),
        "p99": round(float(np.percentile(a, 99)), 2),
        "mean": round(float(a.mean()), 2),
        "max": round(float(a.max()), 2),
    }


def request_stats(rec: Recorder, warmup_s: float, end_s: float) -> dict[str, Any]:
    """Failures over the whole run (warm-up included: a failure is a failure); throughput and
    latency over the measured window: ok requests that started after warm-up and ended before
    the workers were told to stop (the last in-flight ones finish outside it)."""
    outcomes = rec.snapshot()
    failed = [o for o in outcomes if o.status is not None]
    measured = [
        o
        for o in outcomes
        if o.status is None and o.start >= warmup_s and o.start + o.latency <= end_s
    ]
    window = max(1e-9, end_s - warmup_s)
    by_task = {}
    for task in TASKS:
        mine = [o for o in outcomes if o.task == task.name]
        ok = [o.latency for o in measured if o.task == task.name]
        by_task[task.name] = {
            "requests": len(mine),
            "failed": sum(o.status is not None for o in mine),
            "latency_ms": _latency_ms(ok),
        }
    by_status: dict[str, int] = {}
    for o in failed:
        by_status[o.status] = by_status.get(o.status, 0) + 1  # type: ignore[index]
    return {
        "total": len(outcomes),
        "ok": len(outcomes) - len(failed),
        "failed": len(failed),
        "failed_by_status": by_status,
        "failure_examples": rec.examples,
        "measured": len(measured),
        "throughput_rps": round(len(measured) / window, 3),
        "latency_ms": _latency_ms([o.latency for o in measured]),
        "by_task": by_task,
    }


def _slope_mb_per_h(samples: Sequence[MemorySample]) -> float | None:
    if len(samples) < 3:
        return None
    t = np.array([s.t for s in samples]) / 3600
    if np.ptp(t) == 0:
        return None
    return round(float(np.polyfit(t, np.array([s.rss for s in samples]) / MB, 1)[0]), 2)


def tree_changes(after: Sequence[MemorySample]) -> dict[str, int]:
    """Processes that appeared in or left the tree after warm-up. A restarted tritonserver or
    stub starts small again and would hide a leak, so growth alone cannot be trusted then."""
    if not after:
        return {"appeared": 0, "gone": 0}
    base = after[0].pids
    seen = frozenset().union(*(s.pids for s in after))
    gone = {pid for pid in base if any(pid not in s.pids for s in after)}
    return {"appeared": len(seen - base), "gone": len(gone)}


def growth_by_name(start: MemorySample | None, end: MemorySample | None) -> dict[str, float]:
    """MB gained per process name between the end of warm-up and the end."""
    if start is None or end is None:
        return {}
    names = set(start.by_name) | set(end.by_name)
    mb = {
        n: (end.by_name.get(n, {}).get("rss_mb", 0), start.by_name.get(n, {}).get("rss_mb", 0))
        for n in names
    }
    return {n: round(e - s, 1) for n, (e, s) in sorted(mb.items())}


def series_by_name(samples: Sequence[MemorySample]) -> dict[str, list[float | None]]:
    """RSS per process name at every sample (aligned with `samples`), to see which process
    grows and whether it levels off."""
    names = sorted({n for s in samples for n in s.by_name})
    return {n: [s.by_name[n]["rss_mb"] if n in s.by_name else None for s in samples] for n in names}


def memory_stats(
    samples: Sequence[MemorySample], baseline: MemorySample | None, end: MemorySample | None
) -> dict[str, Any]:
    """RSS at the end of warm-up and at the end, growth between them, peak and trend."""
    after = [s for s in samples if baseline is not None and s.t >= baseline.t]
    growth = None
    if baseline is not None and end is not None and baseline.rss > 0:
        growth = round((end.rss - baseline.rss) / baseline.rss * 100, 2)
    return {
        "start_mb": None if baseline is None else round(baseline.rss / MB, 1),
        "end_mb": None if end is None else round(end.rss / MB, 1),
        "growth_pct": growth,
        "peak_mb": round(max(s.rss for s in after) / MB, 1) if after else None,
        "slope_mb_per_h": _slope_mb_per_h(after),
        "processes_changed": tree_changes(after),
        "start_at_s": None if baseline is None else baseline.t,
        "end_at_s": None if end is None else end.t,
        "breakdown_start": None if baseline is None else baseline.by_name,
        "breakdown_end": None if end is None else end.by_name,
        "growth_by_name": growth_by_name(baseline, end),
        "response_cache": cache_stats(baseline, end),
        "series_mb": series_by_name(samples),
        "samples": [[s.t, round(s.rss / MB, 1), s.processes] for s in samples],
    }


def judge(report: dict[str, Any], cfg: Config) -> list[str]:
    """The targets missed, as sentences (empty: all met)."""
    misses = []
    failed = report["requests"]["failed"]
    if failed > TARGET_FAILED:
        kinds = ", ".join(f"{k} {v}" for k, v in report["requests"]["failed_by_status"].items())
        misses.append(f"{failed} failed requests (target {TARGET_FAILED}): {kinds}")
    growth = report["memory"]["growth_pct"]
    if growth is None:
        misses.append("RSS growth not measured (the run ended before warm-up did)")
    elif growth >= cfg.max_growth_pct:
        misses.append(f"RSS grew {growth} % after warm-up (target < {cfg.max_growth_pct:g} %)")
    changed = report["memory"]["processes_changed"]
    if changed["appeared"] or changed["gone"]:
        misses.append(
            f"server processes changed after warm-up ({changed['appeared']} appeared, "
            f"{changed['gone']} gone: a restart?); RSS growth is not comparable"
        )
    if report.get("stopped_early"):
        misses.append(f"run stopped early: {report['stopped_early']}")
    if report["requests"]["measured"] == 0:
        misses.append("no successful request after warm-up")
    code = report.get("server", {}).get("exit_code", 0)
    if code != 0:
        misses.append(f"server did not stop cleanly on SIGTERM (exit code {code})")
    return misses


def machine() -> dict[str, Any]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
    }


def _breakdown(by_name: dict[str, dict[str, float]] | None) -> str:
    if not by_name:
        return "-"
    rows = sorted(by_name.items(), key=lambda kv: -kv[1]["rss_mb"])
    return "; ".join(f"{name} x{int(v['count'])} {v['rss_mb']:.0f} MB" for name, v in rows)


def _print_cache(c: dict[str, Any] | None) -> None:
    if c is None:
        return

    def n(v: float | None) -> str:  # a gauge the server did not expose prints as "?"
        return "?" if v is None else f"{v:.0f}"

    print(
        f"  response cache: {n(c['entries_start'])} -> {n(c['entries_end'])} entries "
        f"({n(c['evictions_end'])} evictions), +{c['filled_mb']} MB of {c['size_mb']} MB; "
        f"RSS growth without it {c['growth_pct_without_cache']} % (not judged)"
    )


def print_report(report: dict[str, Any], misses: Sequence[str]) -> None:
    req, mem, lat = report["requests"], report["memory"], report["requests"]["latency_ms"]
    cfg = report["config"]
    print(
        f"\nsoak: {report['elapsed_s']:.0f} s at concurrency {cfg['concurrency']} against "
        f"{cfg['url']} (root pid {cfg['pid']}), warm-up {cfg['warmup_s']:g} s"
    )
    kinds = ", ".join(f"{k} {v}" for k, v in req["failed_by_status"].items()) or "none"
    print(f"requests: {req['total']} done, {req['failed']} failed ({kinds})")
    print(
        f"after warm-up: {req['measured']} ok, {req['throughput_rps']:.2f} req/s, "
        f"latency p50 {lat['p50']} ms, p99 {lat['p99']} ms"
    )
    for name, t in req["by_task"].items():
        print(
            f"  {name:<24} {t['requests']:>7} requests, {t['failed']} failed, "
            f"p50 {t['latency_ms']['p50']} ms, p99 {t['latency_ms']['p99']} ms"
        )
    print(
        f"server RSS (tree): {mem['start_mb']} MB after warm-up -> {mem['end_mb']} MB at end "
        f"({mem['growth_pct']} %), peak {mem['peak_mb']} MB, "
        f"trend {mem['slope_mb_per_h']} MB/h"
    )
    print(f"  start: {_breakdown(mem['breakdown_start'])}")
    print(f"  end:   {_breakdown(mem['breakdown_end'])}")
    grown = ", ".join(f"{n} {d:+.1f}" for n, d in mem["growth_by_name"].items())
    print(f"  growth (MB): {grown or '-'}")
    _print_cache(mem["response_cache"])
    for status, examples in req["failure_examples"].items():
        print(f"  e.g. {status}: {examples[0]}")
    if misses:
        for m in misses:
            print(f"TARGET MISSED: {m}")
    else:
        print(f"targets met: 0 failed, RSS growth < {cfg['max_growth_pct']:g} %")


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

_DESCRIPTION = """\
Soak test of a MedP-CLIP server: --concurrency worker threads, each with its own
MedPClipClient, send requests back to back for --minutes, with a mix close to real use:
medp_clip with a point, box or mask prompt and labels, medp_clip_image, and medp_clip_text with
a repeated label set or (sometimes) labels never sent before, on pydicom's CT_small.dcm (sent as
DICOM) and a PNG of it. Every answer is checked (shapes, probabilities summing to 1, unit
embeddings, and the same answer as the first time for a repeated request); a wrong answer counts
as a failed request. Client retries are off, so every UNAVAILABLE is counted.

Memory: RSS summed over the server's process and all its descendants (launcher, gateway,
tritonserver, python backend stubs), sampled every --interval seconds; the baseline is taken
at the end of warm-up, growth is end vs baseline in percent, with the peak, a least-squares
trend (MB/h) and a per-process-name breakdown at both ends. Triton's response cache fills
with every new label set up to its size (bounded, not a leak): with --metrics-url (automatic with
--repository) its fill is reported, and the growth without it, for information.

Targets: 0 failed requests and RSS growth below --max-growth percent after warm-up (and, with
--repository, a clean exit of the server on SIGTERM).

Either --url HOST:PORT --pid PID (a running server; PID = its top process), or --repository DIR
(default build/model_repository, exported first if it is the default and missing): then the
soak starts `python -m medpclip_tools.serve` on free ports and stops it with SIGTERM at the end.

exit codes: 0 targets met, 1 a target missed (each miss is printed), 2 usage.
"""

_EPILOG = """\
examples:
  .venv/bin/python perf/soak.py --minutes 30 --json build/soak.json
  .venv/bin/python perf/soak.py --minutes 5 --url 127.0.0.1:8001 \
      --pid $(pgrep -of medpclip_tools.serve)
"""


def _positive(kind: type) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def _header(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"want KEY=VALUE, got {text!r}")
    return key, value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="perf/soak.py",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--minutes",
        type=_positive(float),
        default=30.0,
        help="length of the run, warm-up included (default: %(default)s)",
    )
    p.add_argument("--url", metavar="HOST:PORT", help="gRPC address of a running server")
    p.add_argument("--pid", type=int, help="with --url: the server's top process id")
    p.add_argument(
        "--repository",
        type=Path,
        metavar="DIR",
        help=f"serve this repository ourselves (default: {DEFAULT_REPOSITORY})",
    )
    p.add_argument(
        "--concurrency",
        type=_positive(int),
        default=2 * (os.cpu_count() or 1),
        help="worker threads, each with requests back to back (default: 2 x CPUs = %(default)s)",
    )
    p.add_argument(
        "--warmup",
        type=float,
        metavar="SECONDS",
        help="excluded from the RSS baseline and latency (default: 30 s or 10 %% of "
        "the run, whichever is less)",
    )
    p.add_argument(
        "--interval",
        type=_positive(float),
        default=5.0,
        metavar="SECONDS",
        help="RSS sampling period (default: %(default)s)",
    )
    p.add_argument(
        "--timeout",
        type=_positive(float),
        default=120.0,
        metavar="SECONDS",
        help="deadline per request; keep it far above the slowest answer (default: %(default)s)",
    )
    p.add_argument(
        "--max-growth",
        type=_positive(float),
        default=TARGET_GROWTH_PCT,
        metavar="PERCENT",
        help="RSS growth target (default: %(default)s)",
    )
    p.add_argument(
        "--header",
        type=_header,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="gRPC metadata for every call, e.g. authorization='Bearer KEY'",
    )
    p.add_argument(
        "--metrics-url",
        metavar="URL",
        help="Triton's http://HOST:PORT/metrics, to report the response cache's fill apart "
        "(default with --repository: our server's; without: not read)",
    )
    p.add_argument("--seed", type=int, default=0, help="task-mix random seed (default: 0)")
    p.add_argument(
        "--server-log",
        type=Path,
        metavar="FILE",
        help="with --repository: the launcher's stderr (default: a temporary file)",
    )
    p.add_argument("--json", type=Path, metavar="FILE", help="write the numbers here")
    return p


def parse_config(argv: Sequence[str] | None) -> tuple[Config, Path | None]:
    """Parsed and checked arguments; usage errors exit 2 (argparse)."""
    parser = _parser()
    a = parser.parse_args(argv)
    if (a.url is None) != (a.pid is None):
        parser.error("--url and --pid go together (the pid is the server whose RSS is measured)")
    if a.url is not None and a.repository is not None:
        parser.error("--repository starts a server of our own; it excludes --url/--pid")
    if a.pid is not None and not psutil.pid_exists(a.pid):
        parser.error(f"no process with --pid {a.pid}")
    repository = None
    if a.url is None:
        repository = (a.repository or DEFAULT_REPOSITORY).resolve()
        if repository != DEFAULT_REPOSITORY.resolve() and not repository.is_dir():
            parser.error(f"--repository {repository} is not a directory")
    warmup = min(30.0, 0.1 * a.minutes * 60) if a.warmup is None else a.warmup
    if not 0 <= warmup < a.minutes * 60:
        parser.error(f"--warmup must be >= 0 and shorter than the run, got {warmup:g} s")
    cfg = Config(
        minutes=a.minutes,
        concurrency=a.concurrency,
        warmup_s=warmup,
        interval_s=a.interval,
        timeout_s=a.timeout,
        seed=a.seed,
        headers=dict(a.header),
        url=a.url,
        pid=a.pid,
        repository=repository,
        server_log=a.server_log,
        metrics_url=a.metrics_url,
        max_growth_pct=a.max_growth,
    )
    return cfg, a.json


@contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM ends the run like Ctrl-C (report, stop our server) instead of killing us and
    orphaning it; only the main thread can install handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise Interrupted()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _serve(cfg: Config, report: dict[str, Any]) -> Any:
    if cfg.url is not None and cfg.pid is not None:
        return _given(cfg.url, cfg.pid)
    return managed(cfg, report)


@contextmanager
def _given(url: str, pid: int) -> Iterator[tuple[str, int]]:
    yield url, pid


def _check_ready(url: str, headers: dict[str, str]) -> bool:
    with MedPClipClient(url, timeout_s=10, headers=headers) as c:
        return c.ready()


def main(argv: Sequence[str] | None = None) -> int:
    cfg, json_path = parse_config(argv)
    report: dict[str, Any] = {"machine": machine()}
    try:
        with _sigterm_interrupts(), _serve(cfg, report) as (url, pid):
            if not _check_ready(url, cfg.headers):
                print(f"soak: server at {url} is not ready", file=sys.stderr)
                return 1
            report["config"] = {
                "url": url,
                "pid": pid,
                "minutes": cfg.minutes,
                "concurrency": cfg.concurrency,
                "warmup_s": cfg.warmup_s,
                "interval_s": cfg.interval_s,
                "timeout_s": cfg.timeout_s,
                "max_growth_pct": cfg.max_growth_pct,
                "seed": cfg.seed,
                "command": [sys.executable, *sys.argv] if argv is None else list(argv),
            }
            print(
                f"soak: {cfg.minutes:g} min at concurrency {cfg.concurrency} against {url}, "
                f"warm-up {cfg.warmup_s:g} s",
                flush=True,
            )
            report.update(soak(url, pid, cfg))
    except (RuntimeError, subprocess.CalledProcessError, OSError) as exc:
        print(f"soak: error: {exc}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, Interrupted):  # outside the run itself: nothing to report
        print("soak: interrupted", file=sys.stderr)
        return 1
    misses = judge(report, cfg)
    report["targets_met"], report["misses"] = not misses, misses
    print_report(report, misses)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=2) + "\n")
    return 1 if misses else 0


if __name__ == "__main__":
    sys.exit(main())
