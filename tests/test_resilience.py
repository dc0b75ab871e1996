"""The server survives its clients and its operators (the real launcher, gateway and Triton).

- a storm of 1-50 ms deadlines and cancellations of five kinds: the server stays up and ready,
  an honest client's every answer is right (bare Triton 2.51 dies of this: perf/storm.py
  --direct);
- SIGTERM under load: readiness false at once, in-flight answered, exit 0 inside the grace
  period, no SIGKILL, no heap corruption; a restart on the same ports loses no request of a
  client with default settings;
- a killed (kill -9) or a frozen (SIGSTOP) python-backend stub: not ready within 10 s, Triton is
  restarted, and a client with default settings loses nothing meanwhile.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import psutil
import pytest

from medpclip_client import MedPClipClient, Region
from medpclip_tools import deployment as D
from medpclip_tools.serve import ServeProcess

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "perf"))
import storm  # noqa: E402

LABELS = ["a nodule", "a cyst"]
PIXELS = np.random.default_rng(3).integers(0, 255, (96, 128), dtype=np.uint8)
REGION = Region(points=[(30.0, 40.0)])
# what a crashed or corrupted Triton prints (glog's fatal signal line, glibc's heap checks)
CRASH_MARKERS = ("Signal (11)", "Signal (6)", "corrupted", "double free", "Segmentation fault")


def _http_status(server: ServeProcess, path: str = D.READY_PATH) -> int:
    try:
        with urllib.request.urlopen(f"{server.http_url}{path}", timeout=2) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


def _wait(predicate, timeout: float, step: float = 0.1) -> float | None:
    """Seconds until ``predicate()`` holds, None if it did not within ``timeout``."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():
            return time.monotonic() - start
        time.sleep(step)
    return None


def _triton_log(server: ServeProcess) -> str:
    return server.log_file.with_suffix(".triton.log").read_text(errors="replace")


class Load:
    """Clients with default settings (deadline 60 s, retries on UNAVAILABLE) sending requests
    in a loop; every answer is compared with the first one."""

    def __init__(self, url: str, threads: int = 3) -> None:
        self.url = url
        self.ok = 0
        self.errors: list[str] = []
        self.wrong = 0
        self._stop = threading.Event()
        with MedPClipClient(url) as c:
            self.reference = c.infer(PIXELS, REGION, LABELS)
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        with MedPClipClient(self.url) as c:
            while not self._stop.is_set():
                try:
                    r = c.infer(PIXELS, REGION, LABELS)
                except Exception as exc:  # noqa: BLE001 - every failure is the finding
                    self.errors.append(str(exc)[:200])
                    continue
                if np.allclose(r.region_probs, self.reference.region_probs, atol=1e-6):
                    self.ok += 1
                else:
                    self.wrong += 1

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(90)


def _stub(server: ServeProcess, model: str) -> psutil.Process:
    for p in psutil.Process(server.pid).children(recursive=True):
        try:
            argv = p.cmdline()
        except psutil.Error:
            continue
        if argv and argv[0].endswith("triton_python_backend_stub") and f"/{model}/" in argv[1]:
            return p
    raise AssertionError(f"no python backend stub for {model}")


# --- clients ----------------------------------------------------------------------------------


@pytest.mark.timeout(240)
def test_a_storm_of_short_deadlines_and_cancellations_leaves_the_server_up(server):
    report = storm.storm(
        server.grpc_url, requests=250, concurrency=8, alive=lambda: server.running,
        ready=server.ready,
    )  # fmt: skip
    print(report)
    assert sum(sum(v.values()) for v in report.by_kind.values()) == 250
    assert report.server_alive and report.ready_after
    assert report.honest_failed == 0 and report.honest_wrong == 0 and report.honest_ok > 0
    assert not any(m in _triton_log(server) for m in CRASH_MARKERS)


# --- operators --------------------------------------------------------------------------------


@pytest.mark.timeout(240)
def test_sigterm_under_load_drains_and_a_restart_loses_no_request(build_dir, tmp_path):
    repo = build_dir / "model_repository"
    first = ServeProcess(repo, log_file=tmp_path / "a.log", drain_s=1).start()
    try:
        with Load(first.grpc_url) as load:
            assert _wait(lambda: load.ok >= 10, 60) is not None
            t0 = time.monotonic()
            first.signal(signal.SIGTERM)
            not_ready_after = _wait(lambda: _http_status(first) != 200, 5, step=0.02)
            code = first._process.wait(D.GRACE_PERIOD_S)
            stopped_after = time.monotonic() - t0
            second = ServeProcess(repo, log_file=tmp_path / "b.log", ports=first.ports).start()
            try:
                served_before = load.ok
                assert _wait(lambda: load.ok >= served_before + 10, 60) is not None
            finally:
                load.__exit__()
                second.stop()
        print(f"not ready after {not_ready_after} s, stopped after {stopped_after:.1f} s, "
              f"{load.ok} answered, {len(load.errors)} failed")  # fmt: skip
        assert not_ready_after is not None and not_ready_after < 0.5
        assert code == 0 and stopped_after < D.GRACE_PERIOD_S
        assert load.errors == [] and load.wrong == 0
        log = (tmp_path / "a.log").read_text()
        assert "draining" in log and "still running" not in log and "killing" not in log
        assert not any(m in _triton_log(first) for m in CRASH_MARKERS)
    finally:
        first.stop()


@pytest.mark.timeout(240)
@pytest.mark.parametrize("how", ["kill", "freeze"])
def test_a_dead_or_wedged_stub_is_not_ready_within_10s_and_recovers(build_dir, tmp_path, how):
    server = ServeProcess(
        build_dir / "model_repository", log_file=tmp_path / "serve.log", args=["--restart-after=2"]
    ).start()
    try:
        with Load(server.grpc_url, threads=2) as load:
            assert _wait(lambda: load.ok >= 5, 60) is not None
            stub = _stub(server, "image_encoder")
            stub.send_signal(signal.SIGKILL if how == "kill" else signal.SIGSTOP)
            not_ready = _wait(lambda: _http_status(server) != 200, 10, step=0.05)
            assert not_ready is not None, "still ready 10 s after the stub died/froze"
            back = _wait(lambda: _http_status(server) == 200, 90, step=0.2)
            assert back is not None, "not ready again within 90 s"
            served = load.ok
            assert _wait(lambda: load.ok >= served + 5, 60) is not None
        print(f"{how}: not ready after {not_ready:.2f} s, ready again {back:.1f} s later; "
              f"{load.ok} answered, {len(load.errors)} failed")  # fmt: skip
        assert load.errors == [] and load.wrong == 0, load.errors[:3]
        assert "restarting tritonserver" in (tmp_path / "serve.log").read_text()
    finally:
        if how == "freeze":
            try:
                stub.send_signal(signal.SIGCONT)
            except psutil.Error:
                pass
        server.stop()
