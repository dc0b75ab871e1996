"""Kubernetes manifests: every overlay renders offline (kubectl's built-in kustomize) and every
object validates against a current Kubernetes schema (kubernetes-validate); the launcher's
arguments, probes, Secrets and stop sequence agree with medpclip/deployment.py."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from medpclip import tensorrt_engine as te
from medpclip_tools import deployment as D

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("gpu", "cpu", "cpu-plaintext", "gpu-cert-manager")
PLAINTEXT = {"cpu-plaintext"}
API_KEY = {"gpu-cert-manager"}
KUBERNETES = "1.34.0"
CRDS = ("monitoring.coreos.com/", "cert-manager.io/")  # no bundled schema; checked field by field
LAUNCHER = ["python3", "-m", "medpclip_tools.serve"]
TLS_SECRET, KEYS_SECRET = "medpclip-grpc-tls", "medpclip-keys"

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


def pod(objs: list[dict], kind: str = "Deployment") -> dict:
    return one(objs, kind)["spec"]["template"]["spec"]


def container(objs: list[dict], name: str, init: bool = False) -> dict:
    spec = pod(objs)
    return next(c for c in spec["initContainers" if init else "containers"] if c["name"] == name)


def locust(objs: list[dict]) -> dict:
    (c,) = pod(objs, "Job")["containers"]
    return c


def expand(value: str, env: dict[str, str]) -> str:
    """$(VAR) as the kubelet expands it in args and env; an unknown VAR would stay literal,
    which is always a bug here."""

    def sub(m: re.Match) -> str:
        assert m.group(1) in env, f"$({m.group(1)}) is not in the medpclip-server ConfigMap"
        return env[m.group(1)]

    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", sub, value)


def launcher_flags(objs: list[dict]) -> dict[str, str]:
    """The triton container's launcher flags, $(VAR)s expanded from the ConfigMap."""
    env = one(objs, "ConfigMap", "medpclip-server")["data"]
    args = container(objs, "triton")["args"]
    assert args[:3] == LAUNCHER, args
    pairs = [expand(a, env).split("=", 1) for a in args[3:]]
    assert all(len(p) == 2 and p[0].startswith("--") for p in pairs), args
    assert len({p[0] for p in pairs}) == len(pairs), args
    return dict(pairs)


def secret_mounts(spec: dict, c: dict) -> dict[str, dict]:
    """mountPath -> the Secret volume mounted there (with its items, if any)."""
    volumes = {v["name"]: v for v in spec["volumes"]}
    return {
        m["mountPath"]: volumes[m["name"]]["secret"]
        for m in c.get("volumeMounts", [])
        if "secret" in volumes[m["name"]]
    }


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
        if o["apiVersion"].startswith(CRDS):
            continue
        kubernetes_validate.validate(o, KUBERNETES, strict=True)
    assert all(
        o["metadata"].get("namespace") == "medpclip" for o in objs if o["kind"] != "Namespace"
    )


def test_launcher_arguments_come_from_the_deployment_module(rendered):
    overlay, objs = rendered
    assert one(objs, "ConfigMap", "medpclip-server")["data"] == D.server_env()
    assert (ROOT / D.ENV_FILE).read_text() == D.render_env(), (
        "run python -m medpclip_tools.deployment"
    )
    triton = container(objs, "triton")
    assert {"configMapRef": {"name": "medpclip-server"}} in triton["envFrom"]
    ports = {p["name"]: p["containerPort"] for p in triton["ports"]}
    assert ports == {"http": D.HTTP_PORT, "grpc": D.GRPC_PORT, "metrics": D.METRICS_PORT}
    want = {
        "--repository": D.REPOSITORY,
        "--host": "0.0.0.0",  # the pod's address; Service and NetworkPolicy decide who reaches it
        "--grpc-port": str(D.GRPC_PORT),
        "--http-port": str(D.HTTP_PORT),
        "--metrics-port": str(D.METRICS_PORT),
        "--tritonserver": D.NGC_TRITONSERVER,
        "--drain-seconds": str(D.DRAIN_S),
        "--stop-timeout": str(D.STOP_TIMEOUT_S),
        "--admin-key-file": f"{D.KEYS_DIR}/{D.ADMIN_KEY}",
    }
    if overlay not in PLAINTEXT:
        want |= {"--tls-cert": f"{D.TLS_DIR}/{D.TLS_CERT}", "--tls-key": f"{D.TLS_DIR}/{D.TLS_KEY}"}
    if overlay in API_KEY:
        want["--api-key-file"] = f"{D.KEYS_DIR}/{D.API_KEY}"
    assert launcher_flags(objs) == want


def test_tls_and_keys_are_files_from_mounted_secrets(rendered):
    overlay, objs = rendered
    spec, triton = pod(objs), container(objs, "triton")
    mounts = secret_mounts(spec, triton)
    assert mounts[D.KEYS_DIR] == {"secretName": KEYS_SECRET, "defaultMode": 0o440}
    if overlay in PLAINTEXT:
        assert D.TLS_DIR not in mounts
        assert not any(v["name"] == "grpc-tls" for v in spec["volumes"])
    else:
        assert mounts[D.TLS_DIR] == {"secretName": TLS_SECRET, "defaultMode": 0o440}
    assert all(m.get("readOnly") for m in triton["volumeMounts"] if m["mountPath"] in mounts)
    # every file the launcher is given lies in a Secret mounted for it
    for flag, path in launcher_flags(objs).items():
        if flag.endswith(("-file", "-cert", "-key", "-ca")):
            assert str(Path(path).parent) in mounts, (flag, path)


def test_no_key_or_secret_value_in_args_or_env(rendered):
    _, objs = rendered
    # Secrets are created in the cluster (or by cert-manager), never rendered from this repo
    assert not any(o["kind"] == "Secret" for o in objs)
    for spec in (pod(objs), pod(objs, "Job")):
        for c in spec["containers"] + spec.get("initContainers", []):
            text = json.dumps([c.get("command"), c.get("args"), c.get("env")])
            assert not re.search(r"-----BEGIN|Bearer|secretKeyRef|[0-9a-f]{32}", text), c["name"]
            for e in c.get("env", []):
                assert "valueFrom" not in e, (c["name"], e)
    for e in locust(objs).get("env", []):
        assert e["value"].startswith(("$(TLS_DIR)/", "$(KEYS_DIR)/")), e


def test_locust_job_uses_tls_and_the_api_key_and_nothing_more(rendered):
    overlay, objs = rendered
    spec = pod(objs, "Job")
    job = locust(objs)
    server_env = one(objs, "ConfigMap", "medpclip-server")["data"]
    env = {e["name"]: expand(e["value"], server_env) for e in job.get("env", [])}
    mounts = secret_mounts(spec, job)
    want = {}
    if overlay not in PLAINTEXT:
        want["MEDPCLIP_ROOT_CERT"] = f"{D.TLS_DIR}/{D.TLS_CA}"
        assert mounts[D.TLS_DIR]["secretName"] == TLS_SECRET
        # the CA only: the load test never holds the server's private key
        assert mounts[D.TLS_DIR]["items"] == [{"key": D.TLS_CA, "path": D.TLS_CA}]
    if overlay in API_KEY:
        want["MEDPCLIP_API_KEY_FILE"] = f"{D.KEYS_DIR}/{D.API_KEY}"
        # the API key only, never the admin key
        assert mounts[D.KEYS_DIR] == {
            "secretName": KEYS_SECRET,
            "items": [{"key": D.API_KEY, "path": D.API_KEY}],
            "defaultMode": 0o440,
        }
    assert env == want
    assert set(mounts) == {str(Path(p).parent) for p in want.values()}


def test_probes_point_at_the_gateway_health_port(rendered):
    _, objs = rendered
    triton = container(objs, "triton")
    http = next(p for p in triton["ports"] if p["name"] == "http")
    assert http["containerPort"] == int(launcher_flags(objs)["--http-port"]) == D.HTTP_PORT
    for probe, path in (
        ("startupProbe", D.READY_PATH),
        ("readinessProbe", D.READY_PATH),
        ("livenessProbe", D.LIVE_PATH),
    ):
        assert triton[probe]["httpGet"] == {"path": path, "port": "http"}
    start = triton["startupProbe"]
    assert start["periodSeconds"] * start["failureThreshold"] >= 300  # model loading budget


def test_stop_sequence_and_rollout_lose_nothing(rendered):
    _, objs = rendered
    deployment = one(objs, "Deployment")
    spec = pod(objs)
    # the launcher's drain, in-flight calls and Triton's exit all fit in the grace period
    assert spec["terminationGracePeriodSeconds"] == D.GRACE_PERIOD_S
    assert D.GRACE_PERIOD_S > D.DRAIN_S + D.STOP_TIMEOUT_S + D.TRITON_EXIT_S
    # the drain is in-process (ready false, serve on for DRAIN_S): no preStop sleep eating the
    # grace period before SIGTERM
    assert "preStop" not in container(objs, "triton").get("lifecycle", {})
    assert spec["shareProcessNamespace"] is True  # an init (pause) reaps orphaned stubs
    # a new pod must be ready (deep readiness) before an old one stops
    assert deployment["spec"]["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    assert deployment["spec"]["minReadySeconds"] > 0
    assert "readinessProbe" in container(objs, "triton")


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
    # the launcher binds Triton's metrics on the pod address, on the port the monitor scrapes
    assert launcher_flags(objs)["--metrics-port"] == str(D.METRICS_PORT)
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
    spec = pod(objs)
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


def test_images_are_one_release(rendered):
    """Our NVIDIA-based images carry the NGC release they are built on (one for all)."""
    _, objs = rendered
    images = (container(objs, "triton")["image"], container(objs, "export", init=True)["image"])
    assert {i.rsplit(":", 1)[1] for i in images} == {te.TRITON_RELEASE}


def test_gpu_and_cpu_overlays():
    gpu, cpu = render("gpu"), render("cpu")
    for c in (container(gpu, "triton"), container(gpu, "export", init=True)):
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    export_args = container(gpu, "export", init=True)["args"]
    assert export_args[export_args.index("--flavour") + 1] == "tensorrt"
    spec = pod(gpu)
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert spec["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert "nvidia.com/gpu" not in json.dumps(one(cpu, "Deployment"))
    cpu_args = container(cpu, "export", init=True)["args"]
    assert cpu_args[cpu_args.index("--flavour") + 1] == "onnxruntime"


def test_cert_manager_issues_the_secret_the_pods_mount():
    objs = render("gpu-cert-manager")
    cert = one(objs, "Certificate", TLS_SECRET)["spec"]
    assert cert["secretName"] == TLS_SECRET
    mounted = secret_mounts(pod(objs), container(objs, "triton"))[D.TLS_DIR]
    assert mounted["secretName"] == TLS_SECRET
    # the names clients dial: the Service, short and fully qualified (the load test's --host)
    svc = one(objs, "Service")["metadata"]
    args = locust(objs)["args"]
    host = args[args.index("--host") + 1].split(":")[0]
    assert host == svc["name"]
    assert {svc["name"], f"{svc['name']}.{svc['namespace']}.svc"} <= set(cert["dnsNames"])
    assert "server auth" in cert["usages"]
    # the issuer chain is complete: self-signed root -> CA certificate -> CA issuer -> server
    issuer = one(objs, "Issuer", cert["issuerRef"]["name"])["spec"]
    ca = one(objs, "Certificate", "medpclip-ca")["spec"]
    assert ca["isCA"] is True and issuer["ca"]["secretName"] == ca["secretName"]
    assert "selfSigned" in one(objs, "Issuer", ca["issuerRef"]["name"])["spec"]


def test_locust_job_runs_the_projects_locustfile():
    job = locust(render("cpu"))
    args = job["args"]
    path = args[args.index("-f") + 1]
    assert (
        path == "/opt/medpclip/perf/locustfile.py" and (ROOT / "perf" / "locustfile.py").is_file()
    )
    assert "COPY perf /opt/medpclip/perf" in (ROOT / "deploy/docker/locust.Dockerfile").read_text()
    assert "medpclip-triton:$(GRPC_PORT)" in args
