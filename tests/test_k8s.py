"""Kubernetes manifests: every overlay renders offline (kubectl's built-in kustomize) and every
object validates against a current Kubernetes schema (kubernetes-validate); the values that
must agree with the server do."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from medpclip import deployment as D

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("gpu", "cpu", "gpu-tls")
KUBERNETES = "1.34.0"

pytestmark = pytest.mark.skipif(
    shutil.which("kubectl") is None, reason="kubectl (with built-in kustomize) is not installed"
)


def render(overlay: str) -> list[dict]:
    out = subprocess.run(
        ["kubectl", "kustomize", str(K8S / "overlays" / overlay)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def one(objs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [
        o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)
    ]
    assert len(found) == 1, (kind, name, len(found))
    return found[0]


def container(objs: list[dict], name: str, init: bool = False) -> dict:
    spec = one(objs, "Deployment")["spec"]["template"]["spec"]
    return next(c for c in spec["initContainers" if init else "containers"] if c["name"] == name)


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request):
    return request.param, render(request.param)


def test_every_object_validates(rendered):
    overlay, objs = rendered
    kinds = {o["kind"] for o in objs}
    assert {
        "Deployment",
        "Service",
        "ServiceMonitor",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "Job",
        "ConfigMap",
        "PersistentVolumeClaim",
    } <= kinds
    for o in objs:
        if o["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD: no bundled schema; checked field by field below
        kubernetes_validate.validate(o, KUBERNETES, strict=True)
    assert all(
        o["metadata"].get("namespace") == "medpclip" for o in objs if o["kind"] != "Namespace"
    )


def test_values_come_from_the_deployment_module(rendered):
    _, objs = rendered
    env = one(objs, "ConfigMap", "medpclip-server")["data"]
    assert env == D.server_env()
    triton = container(objs, "triton")
    ports = {p["name"]: p["containerPort"] for p in triton["ports"]}
    assert ports == {"http": D.HTTP_PORT, "grpc": D.GRPC_PORT, "metrics": D.METRICS_PORT}
    args = triton["args"]
    assert args[0] == "tritonserver" and set(D.SERVER_FLAGS) <= set(args)
    assert "--model-repository=$(REPOSITORY)" in args and "--grpc-port=$(GRPC_PORT)" in args
    assert {"configMapRef": {"name": "medpclip-server"}} in triton["envFrom"]
    # the local launcher passes the same flags
    from medpclip.serve import TritonServer

    local = TritonServer(ROOT / "build" / "none").command()
    assert set(D.SERVER_FLAGS) <= set(local)
    assert D.ENV_FILE.read_text() == D.render_env(), "run python -m medpclip.deployment"


def test_probes(rendered):
    _, objs = rendered
    triton = container(objs, "triton")
    for probe, path in (
        ("startupProbe", D.READY_PATH),
        ("readinessProbe", D.READY_PATH),
        ("livenessProbe", D.LIVE_PATH),
    ):
        assert triton[probe]["httpGet"] == {"path": path, "port": "http"}
    start = triton["startupProbe"]
    assert start["periodSeconds"] * start["failureThreshold"] >= 300  # model loading budget


def test_service_monitor_and_network_policy(rendered):
    _, objs = rendered
    svc = one(objs, "Service")
    ports = {p["name"]: p for p in svc["spec"]["ports"]}
    assert ports["grpc"]["port"] == D.GRPC_PORT and ports["grpc"]["appProtocol"] == "grpc"
    assert ports["http"]["port"] == D.HTTP_PORT and ports["metrics"]["port"] == D.METRICS_PORT
    assert {p["targetPort"] for p in ports.values()} == {"http", "grpc", "metrics"}
    monitor = one(objs, "ServiceMonitor")
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == D.METRICS_PATH
    labels = svc["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    policy = one(objs, "NetworkPolicy")
    inference, metrics = policy["spec"]["ingress"]
    assert [p["port"] for p in inference["ports"]] == [D.GRPC_PORT]
    assert inference["from"][0]["namespaceSelector"]["matchLabels"] == {
        "medpclip.io/inference-client": "true"
    }
    assert [p["port"] for p in metrics["ports"]] == [D.METRICS_PORT]


def test_hpa_metric_matches_the_adapter_rule(rendered):
    _, objs = rendered
    hpa = one(objs, "HorizontalPodAutoscaler")
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == D.QUEUE_METRIC
    assert hpa["spec"]["scaleTargetRef"]["name"] == one(objs, "Deployment")["metadata"]["name"]
    rules = yaml.safe_load(
        one(objs, "ConfigMap", "medpclip-prometheus-adapter-rules")["data"]["config.yaml"]
    )["rules"]
    (rule,) = rules
    assert rule["name"]["as"] == D.QUEUE_METRIC
    assert "nv_inference_queue_duration_us" in rule["seriesQuery"]
    assert re.search(
        r"nv_inference_queue_duration_us.*/.*nv_inference_request_success",
        rule["metricsQuery"],
        re.S,
    )


def test_pod_security_and_shared_memory(rendered):
    _, objs = rendered
    spec = one(objs, "Deployment")["spec"]["template"]["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    for c in spec["containers"] + spec["initContainers"]:
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
    shm = next(v for v in spec["volumes"] if v["name"] == "dshm")["emptyDir"]
    assert shm == {"medium": "Memory", "sizeLimit": D.server_env()["SHM_SIZE"]}
    mounts = {m["mountPath"]: m["name"] for m in container(objs, "triton")["volumeMounts"]}
    assert mounts["/dev/shm"] == "dshm"
    assert D.REPOSITORY.startswith(next(p for p, n in mounts.items() if n == "build"))
    assert one(objs, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1


def test_gpu_and_cpu_overlays():
    gpu, cpu = render("gpu"), render("cpu")
    for c in (container(gpu, "triton"), container(gpu, "export", init=True)):
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    export_args = container(gpu, "export", init=True)["args"]
    assert export_args[export_args.index("--flavour") + 1] == "tensorrt"
    spec = one(gpu, "Deployment")["spec"]["template"]["spec"]
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert spec["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert "nvidia.com/gpu" not in json.dumps(one(cpu, "Deployment"))
    cpu_args = container(cpu, "export", init=True)["args"]
    assert cpu_args[cpu_args.index("--flavour") + 1] == "onnxruntime"


def test_tls_component_adds_the_secret():
    objs = render("gpu-tls")
    triton = container(objs, "triton")
    assert {
        "--grpc-use-ssl=true",
        "--grpc-server-cert=/tls/tls.crt",
        "--grpc-server-key=/tls/tls.key",
    } <= set(triton["args"])
    spec = one(objs, "Deployment")["spec"]["template"]["spec"]
    assert {"name": "grpc-tls", "secret": {"secretName": "medpclip-grpc-tls"}} in spec["volumes"]


def test_locust_job_runs_the_projects_locustfile():
    job = one(render("cpu"), "Job")
    args = job["spec"]["template"]["spec"]["containers"][0]["args"]
    path = args[args.index("-f") + 1]
    assert (
        path == "/opt/medpclip/perf/locustfile.py" and (ROOT / "perf" / "locustfile.py").is_file()
    )
    assert "COPY perf /opt/medpclip/perf" in (ROOT / "deploy/docker/locust.Dockerfile").read_text()
    assert "medpclip-triton:$(GRPC_PORT)" in args


def test_compose_agrees_with_the_deployment_module():
    import compose

    out = subprocess.run(
        [
            str(Path(compose.__file__).parent / "docker-compose"),
            "-f",
            str(ROOT / "docker-compose.yml"),
            "config",
            "--format",
            "json",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    triton = json.loads(out)["services"]["triton"]
    assert set(D.SERVER_FLAGS) <= set(triton["command"])
    assert f"--model-repository={D.REPOSITORY}" in triton["command"]
    assert sorted(p["target"] for p in triton["ports"]) == [
        D.HTTP_PORT,
        D.GRPC_PORT,
        D.METRICS_PORT,
    ]
    assert int(triton["shm_size"]) == D.shm_bytes()
    assert f"http://localhost:{D.HTTP_PORT}{D.READY_PATH}" in triton["healthcheck"]["test"]
