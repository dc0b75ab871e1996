"""The perf recipes run for real against the test server: perf_analyzer on the ensemble and a
composing model, and a short, bounded locust smoke that must show 0 failures."""

from __future__ import annotations

import csv
import os
import secrets
import subprocess
import sys
from pathlib import Path

from conftest import self_signed_certificate

from medpclip_tools.serve import ServeProcess

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
        ["medp_clip", "image_encoder", "medp_clip_prompt_image"],
        inputs,
        tmp_path,
        concurrency="1:2",
        interval_ms=800,
    )
    measured = {(r["model"], r["concurrency"]) for r in rows}
    assert {("medp_clip", 1), ("image_encoder", 1), ("medp_clip_prompt_image", 1)} <= measured
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


def test_locust_smoke_over_tls_with_an_api_key(build_dir, tmp_path):
    """The load test as Kubernetes and compose run it against a TLS server that needs a key:
    the CA and the key come as file paths (MEDPCLIP_ROOT_CERT, MEDPCLIP_API_KEY_FILE). With
    both, no failures; without the key file the server refuses every request, and the smoke
    must say so (failures) rather than pass. The key never shows in locust's output."""
    cert, key = self_signed_certificate(tmp_path)
    key_file = tmp_path / "api-key"
    api_key = "perf-" + secrets.token_hex(8)
    key_file.write_text(api_key + "\n")
    # no key from the developer's environment: the refused run must really send none
    ours = {"MEDPCLIP_API_KEY", "MEDPCLIP_API_KEY_FILE"}
    base = {k: v for k, v in os.environ.items() if k not in ours}
    base["MEDPCLIP_ROOT_CERT"] = str(cert)

    def smoke(
        name: str, env: dict[str, str]
    ) -> tuple[subprocess.CompletedProcess[str], dict[str, str]]:
        r = subprocess.run(
            [
                sys.executable, "-m", "locust", "-f", str(ROOT / "perf" / "locustfile.py"),
                "--headless", "--host", server.grpc_url, "--csv", str(tmp_path / name),
                "--only-summary",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )  # fmt: skip
        stats = tmp_path / f"{name}_stats.csv"
        assert stats.is_file(), r.stderr[-2000:]
        with open(stats) as f:
            total = next(row for row in csv.DictReader(f) if row["Name"] == "Aggregated")
        failures = tmp_path / f"{name}_failures.csv"
        shown = r.stdout + r.stderr + (failures.read_text() if failures.is_file() else "")
        assert api_key not in shown
        return r, total

    args = ["--tls-cert", str(cert), "--tls-key", str(key), "--api-key-file", str(key_file)]
    with ServeProcess(
        build_dir / "model_repository", args=args, log_file=tmp_path / "serve.log"
    ) as server:
        r, total = smoke(
            "tls", dict(base, MEDPCLIP_RAMP="2:6", MEDPCLIP_API_KEY_FILE=str(key_file))
        )
        assert r.returncode == 0, r.stderr[-2000:]
        assert int(total["Request Count"]) > 10
        assert int(total["Failure Count"]) == 0

        r, total = smoke("no_key", dict(base, MEDPCLIP_RAMP="2:3"))
        assert r.returncode != 0  # locust exits 1 when any request failed
        assert int(total["Request Count"]) > 0
        assert int(total["Failure Count"]) == int(total["Request Count"])
        assert "API key" in (tmp_path / "no_key_failures.csv").read_text()
