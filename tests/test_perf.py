"""The perf recipes run for real against the test server: perf_analyzer on the ensemble and a
composing model, and a short, bounded locust smoke that must show 0 failures."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "perf"))

import perf_analyzer  # noqa: E402


def test_perf_analyzer_sweeps_the_ensemble_and_a_composing_model(server, checkpoint, tmp_path):
    inputs = perf_analyzer.write_inputs(tmp_path / "inputs", checkpoint)
    assert set(inputs) == set(perf_analyzer.ALL_MODELS)
    # perf_analyzer sends no gRPC headers (2.51: "-H ... ignored for GRPC"), so it cannot carry
    # the admin key its ModelConfig call needs at the gateway: it measures Triton on loopback.
    rows = perf_analyzer.sweep(
        server.triton_url,
        ["medp_clip", "image_encoder"],
        inputs,
        tmp_path,
        concurrency="1:2",
        interval_ms=800,
    )
    measured = {(r["model"], r["concurrency"]) for r in rows}
    assert {("medp_clip", 1), ("image_encoder", 1)} <= measured
    assert all(r["throughput"] > 0 and r["p99_ms"] >= r["p50_ms"] > 0 for r in rows)
    assert "infer/s" in perf_analyzer.table(rows)


def test_locust_smoke_has_no_failures(server, tmp_path):
    env = dict(os.environ, MEDPCLIP_RAMP="2:6")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "locust",
            "-f",
            str(ROOT / "perf" / "locustfile.py"),
            "--headless",
            "--host",
            server.grpc_url,
            "--csv",
            str(tmp_path / "smoke"),
            "--only-summary",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    with open(tmp_path / "smoke_stats.csv") as f:
        total = next(row for row in csv.DictReader(f) if row["Name"] == "Aggregated")
    assert int(total["Request Count"]) > 10
    assert int(total["Failure Count"]) == 0
