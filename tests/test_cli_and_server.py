"""The client CLI against the real server, and the server launcher's start/stop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medpclip.real_inputs import sample_dicom
from medpclip_client import MedPClipClient, Region, cli
from medpclip_tools.serve import TritonServer, _free_ports

LABELS = ["a round hyperdense nodule", "a dark cyst", "normal tissue"]


def _dicom(tmp_path: Path) -> Path:
    path = tmp_path / "ct.dcm"
    path.write_bytes(sample_dicom())
    return path


def test_cli_prints_a_table_and_saves_the_mask(server, tmp_path, capsys):
    mask = tmp_path / "mask.png"
    argv = [
        str(_dicom(tmp_path)),
        "--point",
        "62,70",
        "--url",
        server.grpc_url,
        "--save-mask",
        str(mask),
        "--labels",
        *LABELS,
    ]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    for label in LABELS:
        assert label in out
    assert "IoU" in out or "iou" in out.lower()
    saved = np.asarray(Image.open(mask))
    assert saved.shape == (128, 128) and set(np.unique(saved)) <= {0, 255}


def test_cli_json_matches_the_library(server, tmp_path, capsys):
    image = _dicom(tmp_path)
    argv = [
        str(image),
        "--box",
        "40,50,90,100",
        "--url",
        server.grpc_url,
        "--json",
        "--labels",
        *LABELS,
    ]
    assert cli.main(argv) == 0
    doc = json.loads(capsys.readouterr().out)
    with MedPClipClient(server.grpc_url) as client:
        result = client.infer(image.read_bytes(), Region(box=(40, 50, 90, 100)), labels=LABELS)
    got = {row["label"]: (row["region_prob"], row["image_prob"]) for row in doc["labels"]}
    assert set(got) == set(LABELS)
    for label, r, i in zip(LABELS, result.region_probs, result.image_probs, strict=True):
        assert got[label][0] == pytest.approx(float(r), abs=1e-6)
        assert got[label][1] == pytest.approx(float(i), abs=1e-6)
    assert doc["mask"]["area_px"] == int(result.mask.sum())
    assert doc["mask"]["width"] == 128 and doc["mask"]["height"] == 128
    assert doc["iou"] == pytest.approx(result.iou, abs=1e-6)


def test_cli_exit_codes(server, tmp_path, capsys):
    image = str(_dicom(tmp_path))
    # the server refuses the input: 3, with its message
    assert cli.main([image, "--point", "500,5", "--url", server.grpc_url, "--labels", "a"]) == 3
    assert "outside the 128x128 image" in capsys.readouterr().err
    # nobody listening: 4
    (port,) = _free_ports("127.0.0.1", 1)
    assert cli.main([image, "--url", f"127.0.0.1:{port}", "--labels", "a", "--timeout", "5"]) == 4
    # usage: 2
    assert cli.main([image, "--point", "1;2"]) == 2


def test_serve_command_starts_and_stops_cleanly(build_dir, tmp_path):
    """`python -m medpclip_tools.serve` reaches ready, serves, and on SIGTERM exits 0 leaving no
    python-backend shared memory behind (its own regions: other servers may run meanwhile)."""
    import psutil

    grpc_port, http_port, metrics_port = _free_ports("127.0.0.1", 3)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "medpclip_tools.serve",
            "--repository",
            str(build_dir / "model_repository"),
            "--grpc-port",
            str(grpc_port),
            "--http-port",
            str(http_port),
            "--metrics-port",
            str(metrics_port),
            "--log-file",
            str(tmp_path / "triton.log"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert "ready" in line.lower() and str(grpc_port) in line
        with MedPClipClient(f"127.0.0.1:{grpc_port}") as client:
            assert client.ready()
            emb = client.text_embeddings(["a cyst"])
            assert emb.shape[0] == 1
        # each python-backend stub gets its shm region's name as its second argument
        ours = {
            argv[2]
            for p in psutil.Process(proc.pid).children(recursive=True)
            if len(argv := p.cmdline()) > 2 and argv[0].endswith("triton_python_backend_stub")
        }
        assert ours and ours <= set(os.listdir("/dev/shm"))
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    time.sleep(0.5)
    assert not ours & set(os.listdir("/dev/shm"))


def test_launcher_reports_a_broken_repository(tmp_path):
    bad = tmp_path / "repo" / "broken"
    bad.mkdir(parents=True)
    (bad / "config.pbtxt").write_text('backend: "python"\nmax_batch_size: 0\n')
    (bad / "1").mkdir()
    (bad / "1" / "model.py").write_text("raise ImportError('boom from model')\n")
    server = TritonServer(tmp_path / "repo", startup_timeout=60, log_file=tmp_path / "log")
    try:
        server.start()
        raise AssertionError("a broken repository must not start")
    except RuntimeError as exc:
        assert "boom from model" in str(exc)
    finally:
        server.stop()


def test_serve_prints_the_cause_of_a_failed_start_and_keeps_old_logs(tmp_path):
    """An operator sees why Triton did not start (the model's SyntaxError, a config that does
    not parse), and a second start appends to the log instead of erasing the evidence."""
    repo = tmp_path / "repo"
    for name, config, code in (
        ("syntax", 'backend: "python"\nmax_batch_size: 0\n', "def initialize(self:\n"),
        ("protobuf", 'backend: "python"\nmax_batch_size: zero\n', "pass\n"),
    ):
        (repo / name / "1").mkdir(parents=True)
        (repo / name / "config.pbtxt").write_text(config)
        (repo / name / "1" / "model.py").write_text(code)
    log = tmp_path / "triton.log"
    argv = [
        sys.executable,
        "-m",
        "medpclip_tools.serve",
        f"--repository={repo}",
        f"--log-file={log}",
    ]
    argv += ["--grpc-port=0", "--http-port=0", "--metrics-port=0", "--startup-timeout=60"]
    for run in (1, 2):
        r = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        assert r.returncode == 1, r.stderr[-2000:]
        cause = r.stderr.split("cause, from", 1)[-1].split("last lines of", 1)[0]
        assert "SyntaxError" in cause and "zero" in cause, r.stderr[-3000:]
        assert log.read_text().count("=== tritonserver starting") == run


def test_readme_demo_runs(tmp_path, capsys):
    from medpclip_tools import demo

    assert demo.main(["--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.count("region    image") == 2 and "server stopped" in out
    for name in ("mask_a.png", "mask_b.png", "overlay.png"):
        assert (tmp_path / "demo" / name).is_file()
