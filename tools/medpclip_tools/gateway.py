"""The front that owns the public ports: gRPC forwarding to Triton, health, keys and TLS.

Triton 2.51 (the bundled server, and NGC 24.10) crashes when a client cancels a request or lets
its deadline expire while a python-backend model is still answering (server#7368, #8034). The
gateway is a gRPC server of the same ``inference.GRPCInferenceService`` that forwards each call's
bytes to Triton on loopback **without** a deadline and never cancels the forwarded call: when a
client goes away, its answer is simply dropped once Triton gives it. Triton therefore never sees
a cancellation, whatever the clients do.

Being the only public door, it is also where the operator's policies live:

* **Keys.** ``authorization: Bearer <key>``. Health (ServerLive/Ready, ModelReady) is open;
  inference and model metadata need the API key when one is configured; every admin method
  (repository, config, statistics, shared memory, trace, logging, server metadata) needs the
  admin key and is refused outright when none is configured. One exception: the configuration
  of a public ensemble (``PUBLIC_CONFIGS``) is read as inference is, because it states the
  served model's identity, which clients such as the PACS bridge write into their reports;
  any other model's configuration stays admin-only. Keys come from files.
* **TLS** on the gRPC port (mutual TLS with a client CA).
* **Readiness that tells the truth** (:class:`HealthCheck`): Triton alive, every python-backend
  stub it started still alive, and a canary inference answered. ``ServerReady`` and the HTTP
  health port answer from that, and it is false while draining or restarting.
* **Bounded work**: at most ``max_inflight`` forwarded calls (abandoned ones count, they still
  occupy Triton); beyond that UNAVAILABLE, which clients retry with backoff.

Errors that mean "this server cannot answer now" (Triton down, a stub died) reach the client as
UNAVAILABLE so that the client's retries carry it over a restart. Nothing about a request is
logged.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from google.protobuf.message import DecodeError
from tritonclient.grpc import service_pb2 as pb

from medpclip_core.auth import AUTH_HEADER, read_key_file
from medpclip_core.tensors import ENSEMBLES

__all__ = ["Gateway", "HealthState", "Keys", "TlsFiles", "read_key"]

LOG = logging.getLogger(__name__)

SERVICE = "inference.GRPCInferenceService"
HEALTH = frozenset({"ServerLive", "ServerReady", "ModelReady"})
INFERENCE = frozenset({"ModelInfer", "ModelMetadata"})
STREAMING = "ModelStreamInfer"
# Everything else in the service is administration (Triton's restricted-protocol groups
# model-repository, model-config, statistics, shared-memory, trace, logging) plus
# ServerMetadata, which names the server version and extensions.
ADMIN = frozenset(
    m.name
    for m in pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods
    if m.name not in HEALTH | INFERENCE | {STREAMING}
)
# a call's invocation metadata, as grpc gives it
Metadata = tuple[tuple[str, str | bytes], ...] | None
CONFIG = "ModelConfig"
# The configurations an inference-level caller (the API key, or anyone where no API key is
# configured) may read: the ensembles clients call. They carry the served model's identity
# (medpclip.repository.model_identity: name, config, weights' SHA-256, version) so that a client
# holding only the API key can name the model that answered (least privilege: the PACS bridge
# needs no admin key), and otherwise hold what ModelMetadata and the committed model_repository/
# already tell. The composing models' configurations (encoders, pre/postprocess) and every other
# admin method stay behind the admin key.
PUBLIC_CONFIGS = frozenset(spec.name for spec in ENSEMBLES)
MAX_MESSAGE_BYTES = 2**31 - 1  # as tritonclient and Triton: raw PIXELS can be large
# Upstream failures that mean "not now" rather than "never": the python backend reports a dead
# stub as INTERNAL "Stub process '<instance>' is not healthy".
_TRANSIENT = ("is not healthy", "Stub process", "Failed to connect", "Socket closed")


def read_key(path: Path | str | None) -> bytes | None:
    """The key in ``path`` (see ``read_key_file``), None without a path."""
    return None if path is None else read_key_file(path).encode()


@dataclass(frozen=True)
class Keys:
    """The API key (inference) and admin key (everything), either may be absent."""

    api: bytes | None = None
    admin: bytes | None = None

    @staticmethod
    def _presented(metadata: Metadata) -> bytes | None:
        for key, value in metadata or ():
            if key == AUTH_HEADER:
                raw = value if isinstance(value, bytes) else value.encode()
                scheme, _, token = raw.partition(b" ")
                return token.strip() if scheme.lower() == b"bearer" else None
        return None

    def is_admin(self, metadata: Metadata) -> bool:
        """The caller presents the admin key (constant-time comparison)."""
        token = self._presented(metadata)
        return (
            self.admin is not None and token is not None and hmac.compare_digest(token, self.admin)
        )

    def is_inference_caller(self, metadata: Metadata) -> bool:
        """The caller may infer: no API key configured, or it presents the API key or the
        admin key (constant-time comparisons)."""
        if self.api is None or self.is_admin(metadata):
            return True
        token = self._presented(metadata)
        return token is not None and hmac.compare_digest(token, self.api)

    def refusal(self, method: str, metadata: Metadata) -> tuple[grpc.StatusCode, str] | None:
        """Why ``method`` is refused to a caller presenting ``metadata``, or None to allow.
        ``ModelConfig`` is allowed here to inference-level callers as well: for them the
        handler then allows only ``PUBLIC_CONFIGS`` (``config_refusal``, which needs the
        request). Constant-time comparisons; the presented value is never echoed."""
        if method in HEALTH:
            return None
        if method in INFERENCE or method == STREAMING or method == CONFIG:
            if self.is_inference_caller(metadata):
                return None
            # A ModelConfig caller is most often a client asking an ensemble for the model's
            # identity: it is told what an inference caller is told, and the admin alternative.
            also = " (or, for a model other than the public ensembles, the admin key)"
            return (
                grpc.StatusCode.UNAUTHENTICATED,
                f"this server needs an API key{also if method == CONFIG else ''}: send the "
                f"header '{AUTH_HEADER}: Bearer <key>' (medpclip-client: MEDPCLIP_API_KEY or "
                "--api-key-file)",
            )
        if self.admin is None:
            return (
                grpc.StatusCode.PERMISSION_DENIED,
                f"{method} is an admin method and this server has no admin key configured "
                "(start it with --admin-key-file to allow admin calls)",
            )
        if self.is_admin(metadata):
            return None
        return (
            grpc.StatusCode.UNAUTHENTICATED,
            f"{method} is an admin method: send the admin key as '{AUTH_HEADER}: Bearer <key>'",
        )

    def config_refusal(self, model: str) -> tuple[grpc.StatusCode, str] | None:
        """Why an inference-level (not admin) caller may not read ``model``'s configuration,
        or None for a public ensemble. The model name is never echoed (request data)."""
        if model in PUBLIC_CONFIGS:
            return None
        how = (
            "this server has no admin key configured"
            if self.admin is None
            else f"send the admin key as '{AUTH_HEADER}: Bearer <key>'"
        )
        return (
            grpc.StatusCode.PERMISSION_DENIED,
            "without the admin key only the configurations of the public ensembles "
            f"({', '.join(sorted(PUBLIC_CONFIGS))}) can be read; any other model's is "
            f"admin-only ({how})",
        )


@dataclass(frozen=True)
class TlsFiles:
    """Server certificate and key (PEM); with ``client_ca`` clients must present a
    certificate signed by it (mutual TLS)."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    def credentials(self) -> grpc.ServerCredentials:
        def read(path: Path, what: str) -> bytes:
            try:
                return Path(path).read_bytes()
            except OSError as exc:
                raise ValueError(f"cannot read TLS {what} {path}: {exc.strerror}") from None

        ca = read(self.client_ca, "client CA") if self.client_ca else None
        return grpc.ssl_server_credentials(
            [(read(self.key, "key"), read(self.cert, "certificate"))],
            root_certificates=ca,
            require_client_auth=ca is not None,
        )


@dataclass
class HealthState:
    """What readiness is made of. ``problem`` says why it is not ready (for logs and the HTTP
    body: never request data)."""

    phase: str = "starting"  # starting | serving | restarting | draining | stopped
    problem: str | None = "starting"
    since: float = field(default_factory=time.monotonic)

    @property
    def ready(self) -> bool:
        return self.phase == "serving" and self.problem is None

    def set(self, phase: str | None = None, problem: str | None = None) -> None:
        """Change phase and/or problem; logs each change once."""
        phase = phase or self.phase
        if (phase, problem) == (self.phase, self.problem):
            return
        was = self.ready
        self.phase, self.problem, self.since = phase, problem, time.monotonic()
        if was != self.ready or problem:
            LOG.log(
                logging.INFO if self.ready else logging.WARNING,
                "readiness: %s (%s%s)",
                "ready" if self.ready else "NOT ready",
                phase,
                f": {problem}" if problem else "",
            )


class Gateway:
    """The public gRPC server (forwarding to ``upstream``) and the HTTP health port.

    ``start()`` binds both; ``drain()`` makes readiness false while requests are still
    served; ``stop(grace)`` refuses new calls and waits for in-flight ones (their upstream
    calls included) up to ``grace`` seconds. ``upstream`` may change (a Triton restart).
    """

    def __init__(
        self,
        upstream: str,
        *,
        host: str = "127.0.0.1",
        grpc_port: int = 0,
        http_port: int = 0,
        keys: Keys = Keys(),
        tls: TlsFiles | None = None,
        max_inflight: int = 512,
        health: HealthState | None = None,
        hold_s: float = 30.0,
    ) -> None:
        self.host = host
        self.keys = keys
        self.tls = tls
        self.max_inflight = max_inflight
        self.hold_s = hold_s
        self.health = health if health is not None else HealthState()
        self.grpc_port = grpc_port
        self.http_port = http_port
        self._upstream_url = upstream
        self._channel: grpc.aio.Channel | None = None
        self._server: grpc.aio.Server | None = None
        self._http: asyncio.base_events.Server | None = None
        self._inflight: set[asyncio.Task] = set()
        self.abandoned = 0  # forwarded calls whose client had gone when Triton answered

    # -- upstream ------------------------------------------------------------------------------

    def _channel_for(self, url: str) -> grpc.aio.Channel:
        return grpc.aio.insecure_channel(
            url,
            options=[
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                # reconnect quickly after a Triton restart (the default grows to 120 s)
                ("grpc.initial_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", 1000),
            ],
        )

    async def set_upstream(self, url: str) -> None:
        """Point new calls at ``url``; calls in flight finish on the old channel."""
        old, self._upstream_url = self._channel, url
        self._channel = self._channel_for(url)
        LOG.info("gateway: forwarding to Triton at %s", url)
        if old is not None:
            asyncio.get_running_loop().create_task(self._close_later(old))

    async def _close_later(self, channel: grpc.aio.Channel) -> None:
        while self._inflight:
            await asyncio.sleep(0.2)
        await channel.close()

    @property
    def upstream(self) -> str:
        return self._upstream_url

    async def call_upstream(self, method: str, request: bytes) -> bytes:
        """One unary call to Triton: no deadline, no metadata, never cancelled."""
        if self._channel is None:
            self._channel = self._channel_for(self._upstream_url)
        return await self._channel.unary_unary(f"/{SERVICE}/{method}")(request)

    # -- serving -------------------------------------------------------------------------------

    async def start(self) -> None:
        server = grpc.aio.server(
            options=[
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.so_reuseport", 0),  # a second server on the same port must fail, loudly
            ],
        )
        server.add_generic_rpc_handlers((_Handler(self),))
        address = f"{_bracket(self.host)}:{self.grpc_port}"
        try:
            if self.tls is not None:
                port = server.add_secure_port(address, self.tls.credentials())
            else:
                port = server.add_insecure_port(address)
        except RuntimeError:  # grpc's "Failed to bind": an OSError for the caller
            raise OSError(
                f"cannot listen on {address} (gRPC): the port is taken or the "
                "address is not this machine's"
            ) from None
        self.grpc_port = port
        await server.start()
        self._server = server
        self._http = await asyncio.start_server(self._serve_http, self.host, self.http_port)
        self.http_port = self._http.sockets[0].getsockname()[1]
        LOG.info(
            "gateway: gRPC %s:%d%s, health http://%s:%d",
            self.host,
            self.grpc_port,
            " (TLS)" if self.tls else "",
            self.host,
            self.http_port,
        )

    def drain(self) -> None:
        self.health.set("draining", "stopping")

    async def stop(self, grace: float) -> int:
        """Stop accepting calls; wait up to ``grace`` s for in-flight ones, forwarded calls
        whose client is gone included (Triton must be idle before it is told to exit).
        Returns how many were still running when the time was up."""
        self.health.set("draining", "stopping")
        deadline = time.monotonic() + grace
        if self._server is not None:
            await self._server.stop(grace)
        while self._inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        left = len(self._inflight)
        if self._http is not None:
            self._http.close()
        if self._channel is not None and not left:
            await self._channel.close()
        self.health.set("stopped", "stopped")
        return left

    async def _wait_until_serving(self) -> bool:
        """While Triton is (re)starting or known broken (a restart is coming), hold the call
        for up to ``hold_s`` rather than fail it: a restart then costs latency, not requests.
        The caller's deadline still applies (it cancels this wait, and nothing was sent)."""
        deadline = time.monotonic() + self.hold_s
        while not self.health.ready and self.health.phase != "draining":
            if self.health.phase == "stopped" or time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    async def forward(self, method: str, request: bytes, context: grpc.aio.ServicerContext):
        if not self.health.ready and not await self._wait_until_serving():
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"server is {self.health.phase}; retry shortly",
            )
        if len(self._inflight) >= self.max_inflight:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"server overloaded ({len(self._inflight)} requests in flight); retry later",
            )
        # The forwarded call runs as its own task, shielded from this handler's cancellation
        # (a client deadline or cancel): Triton always sees it through to the end.
        task = asyncio.ensure_future(self.call_upstream(method, request))
        self._inflight.add(task)
        task.add_done_callback(self._done)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.abandoned = True  # type: ignore[attr-defined]
            raise
        except grpc.aio.AioRpcError as exc:
            code, details = exc.code(), exc.details() or ""
            if code == grpc.StatusCode.INTERNAL and any(s in details for s in _TRANSIENT):
                code = grpc.StatusCode.UNAVAILABLE
                details = "a model process of this server died; it is being restarted, retry"
            elif code == grpc.StatusCode.UNAVAILABLE:
                details = "inference server not reachable (restarting?); retry"
            await context.abort(code, details)

    def _done(self, task: asyncio.Task) -> None:
        self._inflight.discard(task)
        if getattr(task, "abandoned", False):
            self.abandoned += 1
        if not task.cancelled():
            task.exception()  # retrieved, so asyncio does not log "never retrieved"

    async def server_ready(self, request: bytes, context) -> bytes:
        return pb.ServerReadyResponse(ready=self.health.ready).SerializeToString()

    async def public_config(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        """``ModelConfig`` for an inference-level caller: a public ensemble's only."""
        try:
            asked = pb.ModelConfigRequest.FromString(request)
        except DecodeError:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "not a ModelConfigRequest")
            return b""  # not reached
        refusal = self.keys.config_refusal(asked.name)
        if refusal is not None:
            await context.abort(*refusal)
            return b""  # not reached
        # Forward the request as checked here, re-serialised, not the bytes received: Triton
        # then parses exactly the name judged above (no unknown fields, no repeated field that
        # two parsers might resolve differently).
        checked = pb.ModelConfigRequest(name=asked.name, version=asked.version)
        return await self.forward(CONFIG, checked.SerializeToString(), context)

    async def model_ready(self, request: bytes, context) -> bytes:
        if not self.health.ready:
            return pb.ModelReadyResponse(ready=False).SerializeToString()
        return await self.forward("ModelReady", request, context)

    # -- HTTP health ---------------------------------------------------------------------------

    async def _serve_http(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        """Just enough HTTP/1.1 for probes: GET /v2/health/live and /v2/health/ready."""
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            while (await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b"\n", b""):
                pass  # headers are not needed
            parts = line.split()
            path = parts[1].decode(errors="replace") if len(parts) >= 2 else ""
            if path == "/v2/health/live":
                status, body = 200, "live"
            elif path == "/v2/health/ready":
                h = self.health
                status, body = (200, "ready") if h.ready else (503, f"not ready: {h.problem}")
            else:
                status, body = 404, "only /v2/health/live and /v2/health/ready are served here"
            reason = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}[status]
            data = body.encode()
            writer.write(
                f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\n"
                f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode()
                + data
            )
            await writer.drain()
        except (asyncio.TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()


class _Handler(grpc.GenericRpcHandler):
    """Routes every method of the inference service: refuses by key, answers readiness
    locally, forwards the rest as bytes."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    def service(self, details: grpc.HandlerCallDetails):
        service, _, method = details.method.lstrip("/").partition("/")
        if service != SERVICE:
            return None  # gRPC answers UNIMPLEMENTED
        refusal = self.gateway.keys.refusal(method, details.invocation_metadata)
        if refusal is not None:
            return grpc.unary_unary_rpc_method_handler(_abort_with(*refusal))
        if method == STREAMING:
            return grpc.stream_stream_rpc_method_handler(_refuse_stream)
        if method == "ServerReady":
            return grpc.unary_unary_rpc_method_handler(self.gateway.server_ready)
        if method == "ModelReady":
            return grpc.unary_unary_rpc_method_handler(self.gateway.model_ready)
        if method == CONFIG and not self.gateway.keys.is_admin(details.invocation_metadata):
            return grpc.unary_unary_rpc_method_handler(self.gateway.public_config)
        gateway = self.gateway

        async def forward(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            return await gateway.forward(method, request, context)

        return grpc.unary_unary_rpc_method_handler(forward)


def _abort_with(code: grpc.StatusCode, message: str) -> Callable[..., Awaitable[bytes]]:
    async def abort(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await context.abort(code, message)
        return b""  # not reached

    return abort


async def _refuse_stream(requests, context: grpc.aio.ServicerContext):
    await context.abort(
        grpc.StatusCode.UNIMPLEMENTED,
        "streaming inference is not offered (the ensembles are not decoupled); use ModelInfer",
    )
    yield b""  # not reached: makes this an async generator, as a stream handler must be


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
