"""Who may call what: the gateway's admin key, API key and mutual TLS, with real certificates.

- without an admin key configured, every admin method (repository, config, statistics, shared
  memory, trace, logging, server metadata) is refused; health and inference are not;
- with keys: inference needs the API key, admin methods the admin key; a client without a
  certificate signed by the client CA cannot even connect (mutual TLS);
- keys never appear on a command line (`ps`) or in a log.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import psutil
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from medpclip_client import MedPClipClient, MedPClipError, Region
from medpclip_tools.serve import ServeProcess

API_KEY, ADMIN_KEY = "api-7f3c9e", "admin-51d2aa"
PIXELS = np.full((64, 80), 120, np.uint8)

# (tritonclient method, args) for every admin method group of Triton's gRPC service
ADMIN_CALLS = [
    ("get_server_metadata", ()),
    ("get_model_repository_index", ()),
    ("get_model_config", ("medp_clip",)),
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
    assert _status(c.get_model_config, "medp_clip", headers=_bearer(ADMIN_KEY)) == "OK"
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
