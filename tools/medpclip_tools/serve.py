"""``python -m medpclip_tools.serve``: Triton behind the gateway, the way every deployment runs it.

The launcher starts ``tritonserver`` on loopback (:mod:`medpclip_tools.triton_process`) and
the gateway on the public ports (:mod:`medpclip_tools.gateway`), watches both
(:mod:`medpclip_tools.supervisor`) and stops them in order. :class:`ServeProcess` runs the
launcher as a child process, for the demo, the tests and scripts that need a server the way
users get one.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterable, Sequence
from pathlib import Path

from medpclip_core.auth import AUTH_HEADER

from . import deployment as D
from .gateway import Keys, TlsFiles, read_key
from .supervisor import Options, Supervisor
from .triton_process import (
    DEFAULT_CACHE,
    DEFAULT_REPOSITORY,
    Endpoints,
    TritonServer,
    _format_host,
    _free_ports,
    _tail,
)

__all__ = ["DEFAULT_REPOSITORY", "ServeProcess", "TritonServer", "main"]

LOG = logging.getLogger("medpclip_tools.serve")
READY_PREFIX = "Triton ready:"
NGC_TRITONSERVER = Path("/opt/tritonserver/bin/tritonserver")


def _bundled_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("pytriton") is not None


_DESCRIPTION = """\
Serve a Triton model repository the way every deployment of MedP-CLIP runs it: tritonserver on
127.0.0.1, and in front of it a gateway that owns the public ports.

The gateway forwards gRPC to Triton and never passes a client's cancellation or deadline on
(Triton 2.51 crashes on them), refuses admin calls without the admin key, can require an API key
for inference, serves TLS, and answers an HTTP port with the health paths only:
/v2/health/live, and /v2/health/ready, which is a deep check (Triton and every python-backend
stub alive, a canary inference answered) and is false while draining or restarting. A problem
that lasts restarts Triton on its own.

Prints one line once ready:

  Triton ready: gRPC HOST:PORT, HTTP http://HOST:PORT, metrics http://HOST:PORT/metrics

On SIGTERM or Ctrl-C: readiness goes false while requests are still served (--drain-seconds),
then no new requests, in-flight ones finish (--stop-timeout), then Triton exits. A second
signal skips the drain. Keys and certificates come from files, never from the command line.
Diagnostics go to stderr (no request data); Triton's output is appended to --log-file.

exit codes: 0 after a requested stop, 1 if the server fails to start or dies for good, 2 usage.
"""

_EPILOG = f"""\
examples:
  python -m medpclip_tools.serve --repository build/model_repository
  python -m medpclip_tools.serve --grpc-port 0 --http-port 0 --metrics-port 0   # free ports
  python -m medpclip_tools.serve --host 0.0.0.0 --tls-cert tls.crt --tls-key tls.key \\
      --api-key-file api-key --admin-key-file admin-key

clients send keys as the header '{AUTH_HEADER}: Bearer <key>'
(medpclip-client: MEDPCLIP_API_KEY or --api-key-file).
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m medpclip_tools.serve",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--repository",
        type=Path,
        default=DEFAULT_REPOSITORY,
        metavar="DIR",
        help="Triton model repository to serve (default: %(default)s)",
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address the public ports bind to; 0.0.0.0 exposes them (default: %(default)s)",
    )
    for name, default, what in (
        ("grpc", D.GRPC_PORT, "gRPC (the gateway)"),
        ("http", D.HTTP_PORT, "HTTP health (/v2/health/live, /v2/health/ready)"),
        ("metrics", D.METRICS_PORT, "Triton's Prometheus metrics"),
    ):
        p.add_argument(
            f"--{name}-port",
            type=int,
            default=default,
            metavar="PORT",
            help=f"{what} port; 0 picks a free one (default: %(default)s)",
        )
    sec = p.add_argument_group("security (files only: nothing secret on the command line)")
    sec.add_argument("--tls-cert", type=Path, metavar="FILE", help="server certificate (PEM)")
    sec.add_argument("--tls-key", type=Path, metavar="FILE", help="server private key (PEM)")
    sec.add_argument(
        "--tls-client-ca",
        type=Path,
        metavar="FILE",
        help="require client certificates signed by this CA (mutual TLS)",
    )
    sec.add_argument(
        "--api-key-file",
        type=Path,
        metavar="FILE",
        default=os.environ.get("MEDPCLIP_API_KEY_FILE") or None,
        help="inference needs this key (env MEDPCLIP_API_KEY_FILE); default: open inference",
    )
    sec.add_argument(
        "--admin-key-file",
        type=Path,
        metavar="FILE",
        default=os.environ.get("MEDPCLIP_ADMIN_KEY_FILE") or None,
        help="admin calls (repository, config, statistics, shared memory, trace, logging) "
        "need this key (env MEDPCLIP_ADMIN_KEY_FILE); default: admin calls refused",
    )
    life = p.add_argument_group("lifecycle")
    life.add_argument(
        "--drain-seconds",
        type=float,
        default=D.DRAIN_S,
        metavar="S",
        help="on SIGTERM, seconds of 'not ready but serving' (default: %(default)s)",
    )
    life.add_argument(
        "--stop-timeout",
        type=float,
        default=D.STOP_TIMEOUT_S,
        metavar="S",
        help="then, seconds in-flight requests get to finish (default: %(default)s)",
    )
    life.add_argument(
        "--restart-after",
        type=float,
        default=5.0,
        metavar="S",
        help="restart Triton when a health problem lasts this long (default: %(default)s)",
    )
    life.add_argument(
        "--startup-timeout",
        type=float,
        default=120.0,
        metavar="S",
        help="how long to wait for all models to load (default: %(default)s)",
    )
    p.add_argument(
        "--triton-grpc-port",
        type=int,
        default=0,
        metavar="PORT",
        help="Triton's own gRPC port on 127.0.0.1, behind the gateway (default: a free one). "
        "Only for tools on this host that cannot send the admin key, such as perf_analyzer "
        "(it sends no gRPC headers); clients use --grpc-port",
    )
    p.add_argument(
        "--tritonserver",
        type=Path,
        metavar="PATH",
        help="tritonserver binary (default: the one bundled in nvidia-pytriton, else "
        f"{NGC_TRITONSERVER} as in NVIDIA's images)",
    )
    p.add_argument(
        "--log-file",
        type=Path,
        metavar="FILE",
        help="Triton's output, appended and rotated (default: CACHE/logs/tritonserver-PORT.log)",
    )
    p.add_argument(
        "--cache",
        type=Path,
        default=DEFAULT_CACHE,
        metavar="DIR",
        help="python backend directory and default log folder (default: %(default)s)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def options(args: argparse.Namespace) -> Options:
    """Options from parsed arguments; ValueError names what is wrong (a file, a pair)."""
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ValueError("--tls-cert and --tls-key go together")
    if args.tls_client_ca is not None and args.tls_cert is None:
        raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")
    tls = TlsFiles(args.tls_cert, args.tls_key, args.tls_client_ca) if args.tls_cert else None
    if tls is not None:
        tls.credentials()  # read now: a bad file is a usage error, not a runtime surprise
    executable = args.tritonserver
    if executable is None and not _bundled_available() and NGC_TRITONSERVER.is_file():
        executable = NGC_TRITONSERVER
    if args.log_file is None:
        args.log_file = args.cache / "logs" / f"tritonserver-{args.grpc_port or 'any'}.log"
    return Options(
        repository=args.repository,
        host=args.host,
        grpc_port=args.grpc_port,
        http_port=args.http_port,
        metrics_port=args.metrics_port,
        triton_grpc_port=args.triton_grpc_port,
        keys=Keys(api=read_key(args.api_key_file), admin=read_key(args.admin_key_file)),
        tls=tls,
        executable=executable,
        log_file=args.log_file,
        cache=args.cache,
        startup_timeout_s=args.startup_timeout,
        drain_s=args.drain_seconds,
        stop_timeout_s=args.stop_timeout,
        restart_after_s=args.restart_after,
    )


def _ready_line(sup: Supervisor) -> str:
    o, gw = sup.opts, sup.gateway
    host = _format_host(o.host)
    return (
        f"{READY_PREFIX} gRPC {host}:{gw.grpc_port}{' (TLS)' if o.tls else ''}, "
        f"HTTP http://{host}:{gw.http_port}, metrics http://{host}:{o.metrics_port}/metrics"
    )


async def _serve(opts: Options) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    sup = Supervisor(opts, on_ready=lambda s: print(_ready_line(s), flush=True))

    def on_signal(sig: signal.Signals) -> None:
        if stop.is_set():
            LOG.info("received %s again: skipping the drain", sig.name)
            sup.hurry()
        else:
            LOG.info("received %s: shutting down", sig.name)
            stop.set()
            sup.interrupt_start()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        return await sup.run(stop)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def main(argv: Iterable[str] | None = None) -> int:
    """CLI entry point; returns the process exit code."""
    args = _parser().parse_args(None if argv is None else list(argv))
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        opts = options(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not opts.repository.is_dir():
        print(f"error: model repository not found: {opts.repository}", file=sys.stderr)
        return 1
    try:
        return asyncio.run(_serve(opts))
    except OSError as exc:  # a port taken, an address that is not ours
        print(f"error: {exc}", file=sys.stderr)
        return 1


# --------------------------------------------------------------------------------------------
# The launcher as a child process
# --------------------------------------------------------------------------------------------


class ServeProcess(Endpoints):
    """``python -m medpclip_tools.serve`` as a child process on free loopback ports.

    Example::

        with ServeProcess(Path("build/model_repository")) as server:
            client = MedPClipClient(server.grpc_url)

    ``args`` are passed on (e.g. key files). The launcher's stderr goes to ``log_file``;
    startup errors include its last lines. ``drain_s`` defaults to 0: a local server has no
    load balancer to wait for.
    """

    def __init__(
        self,
        repository: Path,
        *,
        args: Sequence[str] = (),
        log_file: Path | None = None,
        drain_s: float = 0,
        startup_timeout: float = 120,
        cache: Path | None = None,
        ports: Sequence[int] | None = None,
    ) -> None:
        self.repository = Path(repository).resolve()
        # (gRPC, HTTP health, metrics, Triton's own gRPC); a restart test reuses a server's
        ports = list(ports) if ports is not None else _free_ports("127.0.0.1", 4)
        self.grpc_port, self.http_port, self.metrics_port, self.triton_grpc_port = ports
        self.host = self.metrics_host = "127.0.0.1"
        self.cache = Path(cache) if cache is not None else DEFAULT_CACHE
        self.log_file = (
            Path(log_file) if log_file else self.cache / "logs" / f"serve-{self.grpc_port}.log"
        )
        self.args = [
            f"--repository={self.repository}",
            f"--host={self.host}",
            f"--grpc-port={self.grpc_port}",
            f"--http-port={self.http_port}",
            f"--metrics-port={self.metrics_port}",
            f"--triton-grpc-port={self.triton_grpc_port}",
            f"--drain-seconds={drain_s}",
            f"--cache={self.cache}",
            f"--log-file={self.log_file.with_suffix('.triton.log')}",
            *args,
        ]
        self.startup_timeout = startup_timeout
        self._process: subprocess.Popen[bytes] | None = None
        self.ready_line: str | None = None

    @property
    def ports(self) -> tuple[int, int, int, int]:
        return (self.grpc_port, self.http_port, self.metrics_port, self.triton_grpc_port)

    @property
    def triton_url(self) -> str:
        """Triton itself, behind the gateway (for perf_analyzer, which sends no keys)."""
        return f"127.0.0.1:{self.triton_grpc_port}"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "medpclip_tools.serve", *self.args]

    def start(self) -> ServeProcess:
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("ab") as log:
            self._process = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
                start_new_session=True,  # a terminal's Ctrl-C is ours to forward, in order
            )
        ready = threading.Event()
        threading.Thread(target=self._read_stdout, args=(ready,), daemon=True).start()
        deadline = time.monotonic() + self.startup_timeout
        while not ready.wait(0.2):
            if self._process.poll() is not None or time.monotonic() > deadline:
                code = self._process.poll()
                self.stop()
                what = f"exited with code {code}" if code is not None else "not ready in time"
                raise RuntimeError(
                    f"medpclip_tools.serve {what}; last lines of {self.log_file}:\n"
                    f"{_tail(self.log_file)}"
                )
        return self

    def _read_stdout(self, ready: threading.Event) -> None:
        assert self._process is not None and self._process.stdout is not None
        for raw in self._process.stdout:
            line = raw.decode(errors="replace").strip()
            if line.startswith(READY_PREFIX):
                self.ready_line = line
                ready.set()

    def ready(self) -> bool:
        """The deep readiness the gateway reports on its HTTP port."""
        try:
            with urllib.request.urlopen(f"{self.http_url}/v2/health/ready", timeout=5) as r:
                return r.status == 200
        except OSError:
            return False

    def signal(self, sig: int) -> None:
        if self._process is not None:
            self._process.send_signal(sig)

    def stop(self, timeout: float = D.GRACE_PERIOD_S) -> int | None:
        """SIGTERM and wait (SIGKILL to the whole group past ``timeout``)."""
        proc = self._process
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                LOG.warning("medpclip_tools.serve did not stop in %g s; killing it", timeout)
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self._process = None
        return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
