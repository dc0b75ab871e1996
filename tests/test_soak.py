"""The soak command (perf/soak.py): a short CI smoke against the session server, plus its
answer checks and usage errors without a server.

The smoke runs ~18 s at saturation: long enough to push thousands of requests through the whole
task mix and to sample RSS several times, far too short to judge growth (warm-up dominates), so
it asserts that growth is measured, not that it meets the 5 % target."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "perf"))

import soak  # noqa: E402

from medpclip_client import MedPClipError  # noqa: E402


@pytest.mark.timeout(180)
def test_soak_smoke_has_no_failures_and_measures_rss(server, tmp_path):
    out = tmp_path / "soak.json"
    argv = ["--url", server.grpc_url, "--pid", str(server.pid), "--minutes", "0.3"]
    argv += ["--metrics-url", server.metrics_url, "--interval", "2", "--json", str(out)]
    code = soak.main(argv)
    report = json.loads(out.read_text())

    req = report["requests"]
    assert req["failed"] == 0, req["failure_examples"]
    assert req["measured"] > 20 and req["throughput_rps"] > 0
    assert {name for name, t in req["by_task"].items() if t["requests"] > 0} == {
        t.name for t in soak.TASKS
    }  # the whole mix ran, text-only and fresh labels included
    assert req["latency_ms"]["p99"] >= req["latency_ms"]["p50"] > 0

    mem = report["memory"]
    assert mem["start_mb"] > 0 and mem["end_mb"] > 0 and mem["growth_pct"] is not None
    assert mem["peak_mb"] >= mem["end_mb"]
    assert len(mem["samples"]) >= 5
    assert any("tritonserver" in name for name in mem["breakdown_start"])
    assert mem["breakdown_end"] and mem["processes_changed"] == {"appeared": 0, "gone": 0}
    assert any("tritonserver" in name for name in mem["growth_by_name"])
    assert all(len(v) == len(mem["samples"]) for v in mem["series_mb"].values())
    cache = mem["response_cache"]  # fresh label sets were sent: the cache gained entries
    assert cache["entries_end"] > cache["entries_start"] and cache["filled_mb"] is not None

    # only the RSS target may be missed in a run this short; anything else is a real failure
    assert all(m.startswith("RSS grew") for m in report["misses"]), report["misses"]
    assert code == (1 if report["misses"] else 0)
    assert report["machine"]["cores"] >= 1


def _result(probs: list[float], mask_shape: tuple[int, int]) -> SimpleNamespace:
    e = np.zeros(8, dtype=np.float32)
    e[0] = 1
    p = np.asarray(probs, dtype=np.float32)
    return SimpleNamespace(
        region_probs=p,
        image_probs=p,
        mask=np.zeros(mask_shape, np.uint8),
        global_embedding=e,
        region_embedding=e,
        iou=0.5,
        patch_features=np.zeros((4, 8), np.float32),
    )


def test_answer_checks_count_wrong_answers():
    case = soak.Case("x.png", b"", (10, 12))
    soak.check_result(_result([0.25, 0.75], (10, 12)), case, ["a", "b"])
    for bad, labels in (
        (_result([0.5, 0.6], (10, 12)), ["a", "b"]),  # not a distribution
        (_result([0.5, 0.5], (12, 10)), ["a", "b"]),  # mask not at the image's size
        (_result([1.0], (10, 12)), ["a", "b"]),  # one probability per label
    ):
        with pytest.raises(soak.BadAnswer):
            soak.check_result(bad, case, labels)
    with pytest.raises(soak.BadAnswer):
        soak.check_text(np.ones((2, 4), np.float32), 2)  # rows not unit length

    refs = soak.References()
    refs.check("k", np.array([0.2, 0.8]))
    refs.check("k", np.array([0.2, 0.8 + 1e-6]))  # batch-composition noise is fine
    with pytest.raises(soak.BadAnswer):
        refs.check("k", np.array([0.8, 0.2]))  # another request's answer


def test_failures_are_classified_by_grpc_status():
    assert soak.classify_error(MedPClipError("x", "StatusCode.UNAVAILABLE")) == "UNAVAILABLE"
    assert soak.classify_error(MedPClipError("x")) == "CLIENT_ERROR"
    assert soak.classify_error(soak.BadAnswer("x")) == "BAD_ANSWER"
    assert soak.classify_error(TimeoutError()) == "TimeoutError"


@pytest.mark.parametrize(
    "argv",
    [
        ["--url", "127.0.0.1:1"],  # no --pid
        ["--pid", "1"],  # no --url
        ["--minutes", "0"],
        ["--minutes", "1", "--warmup", "60"],  # warm-up as long as the run
        ["--url", "127.0.0.1:1", "--pid", "1", "--repository", "x"],
        ["--header", "novalue"],
    ],
)
def test_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        soak.main(argv)
    assert exc.value.code == 2
