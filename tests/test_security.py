"""Who may call what: the gateway's admin key, API key and mutual TLS, with real certificates.

- without an admin key configured, every admin method (repository, config, statistics, shared
  memory, trace, logging, server metadata) is refused; health and inference are not;
- with keys: inference needs the API key, admin methods the admin key; a client without a
  certificate signed by the client CA cannot even connect (mutual TLS);
- one admin method is read at inference level for the public ensembles only: their
  configurations (`ModelConfig`), which state the served model's identity (the PACS bridge
  needs no admin key); every other model's configuration stays admin-only, whatever the bytes;
- keys never appear on a command line (`ps`) or in a log.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import grpc as grpclib
import numpy as np
import psutil
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2 as pb
from tritonclient.utils import InferenceServerException

from medpclip import repository
from medpclip_client import MedPClipClient, MedPClipError, Region
from medpclip_core import tensors as T
from medpclip_tools.serve import ServeProcess

API_KEY, ADMIN_KEY = "api-7f3c9e", "admin-51d2aa"
PIXELS = np.full((64, 80), 120, np.uint8)
ENSEMBLES = [spec.name for spec in T.ENSEMBLES]
# models whose configuration stays admin-only: every composing step, and names that are not
# an ensemble's however close (the gateway compares exactly, as Triton looks models up)
COMPOSING = [spec.name for spec in T.ALL_MODELS if spec not in T.ENSEMBLES]
NOT_ENSEMBLES = [*COMPOSING, "", "MEDP_CLIP", "medp_clip ", "medp_clip/../postprocess"]
CONFIG_METHOD = "/inference.GRPCInferenceService/ModelConfig"

# (tritonclient method, args) for every admin method group of Triton's gRPC service; the
# configuration asked for is a composing model's (an ensemble's is read at inference level)
ADMIN_CALLS = [
    ("get_server_metadata", ()),
    ("get_model_repository_index", ()),
    ("get_model_config", ("postprocess",)),
    ("get_model_config", ("image_encoder",)),
    ("get_inference_statistics", ()),
    ("unload_model", ("medp_clip",)),
    ("load_model", ("medp_clip",)),
    ("update_log_settings", ({"log_verbose_level": 2},)),
    ("get_log_settings", ()),
    ("get_trace_settings", ()),
    ("get_system_shared_memory_status", ()),
    ("register_system_shared_memory", ("r", "/medpclip_test", 64)),
    ("unregister_cuda_shared_memory", ()),
]


def _status(fn, *args, **kwargs) -> str:
    try:
        fn(*args, **kwargs)
    except InferenceServerException as exc:
        return str(exc.status()).replace("StatusCode.", "")
    return "OK"


def test_admin_methods_are_refused_without_an_admin_key(server, grpc):
    for method, args in ADMIN_CALLS:
        assert _status(getattr(grpc, method), *args) == "PERMISSION_DENIED", method
    # health stays open (probes carry no key); inference is open on this keyless server
    assert grpc.is_server_live() and grpc.is_server_ready() and grpc.is_model_ready("medp_clip")
    with MedPClipClient(server.grpc_url) as c:
        assert c.infer(PIXELS, Region(points=[(5, 5)]), ["a", "b"]).region_probs.shape == (2,)


def _identity(config) -> dict[str, str]:
    """The identity parameters of a ModelConfigResponse's config."""
    params = config.config.parameters
    return {k: params[k].string_value for k in repository.IDENTITY_KEYS if k in params}


def _raw_config(url: str, request: bytes, **channel) -> tuple[str, bytes | str]:
    """ModelConfig with hand-made request bytes: ('OK', response bytes) or (status, details)."""
    make = grpclib.secure_channel if channel else grpclib.insecure_channel
    with make(url, **channel) as ch:
        call = ch.unary_unary(CONFIG_METHOD)
        try:
            return "OK", call(request, timeout=30)
        except grpclib.RpcError as exc:
            return exc.code().name, exc.details() or ""


def test_ensemble_configs_are_read_like_inference(server, grpc, checkpoint):
    """On a server without keys (inference open, no admin key): every ensemble's configuration
    is answered, with the served model's identity; any other model's is refused as admin-only,
    without echoing the name asked for; the identity the client reads is the export's."""
    identity = repository.model_identity(checkpoint)
    for name in ENSEMBLES:
        config = grpc.get_model_config(name)
        assert config.config.name == name and config.config.platform == "ensemble"
        assert _identity(config) == identity, name
    for name in NOT_ENSEMBLES:
        status, details = _raw_config(
            server.grpc_url, pb.ModelConfigRequest(name=name).SerializeToString()
        )
        assert status == "PERMISSION_DENIED", (name, status, details)
        assert "admin-only" in details and "no admin key configured" in details
        if name in COMPOSING:
            assert name not in details  # the name asked for is never echoed
    secret = "patient-doe-4711"
    status, details = _raw_config(
        server.grpc_url, pb.ModelConfigRequest(name=secret).SerializeToString()
    )
    assert status == "PERMISSION_DENIED" and secret not in details
    with MedPClipClient(server.grpc_url, retries=0) as client:
        assert client.model_identity() == identity
        for name in ENSEMBLES:
            assert client.model_identity(name) == identity
        with pytest.raises(MedPClipError) as info:
            client.model_identity("postprocess")
        assert info.value.denied


def test_the_model_name_judged_is_the_one_forwarded(server):
    """The name the gateway judges is the one Triton answers for: a request naming the model
    twice is judged by the last name (protobuf's rule, which Triton follows), unknown fields do
    not smuggle a name, and bytes that are no request are INVALID_ARGUMENT."""
    ensemble = pb.ModelConfigRequest(name="medp_clip").SerializeToString()
    composing = pb.ModelConfigRequest(name="postprocess").SerializeToString()
    status, _ = _raw_config(server.grpc_url, ensemble + composing)
    assert status == "PERMISSION_DENIED"
    status, answer = _raw_config(server.grpc_url, composing + ensemble)
    assert status == "OK"
    assert pb.ModelConfigResponse.FromString(answer).config.name == "medp_clip"
    unknown = b"\x1a\x0bpostprocess"  # field 3 (not in ModelConfigRequest), a string
    status, answer = _raw_config(server.grpc_url, ensemble + unknown)
    assert status == "OK"
    assert pb.ModelConfigResponse.FromString(answer).config.name == "medp_clip"
    status, details = _raw_config(server.grpc_url, b"\x0a\xff\xff")  # a truncated field
    assert status == "INVALID_ARGUMENT" and details == "not a ModelConfigRequest"


def test_streaming_is_not_offered(grpc):
    import queue

    errors: queue.Queue = queue.Queue()
    grpc.start_stream(callback=lambda result, error: errors.put(error))
    try:
        inp = grpcclient.InferInput("LABELS", [1], "BYTES")
        inp.set_data_from_numpy(np.array([b"a cyst"], dtype=object))
        try:
            grpc.async_stream_infer("medp_clip_text", [inp])
        except InferenceServerException:
            pass  # the stream may already be closed by the refusal: it is in the callback
        error = errors.get(timeout=30)
    finally:
        grpc.stop_stream()
    assert error is not None and "streaming inference is not offered" in str(error)


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def _certificates(d: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, both signed by it."""
    names = ("ca", "ca-key", "server", "server-key", "client", "client-key")
    f = {n: d / f"{n}.pem" for n in names}
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=test CA",
             "-keyout", str(f["ca-key"]), "-out", str(f["ca"]))  # fmt: skip
    for who, san in (("server", "subjectAltName=IP:127.0.0.1,DNS:localhost"), ("client", None)):
        csr = d / f"{who}.csr"
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={who}",
                 "-keyout", str(f[f"{who}-key"]), "-out", str(csr))  # fmt: skip
        ext = d / f"{who}.ext"
        ext.write_text(san or "extendedKeyUsage=clientAuth")
        _openssl("x509", "-req", "-in", str(csr), "-CA", str(f["ca"]),
                 "-CAkey", str(f["ca-key"]), "-CAcreateserial", "-days", "1",
                 "-out", str(f[who]), "-extfile", str(ext))  # fmt: skip
    return f


@pytest.fixture(scope="module")
def locked(build_dir, tmp_path_factory):
    """A server with mutual TLS, an API key and an admin key."""
    if shutil.which("openssl") is None:
        pytest.skip("no openssl binary to make certificates")
    d = tmp_path_factory.mktemp("locked")
    certs = _certificates(d)
    (d / "api-key").write_text(API_KEY + "\n")
    (d / "admin-key").write_text(ADMIN_KEY)
    args = [
        "--tls-cert", str(certs["server"]), "--tls-key", str(certs["server-key"]),
        "--tls-client-ca", str(certs["ca"]),
        "--api-key-file", str(d / "api-key"), "--admin-key-file", str(d / "admin-key"),
    ]  # fmt: skip
    with ServeProcess(build_dir / "model_repository", args=args, log_file=d / "serve.log") as s:
        yield s, certs


def _triton(server: ServeProcess, certs: dict[str, Path], client_cert: bool = True):
    tls = {"root_certificates": str(certs["ca"])}
    if client_cert:
        tls |= {"private_key": str(certs["client-key"]), "certificate_chain": str(certs["client"])}
    return grpcclient.InferenceServerClient(server.grpc_url, ssl=True, **tls)


def _bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def test_keys_and_mutual_tls(locked):
    server, certs = locked
    c = _triton(server, certs)
    # health needs no key
    assert c.is_server_ready()
    # admin: refused without a key and with the API key, allowed with the admin key
    for headers in (None, _bearer(API_KEY), _bearer("admin-wrong")):
        assert _status(c.get_model_repository_index, headers=headers) == "UNAUTHENTICATED"
    index = c.get_model_repository_index(headers=_bearer(ADMIN_KEY))
    assert {"medp_clip", "image_encoder"} <= {m.name for m in index.models}
    for name in (*ENSEMBLES, *COMPOSING):  # the admin key reads every configuration
        assert _status(c.get_model_config, name, headers=_bearer(ADMIN_KEY)) == "OK", name
    # inference: the API key (or the admin key), nothing else
    mtls = {
        "root_certificates": certs["ca"],
        "private_key": certs["client-key"],
        "certificate_chain": certs["client"],
        "retries": 0,
    }
    for key in (API_KEY, ADMIN_KEY):
        with MedPClipClient(server.grpc_url, api_key=key, **mtls) as client:
            assert client.text_embeddings(["a cyst"]).shape[0] == 1
    for key in (None, "nope"):
        with MedPClipClient(server.grpc_url, api_key=key, **mtls) as client:
            with pytest.raises(MedPClipError) as info:
                client.text_embeddings(["a cyst"])
            assert info.value.denied and "nope" not in str(info.value)
    # no client certificate: the TLS handshake fails, nothing is served
    with MedPClipClient(
        server.grpc_url, api_key=API_KEY, root_certificates=certs["ca"], retries=0, timeout_s=10
    ) as client:
        with pytest.raises(MedPClipError) as info:
            client.text_embeddings(["a cyst"])
        assert info.value.unavailable


def test_the_api_key_reads_ensemble_configs_only(locked, checkpoint):
    """With an API key and an admin key configured: the API key reads every ensemble's
    configuration (the served model's identity) and nothing else of the admin API (composing
    models' configurations PERMISSION_DENIED, other admin methods UNAUTHENTICATED); without a
    key or with a wrong one even an ensemble's is refused."""
    server, certs = locked
    c = _triton(server, certs)
    identity = repository.model_identity(checkpoint)
    for name in ENSEMBLES:
        config = c.get_model_config(name, headers=_bearer(API_KEY))
        assert _identity(config) == identity, name
        for headers in (None, _bearer("api-wrong"), {"authorization": API_KEY}):  # no Bearer
            assert _status(c.get_model_config, name, headers=headers) == "UNAUTHENTICATED"
    for name in COMPOSING:
        assert _status(c.get_model_config, name, headers=_bearer(API_KEY)) == (
            "PERMISSION_DENIED"
        ), name
    for method, args in ADMIN_CALLS:
        expected = "PERMISSION_DENIED" if method == "get_model_config" else "UNAUTHENTICATED"
        assert _status(getattr(c, method), *args, headers=_bearer(API_KEY)) == expected, method
    tls = {
        "root_certificates": certs["ca"].read_bytes(),
        "private_key": certs["client-key"].read_bytes(),
        "certificate_chain": certs["client"].read_bytes(),
    }
    channel = {"credentials": grpclib.ssl_channel_credentials(**tls)}
    status, details = _raw_config(
        server.grpc_url, pb.ModelConfigRequest(name="postprocess").SerializeToString(), **channel
    )
    assert status == "UNAUTHENTICATED" and "postprocess" not in details  # no key at all
    mtls = {
        "root_certificates": certs["ca"],
        "private_key": certs["client-key"],
        "certificate_chain": certs["client"],
        "retries": 0,
    }
    with MedPClipClient(server.grpc_url, api_key=API_KEY, **mtls) as client:
        assert client.model_identity() == identity
        with pytest.raises(MedPClipError) as info:
            client.model_identity("postprocess")
        assert info.value.denied and "send the admin key" in info.value.message
    with MedPClipClient(server.grpc_url, **mtls) as client:
        with pytest.raises(MedPClipError) as info:
            client.model_identity()
        assert info.value.denied


def test_keys_are_never_on_a_command_line_or_in_a_log(locked):
    server, _ = locked
    launcher = psutil.Process(server.pid)
    for p in [launcher, *launcher.children(recursive=True)]:
        try:
            argv = " ".join(p.cmdline())
            env = p.environ()
        except psutil.Error:
            continue
        assert API_KEY not in argv and ADMIN_KEY not in argv, p.name()
        assert not any(API_KEY in v or ADMIN_KEY in v for v in env.values()), p.name()
    logs = server.log_file.read_text() + server.log_file.with_suffix(".triton.log").read_text()
    assert "gateway" in logs and API_KEY not in logs and ADMIN_KEY not in logs
