"""Runs Triton behind the gateway: deep health, restarts, and the stop sequence.

One asyncio loop holds the :class:`~medpclip_tools.gateway.Gateway` (public ports) and watches the
``tritonserver`` child (:class:`~medpclip_tools.triton_process.TritonServer`, on loopback):

* **Deep health**, every ``tick_s``: Triton's process alive, every python-backend stub it
  started still alive (2.51 keeps a model "ready" after its stub died, and every request then
  fails), and a canary inference through the loaded ensembles answered. A canary that stays
  unanswered past ``canary_timeout_s`` while Triton completes no request at all means a wedged
  model. Any of these makes readiness false at once.
* **Recovery**: a problem that lasts ``restart_after_s`` restarts Triton (the gateway keeps its
  ports; calls meanwhile get UNAVAILABLE, which clients retry). Restarts back off when they
  repeat, and the launcher gives up (exit 1) after ``MAX_FAILED_STARTS`` failed starts in a row,
  so that an orchestrator sees the failure.
* **Stop** (SIGTERM/SIGINT): readiness false while requests are still served for ``drain_s``
  (load balancers stop sending), then no new calls, in-flight ones finish (``stop_timeout_s``),
  then Triton, idle, is told to exit (``triton_exit_s``, SIGKILL only past that).
"""

from __future__ import annotations

import asyncio
import logging
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medpclip_core import tensors as T

from . import deployment as D
from .gateway import Gateway, HealthState, Keys, TlsFiles
from .triton_process import TritonServer

__all__ = ["Options", "Supervisor"]

LOG = logging.getLogger(__name__)
MAX_FAILED_STARTS = 5


@dataclass
class Options:
    """Everything `python -m medpclip_tools.serve` takes (see its --help)."""

    repository: Path
    host: str = "127.0.0.1"
    grpc_port: int = D.GRPC_PORT
    http_port: int = D.HTTP_PORT
    metrics_port: int = D.METRICS_PORT
    triton_grpc_port: int = 0  # Triton's own gRPC on 127.0.0.1 (0: a free one), for perf_analyzer
    keys: Keys = field(default_factory=Keys)
    tls: TlsFiles | None = None
    executable: Path | None = None
    log_file: Path | None = None
    cache: Path | None = None
    startup_timeout_s: float = 120
    drain_s: float = D.DRAIN_S
    stop_timeout_s: float = D.STOP_TIMEOUT_S
    triton_exit_s: float = D.TRITON_EXIT_S
    tick_s: float = 1.0
    canary_interval_s: float = 2.0
    canary_timeout_s: float = 5.0
    restart_after_s: float = 5.0
    max_inflight: int = 512


class Canary:
    """One small request through each loaded ensemble, answered by Triton directly.

    No deadline is sent (a canary must never be the cancellation that crashes 2.51); a canary
    that hangs is noticed by its age instead. Its text goes to the tokenizer model directly
    (and through medp_clip to the text encoder), never to the cached medp_clip_text: the
    response cache must neither answer for a dead text path nor fill with canary entries."""

    def __init__(self, url: str, metrics_url: str | None = None) -> None:
        self.url = url
        self.metrics_url = metrics_url
        self.models: list[str] = []
        self.started: float | None = None  # when the running canary began
        self.error: str | None = "no canary answered yet"
        self._client = None

    async def _connect(self):
        # tritonclient itself, not medpclip_client: the serving image installs no client
        from tritonclient.grpc.aio import InferenceServerClient

        if self._client is None:
            self._client = InferenceServerClient(self.url)
            index = await self._client.get_model_repository_index()
            loaded = {m.name for m in index.models if m.state == "READY"}
            self.models = [m for m in D.MODELS if m in loaded]
        return self._client

    async def progress(self) -> dict[str, tuple[int, int]] | None:
        """(successes, failures) so far per model (None if Triton cannot say)."""
        try:
            client = await self._connect()
            stats = await client.get_inference_statistics()
        except Exception:  # noqa: BLE001 - a health probe reports, it does not raise
            return None
        return {
            s.name: (s.inference_stats.success.count, s.inference_stats.fail.count)
            for s in stats.model_stats
        }

    async def pending(self) -> dict[str, float]:
        """Requests queued per model (Triton's nv_inference_pending_request_count gauge);
        empty if the metrics cannot be read."""
        if self.metrics_url is None:
            return {}

        def scrape() -> str:
            with urllib.request.urlopen(self.metrics_url, timeout=2) as r:
                return r.read().decode(errors="replace")

        try:
            text = await asyncio.get_running_loop().run_in_executor(None, scrape)
        except OSError:
            return {}
        found = {}
        for line in text.splitlines():
            if line.startswith("nv_inference_pending_request_count{"):
                labels, _, value = line.rpartition(" ")
                model = labels.split('model="', 1)[-1].split('"', 1)[0]
                found[model] = float(value)
        return found

    async def wedged(self, before: dict[str, tuple[int, int]] | None) -> bool:
        """Called when a canary is overdue: is anything stuck, rather than merely busy?
        Stuck: Triton completed nothing at all since the canary started, or a model has
        requests queued and completed none of them. Under heavy but healthy load every model
        still completes requests, so a slow canary alone never restarts a busy server."""
        now = await self.progress()
        if now is None or before is None:
            return True
        if self.completed(now) == self.completed(before):
            return True
        pending = await self.pending()
        return any(pending.get(m, 0) > 0 and sum(now[m]) == sum(before.get(m, (0, 0))) for m in now)

    @staticmethod
    def completed(progress: dict[str, tuple[int, int]] | None) -> int | None:
        return None if progress is None else sum(a + b for a, b in progress.values())

    @staticmethod
    def unproven(
        before: dict[str, tuple[int, int]] | None, now: dict[str, tuple[int, int]] | None
    ) -> set[str]:
        """Composing models that real traffic has not shown healthy since ``before`` (none
        answered, or one failed). The canary needs to visit only these: on a busy server it
        costs nothing, and a benchmark is not disturbed by it."""
        composing = {m for m in (now or {}) if m not in D.MODELS}
        if not before or not now:
            return composing or {"*"}
        return {
            m
            for m in composing
            if not (now[m][0] > before.get(m, (0, 0))[0] and now[m][1] == before.get(m, (0, 0))[1])
        }

    async def run(self, unproven: set[str] | None = None) -> None:
        """One round through the ensembles whose models are ``unproven`` (all by default);
        sets ``error`` (None when every request was answered)."""
        self.started = time.monotonic()
        try:
            client = await self._connect()
            # the image ensembles visit every composing model but the tokenizer and the
            # prompt path's own models, which encode + prompt visit
            image_path = unproven is None or bool(unproven - {"tokenizer", *PROMPT_PATH})
            prompt_path = unproven is None or bool(unproven & PROMPT_PATH)
            if prompt_path and {"medp_clip_encode", "medp_clip_prompt_image"} <= set(self.models):
                image = {k: v for k, v in CANARY_IMAGE.items() if k == "PIXELS"}
                encoded = await client.infer("medp_clip_encode", _inputs(T.MEDP_CLIP_ENCODE, image))
                prompt = {
                    "IMAGE_TOKENS": encoded.as_numpy("IMAGE_TOKENS"),
                    "TRANSFORM": encoded.as_numpy("TRANSFORM"),
                    "POINTS": CANARY_IMAGE["POINTS"],
                }
                await client.infer(
                    "medp_clip_prompt_image", _inputs(T.MEDP_CLIP_PROMPT_IMAGE, prompt)
                )
            if image_path and "medp_clip" in self.models:
                result = await client.infer("medp_clip", _inputs(T.MEDP_CLIP, CANARY_IMAGE))
                if not np.isfinite(result.as_numpy("REGION_PROBS")).all():
                    raise RuntimeError("canary answer is not finite")
            elif image_path and "medp_clip_image" in self.models:
                await client.infer("medp_clip_image", _inputs(T.MEDP_CLIP_IMAGE, CANARY_IMAGE))
            if (unproven is None or "tokenizer" in unproven) and "medp_clip_text" in self.models:
                # the tokenizer itself, not medp_clip_text: that ensemble's response cache
                # would answer for a dead tokenizer, and fill with canary entries
                labels = {"LABELS": CANARY_IMAGE["LABELS"]}
                await client.infer("tokenizer", _inputs(T.TOKENIZER, labels))
            self.error = None
        except Exception as exc:  # noqa: BLE001 - any failure is the finding
            self.error = f"canary failed: {type(exc).__name__}: {str(exc)[:200]}"
        finally:
            self.started = None

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()


def _canary_image() -> dict[str, np.ndarray]:
    pixels = np.full((48, 64, 1), 100, np.float32)
    pixels[16:32, 24:40] = 200
    return {
        "PIXELS": pixels,
        "POINTS": np.array([[32, 24]], np.float32),
        "LABELS": np.array([b"a canary"], dtype=object),
    }


CANARY_IMAGE = _canary_image()
# composing models only the encode-once-prompt-many ensembles visit
PROMPT_PATH = {"image_trunk", "image_prompted", "prompt_preprocess"}


def _inputs(spec: T.ModelSpec, arrays: dict[str, np.ndarray]) -> list:
    """tritonclient inputs named and typed by the declaration (only those `spec` takes)."""
    from tritonclient.grpc import InferInput

    inputs = []
    for t in spec.inputs:
        if t.name in arrays:
            a = arrays[t.name]
            inp = InferInput(t.name, list(a.shape), t.wire_type)
            inp.set_data_from_numpy(a)
            inputs.append(inp)
    return inputs


class Supervisor:
    """Gateway + Triton + health, for one run of the launcher. ``on_ready`` is called (once)
    when the server first becomes ready."""

    def __init__(self, opts: Options, on_ready: Callable[[Supervisor], None] | None = None):
        self.opts = opts
        self.on_ready = on_ready
        self.health = HealthState()
        self.gateway = Gateway(
            "127.0.0.1:1",  # replaced once Triton is up
            host=opts.host,
            grpc_port=opts.grpc_port,
            http_port=opts.http_port,
            keys=opts.keys,
            tls=opts.tls,
            max_inflight=opts.max_inflight,
            health=self.health,
        )
        self.triton: TritonServer | None = None
        self.restarts = 0
        self._stubs: dict[int, str] = {}
        self._hurry = asyncio.Event()

    # -- Triton --------------------------------------------------------------------------------

    def _new_triton(self) -> TritonServer:
        o = self.opts
        return TritonServer(
            o.repository,
            host="127.0.0.1",  # never reachable from outside: the gateway is the door
            metrics_host=o.host,
            metrics_port=o.metrics_port or None,
            grpc_port=o.triton_grpc_port or None,
            log_file=o.log_file,
            startup_timeout=o.startup_timeout_s,
            cache=o.cache,
            executable=o.executable,
        )

    async def _start_triton(self) -> None:
        triton = self._new_triton()
        self.triton = triton
        await asyncio.get_running_loop().run_in_executor(None, triton.start)
        self._stubs = triton.stubs()
        # keep the ports across restarts (Prometheus and perf_analyzer are pointed at them)
        self.opts.metrics_port = triton.metrics_port
        self.opts.triton_grpc_port = triton.grpc_port
        await self.gateway.set_upstream(triton.grpc_url)
        LOG.info("tritonserver up (pid %s, %d python-backend stubs)", triton.pid, len(self._stubs))

    async def _stop_triton(self, timeout: float) -> None:
        triton, self.triton = self.triton, None
        if triton is not None:
            await asyncio.get_running_loop().run_in_executor(None, triton.stop, timeout)

    def interrupt_start(self) -> None:
        """Make a Triton start in progress give up (a model load can take minutes)."""
        if self.triton is not None:
            self.triton.interrupt()

    def hurry(self) -> None:
        """Skip the rest of the drain wait (a second stop signal)."""
        self._hurry.set()

    # -- health --------------------------------------------------------------------------------

    def _process_problem(self) -> str | None:
        triton = self.triton
        if triton is None or not triton.running:
            return "tritonserver is not running"
        alive = triton.stubs()
        dead = sorted(name for pid, name in self._stubs.items() if pid not in alive)
        if dead:
            return f"python backend stub died: {', '.join(dead)}"
        return None

    async def _watch(self, canary: Canary, stop: asyncio.Event) -> None:
        """Until ``stop`` or a problem lasting ``restart_after_s``: update readiness."""
        o = self.opts
        last_canary = 0.0
        task: asyncio.Task | None = None
        # what Triton had completed when the last canary started (wedge check), and when the
        # last round ended (what real traffic has proven since: the canary's own requests
        # must not count as proof)
        progress_at_start: dict[str, tuple[int, int]] | None = None
        baseline: dict[str, tuple[int, int]] | None = None
        problem_since: float | None = None
        try:
            while not stop.is_set():
                now = time.monotonic()
                problem = self._process_problem()
                if problem is None and task is None and now - last_canary >= o.canary_interval_s:
                    progress = await canary.progress()
                    unproven = canary.unproven(baseline, progress)
                    if not unproven:
                        canary.error = None  # real traffic answered by every model
                    else:
                        everything = "*" in unproven or canary.error is not None
                        task = asyncio.ensure_future(canary.run(None if everything else unproven))
                    progress_at_start = baseline = progress
                    last_canary = now
                if task is not None and task.done():
                    task = None
                    baseline = await canary.progress()
                if problem is None and canary.error:
                    # sticky until a canary succeeds: a frozen stub fails some canaries and
                    # times out others, and readiness must not flap back meanwhile
                    problem = canary.error
                if problem is None and canary.started is not None:
                    age = now - canary.started
                    if age > o.canary_timeout_s:
                        if await canary.wedged(progress_at_start):
                            problem = f"wedged: a canary request unanswered for {age:.0f} s"
                if problem is None:
                    problem_since = None
                    self.health.set("serving", None)
                    if self.on_ready is not None:
                        self.on_ready(self)
                        self.on_ready = None
                else:
                    problem_since = problem_since or now
                    self.health.set("serving", problem)
                    if now - problem_since >= o.restart_after_s or "not running" in problem:
                        return
                try:
                    await asyncio.wait_for(stop.wait(), o.tick_s)
                except asyncio.TimeoutError:
                    pass
        finally:
            # Closing the channel would cancel a canary still running (the very thing that
            # crashes 2.51): leave that one to finish against its Triton.
            if task is None:
                await canary.close()

    # -- the run -------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> int:
        """Serve until ``stop`` is set; returns the exit code (0 requested stop, 1 failure)."""
        await self.gateway.start()
        failed_starts = 0
        backoff = 1.0
        last_restart = -1e9
        try:
            while not stop.is_set():
                self.health.set("starting" if self.restarts == 0 else "restarting", "starting")
                try:
                    await self._start_triton()
                except (RuntimeError, OSError) as exc:
                    await self._stop_triton(self.opts.triton_exit_s)
                    if stop.is_set():
                        break
                    failed_starts += 1
                    LOG.error("tritonserver failed to start (%d in a row):\n%s", failed_starts, exc)
                    if failed_starts >= MAX_FAILED_STARTS or self.restarts == 0:
                        # the first start failing is a configuration error: say so and exit
                        return 1
                    await _sleep_unless(stop, backoff)
                    backoff = min(backoff * 2, 60)
                    continue
                failed_starts = 0
                metrics = self.triton.metrics_url.replace("0.0.0.0", "127.0.0.1")
                await self._watch(Canary(self.triton.grpc_url, metrics), stop)
                if stop.is_set():
                    break
                problem = self.health.problem
                LOG.error("restarting tritonserver: %s", problem)
                self.health.set("restarting", problem)
                # A broken Triton gets little grace: its in-flight calls fail as UNAVAILABLE and
                # are retried (and held) against the new one.
                await self._stop_triton(min(self.opts.triton_exit_s, 3.0))
                self.restarts += 1
                # a server that breaks again within a minute of its restart: wait longer each
                # time, so a crash loop does not eat the machine
                if time.monotonic() - last_restart < 60:
                    await _sleep_unless(stop, backoff)
                    backoff = min(backoff * 2, 60)
                else:
                    backoff = 1.0
                last_restart = time.monotonic()
        finally:
            await self._stop_sequence()
        return 0

    async def _stop_sequence(self) -> None:
        o = self.opts
        if self.health.phase == "serving" and o.drain_s > 0:
            LOG.info("draining: not ready, still serving for %g s", o.drain_s)
            self.gateway.drain()
            await _sleep_unless(self._hurry, o.drain_s)
        left = await self.gateway.stop(o.stop_timeout_s)
        if left:
            LOG.warning("%d requests still running after %g s; stopping", left, o.stop_timeout_s)
        await self._stop_triton(o.triton_exit_s)
        LOG.info(
            "stopped (%d restarts, %d answers dropped because their client had gone)",
            self.restarts,
            self.gateway.abandoned,
        )


async def _sleep_unless(event: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(event.wait(), seconds)
    except asyncio.TimeoutError:
        pass
