"""Run a real Triton Inference Server from the ``nvidia-pytriton`` wheel, without Docker.

The PyPI wheel ``nvidia-pytriton`` bundles a complete ``tritonserver`` (Triton 2.51, r24.10) with
the python backend, but laid out for PyTriton's own launcher rather than Triton's container layout.
This module bridges the gap so that a plain model repository can be served on a developer machine
or in tests:

* :func:`backend_directory` assembles a ``--backend-directory`` holding the python backend and the
  stub built for the running interpreter (the stub must sit next to ``libtriton_python.so``).
* :func:`server_environment` gives the environment the server and its stubs need.
* :class:`TritonServer` starts the server on free loopback ports, waits until it is ready, and on
  stop removes the python backend's shared-memory regions that *this* server leaked.

The command line (`python -m medpclip_tools.serve`) runs this process behind the gateway;
see serve.py.
"""

from __future__ import annotations

import collections
import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TypeVar

from .deployment import SERVER_FLAGS

__all__ = [
    "DEFAULT_CACHE",
    "DEFAULT_REPOSITORY",
    "TritonServer",
    "backend_directory",
    "server_environment",
]

LOG = logging.getLogger(__name__)

# Relative to the working directory (a checkout's root: where `make` and the export put them);
# generated files go under build/ so they never mix with tracked sources.
DEFAULT_CACHE = Path("build") / "triton"
DEFAULT_REPOSITORY = Path("build") / "model_repository"

SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "triton_python_backend_shm_region_"
STUB_NAME = "triton_python_backend_stub"
# The files the python backend needs in <backend-directory>/python/.
_BACKEND_FILES = ("libtriton_python.so", "triton_python_backend_utils.py")
_LOG_TAIL_LINES = 40
# Triton's log is appended to, never truncated (the previous run's evidence survives a restart);
# past this size it is rotated to .1, .2, ... keeping this many old files.
LOG_ROTATE_BYTES = 64 * 2**20
LOG_KEEP = 3
# Lines of Triton's log that say why a start failed (glog's E prefix, python tracebacks of a
# model's initialize(), protobuf parse errors).
_CAUSE_MARKERS = ("Error", "error:", "Traceback", "InvalidProtobuf", "failed to load", "Signal (")
# ... except what every start on a machine without a GPU logs, whatever the cause
_HARMLESS = ("CudaDriverHelper", "NVML", "DCGM", "pinned memory", "CUDA driver")


# --------------------------------------------------------------------------------------------
# Locating the pieces inside the nvidia-pytriton wheel
# --------------------------------------------------------------------------------------------


def _pytriton_dir() -> Path:
    """Return the installed ``pytriton`` package directory without importing it.

    ``find_spec`` is used instead of ``import pytriton`` because importing the package pulls in
    its whole runtime (and its logging setup), none of which is needed to launch the binary.
    """
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "nvidia-pytriton is not installed in this Python environment "
            f"({sys.executable}); install it with: pip install nvidia-pytriton==0.7.0"
        )
    return Path(next(iter(spec.submodule_search_locations))).resolve()


def _tritonserver_dir() -> Path:
    return _pytriton_dir() / "tritonserver"


def _tritonserver_executable() -> Path:
    exe = _tritonserver_dir() / "bin" / "tritonserver"
    if not exe.is_file():
        raise FileNotFoundError(
            f"tritonserver binary not found at {exe}; is nvidia-pytriton intact?"
        )
    return exe


def _wheel_libs_dir() -> Path:
    """``site-packages/nvidia_pytriton.libs``: the shared libraries auditwheel vendored."""
    return _pytriton_dir().parent / "nvidia_pytriton.libs"


def _copy_if_changed(src: Path, dst: Path, mode: int | None = None) -> None:
    """Copy ``src`` to ``dst`` unless an identical-looking copy is already there.

    Size and mtime are compared (``copy2`` preserves mtime), which is enough to notice a wheel
    upgrade. The copy goes to a temporary name first and is renamed into place, so parallel test
    workers building the same cache never see a half-written stub or library.
    """
    st = src.stat()
    try:
        dt = dst.stat()
        if dt.st_size == st.st_size and dt.st_mtime_ns == st.st_mtime_ns:
            if mode is not None and (dt.st_mode & 0o777) != mode:
                os.chmod(dst, mode)
            return
    except FileNotFoundError:
        pass
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        shutil.copy2(src, tmp)
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def backend_directory(cache: Path | None = None) -> Path:
    """Create (idempotently) and return a Triton ``--backend-directory`` for the python backend.

    Layout: ``<cache>/backends/python/{triton_python_backend_stub, libtriton_python.so,
    triton_python_backend_utils.py}``. The wheel keeps one stub per Python version under
    ``python_backend_stubs/X.Y/``; Triton only looks for the stub beside the backend library, so
    the one matching the running interpreter is copied there. Returns ``<cache>/backends``.

    The server additionally needs the environment from :func:`server_environment`.
    """
    cache = Path(cache) if cache is not None else DEFAULT_CACHE
    server_dir = _tritonserver_dir()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stubs = server_dir / "python_backend_stubs"
    stub = stubs / version / STUB_NAME
    if not stub.is_file():
        available = sorted(p.parent.name for p in stubs.glob(f"*/{STUB_NAME}"))
        raise FileNotFoundError(
            f"nvidia-pytriton has no python backend stub for Python {version} (looked for {stub}); "
            f"stubs exist for: {', '.join(available) or 'none'}. "
            "Use one of those Python versions for the serving environment."
        )
    backends = cache / "backends"
    python_dir = backends / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    # 0o755: the server executes the stub; keep it executable even if the source mode is odd.
    _copy_if_changed(stub, python_dir / STUB_NAME, mode=0o755)
    for name in _BACKEND_FILES:
        src = server_dir / "backends" / "python" / name
        if not src.is_file():
            raise FileNotFoundError(f"python backend file missing from nvidia-pytriton: {src}")
        _copy_if_changed(src, python_dir / name)
    return backends


def _prepend_path(value: str | None, first: str) -> str:
    parts = [p for p in (value or "").split(os.pathsep) if p and p != first]
    return os.pathsep.join([first, *parts])


def server_environment(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Return the environment for ``tritonserver`` (a copy of ``base``, default ``os.environ``).

    * ``LD_LIBRARY_PATH`` gains ``site-packages/nvidia_pytriton.libs``: the binary and backend
      link the vendored libraries there (libb64, libcurl, ...), which are not on the system path.
    * ``PATH`` starts with this interpreter's ``bin``: the python backend stub locates the
      packages it imports (numpy, the model's dependencies) through the ``python`` on ``PATH``,
      so models run against this venv rather than the system Python.
    """
    env = dict(os.environ if base is None else base)
    env["LD_LIBRARY_PATH"] = _prepend_path(env.get("LD_LIBRARY_PATH"), str(_wheel_libs_dir()))
    env["PATH"] = _prepend_path(env.get("PATH"), str(Path(sys.executable).parent))
    return env


# --------------------------------------------------------------------------------------------
# Shared memory and process bookkeeping
# --------------------------------------------------------------------------------------------


def _shm_regions() -> set[str]:
    try:
        return {p.name for p in SHM_DIR.glob(f"{SHM_PREFIX}*")}
    except OSError:
        return set()


def _session_of(pid: int) -> int | None:
    """Return the session id of ``pid`` from ``/proc/<pid>/stat``, or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may contain spaces: split after it.
    fields = stat.rpartition(")")[2].split()
    try:
        return int(fields[3])  # state, ppid, pgrp, session
    except (IndexError, ValueError):
        return None


def _stubs_in_session(sid: int, what: str = "region") -> dict[int, str]:
    """Map pid -> shm region name (or, with ``what="model"``, the model's name) for every
    python backend stub in session ``sid``.

    The server runs as a session leader (``start_new_session``) and its stubs inherit the session,
    so this finds exactly our stubs and never another server's. Each stub receives the name of
    its shared-memory region as its second argument.
    """
    found: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if len(argv) < 3 or not argv[0].endswith(STUB_NAME.encode()):
            continue
        pid = int(entry.name)
        region = argv[2].decode(errors="replace")
        if region.startswith(SHM_PREFIX) and _session_of(pid) == sid:
            # argv[1] is <repository>/<model>/<version>/model.py
            model = Path(argv[1].decode(errors="replace")).parent.parent.name
            found[pid] = region if what == "region" else model
    return found


def _mapped_regions(pid: int) -> set[str]:
    """Shm regions mapped by ``pid`` (the server maps each stub's region too)."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return set()
    marker = f"{SHM_DIR}/{SHM_PREFIX}"
    return {line.rsplit("/", 1)[1].split()[0] for line in maps.splitlines() if marker in line}


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it when its parent dies (Linux prctl)."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _format_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _free_ports(host: str, count: int) -> list[int]:
    """Ask the OS for ``count`` distinct free TCP ports on ``host``.

    All sockets stay open until every port is chosen so the same port is not handed out twice;
    another process could still take one before Triton binds it, in which case startup fails
    (``--exit-on-error``) with a clear message rather than hanging.
    """
    family = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][0]
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket(family, socket.SOCK_STREAM)
            socks.append(s)
            s.bind((host, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _tail(path: Path, lines: int = _LOG_TAIL_LINES, start: int = 0) -> str:
    """The last ``lines`` lines of ``path`` from byte offset ``start`` (this run's part)."""
    try:
        with path.open("r", errors="replace") as f:
            f.seek(start)
            return "".join(collections.deque(f, maxlen=lines))
    except OSError as exc:
        return f"(log {path} unreadable: {exc})"


def causes(path: Path, start: int = 0, limit: int = 30) -> list[str]:
    """The lines of this run's log (from byte ``start``) that name why Triton failed: error
    lines and the python tracebacks of models that failed to initialise, in order, at most
    ``limit`` (the first ones: the cause comes before its consequences)."""
    found: list[str] = []
    try:
        with path.open("r", errors="replace") as f:
            f.seek(start)
            in_traceback = False
            for line in f:
                line = line.rstrip("\n")
                is_error = line[:1] == "E" and line[1:5].isdigit()  # glog: E1130 12:00:00...
                if any(h in line for h in _HARMLESS):
                    in_traceback = False
                    continue
                if is_error or any(m in line for m in _CAUSE_MARKERS):
                    found.append(line)
                    in_traceback = "Traceback" in line
                elif in_traceback and line.startswith((" ", "\t")):
                    found.append(line)
                else:
                    in_traceback = False
                if len(found) >= limit:
                    break
    except OSError:
        pass
    return found


def rotate(path: Path, max_bytes: int = LOG_ROTATE_BYTES, keep: int = LOG_KEEP) -> None:
    """Rotate ``path`` to ``path.1`` (``.1`` to ``.2``, ...) once it exceeds ``max_bytes``."""
    try:
        if path.stat().st_size < max_bytes:
            return
    except FileNotFoundError:
        return
    for i in range(keep - 1, 0, -1):
        older = path.with_name(f"{path.name}.{i}")
        if older.exists():
            os.replace(older, path.with_name(f"{path.name}.{i + 1}"))
    os.replace(path, path.with_name(f"{path.name}.1"))


def _startup_failure(what: str, log_file: Path, start: int) -> str:
    found = causes(log_file, start)
    cause = "\n".join(f"  {line}" for line in found) if found else "  (no error line logged)"
    return (
        f"{what}\ncause, from {log_file}:\n{cause}\n"
        f"last lines of {log_file}:\n{_tail(log_file, lines=12, start=start)}"
    )


# --------------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------------


_E = TypeVar("_E", bound="Endpoints")


class Endpoints:
    """The addresses and process state of a server child process (``TritonServer`` and the
    launcher's ``ServeProcess``): set ``host``, ``metrics_host``, the three ports and
    ``_process``."""

    host: str
    metrics_host: str
    grpc_port: int
    http_port: int
    metrics_port: int
    _process: subprocess.Popen | None

    @property
    def grpc_url(self) -> str:
        """``host:port`` as ``tritonclient.grpc.InferenceServerClient(url=...)`` expects it."""
        return f"{_format_host(self.host)}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        """``http://host:port`` (``tritonclient.http`` wants it without the scheme)."""
        return f"http://{_format_host(self.host)}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        """Prometheus endpoint, ``http://host:port/metrics``."""
        return f"http://{_format_host(self.metrics_host)}:{self.metrics_port}/metrics"

    @property
    def pid(self) -> int | None:
        """The child's process id (None before start and after stop)."""
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        """True while the child process is alive."""
        return self._process is not None and self._process.poll() is None

    def start(self: _E) -> _E:
        raise NotImplementedError

    def stop(self) -> int | None:
        raise NotImplementedError

    def __enter__(self: _E) -> _E:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class TritonServer(Endpoints):
    """A ``tritonserver`` child process serving ``repository``; use as a context manager.

    Example::

        with TritonServer(Path("build/model_repository")) as server:
            client = tritonclient.grpc.InferenceServerClient(server.grpc_url)

    Ports left as None are chosen free on ``host``, so parallel test runs do not collide. The
    server's output goes to ``log_file`` (default ``<cache>/logs/tritonserver-<http_port>.log``);
    its last lines are included in startup errors.
    """

    def __init__(
        self,
        repository: Path,
        host: str = "127.0.0.1",
        grpc_port: int | None = None,
        http_port: int | None = None,
        metrics_port: int | None = None,
        log_file: Path | None = None,
        startup_timeout: float = 120,
        extra_args: Sequence[str] = (),
        *,
        cache: Path | None = None,
        executable: Path | None = None,
        metrics_host: str | None = None,
    ) -> None:
        self.repository = Path(repository).resolve()
        self.host = host
        self.metrics_host = metrics_host or host
        # None: the binary bundled in nvidia-pytriton (with our python backend directory);
        # a path: a full Triton install such as NGC's /opt/tritonserver, which has its own.
        self.executable = Path(executable) if executable is not None else None
        self.startup_timeout = float(startup_timeout)
        self.extra_args = list(extra_args)
        self.cache = Path(cache) if cache is not None else DEFAULT_CACHE
        missing = [p for p in (grpc_port, http_port, metrics_port) if p is None]
        free = iter(_free_ports(host, len(missing)) if missing else [])
        self.grpc_port: int = grpc_port if grpc_port is not None else next(free)
        self.http_port: int = http_port if http_port is not None else next(free)
        self.metrics_port: int = metrics_port if metrics_port is not None else next(free)
        self.log_file = (
            Path(log_file)
            if log_file is not None
            else self.cache / "logs" / f"tritonserver-{self.http_port}.log"
        )
        self._process: subprocess.Popen[bytes] | None = None
        self._shm_before: set[str] = set()
        self._our_regions: set[str] = set()
        self._stub_pids: set[int] = set()
        self._interrupted = threading.Event()
        self._log_start = 0  # this run's first byte in the (appended) log


    def interrupt(self) -> None:
        """Make a :meth:`start` in progress give up soon (safe to call from a signal handler)."""
        self._interrupted.set()

    def command(self) -> list[str]:
        """The ``tritonserver`` command line :meth:`start` runs (builds the backend dir)."""
        if self.executable is None:
            binary = [
                str(_tritonserver_executable()),
                f"--backend-directory={backend_directory(self.cache)}",
                # the wheel keeps the response-cache library outside the container's default path
                f"--cache-directory={_tritonserver_dir() / 'caches'}",
            ]
        else:
            binary = [str(self.executable)]
        return [
            *binary,
            f"--model-repository={self.repository}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            f"--metrics-address={self.metrics_host}",
            f"--metrics-port={self.metrics_port}",
            # the flags every deployment shares (compose and Kubernetes too)
            *SERVER_FLAGS,
            "--log-verbose=0",
            *self.extra_args,
        ]

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> TritonServer:
        """Launch the server and block until ``/v2/health/ready`` answers 200.

        Raises RuntimeError (with the log's last lines) if the server exits, is not ready
        within ``startup_timeout`` seconds, or :meth:`interrupt` is called; the process is stopped
        before raising.
        """
        if self._process is not None:
            raise RuntimeError("TritonServer already started")
        if not self.repository.is_dir():
            raise FileNotFoundError(f"model repository not found: {self.repository}")
        cmd = self.command()
        env = server_environment() if self.executable is None else dict(os.environ)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        rotate(self.log_file)
        # Snapshot before launching: anything absent now and owned by our process tree is ours.
        self._shm_before = _shm_regions()
        self._our_regions = set()
        self._stub_pids = set()
        self._interrupted.clear()
        LOG.info("starting tritonserver for %s (log: %s)", self.repository, self.log_file)
        LOG.debug("command: %s", " ".join(cmd))
        with self.log_file.open("ab") as log:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S %z")
            log.write(f"=== tritonserver starting {stamp} (medpclip launcher) ===\n".encode())
            log.flush()
            self._log_start = log.tell()
            # The child keeps its own copy of the descriptor; ours can close right away.
            self._process = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                # Own session: a terminal's Ctrl-C reaches this process first, which then shuts
                # Triton down in order. The session id also identifies our stubs (see stop()).
                start_new_session=True,
                # If this process is killed (kill -9), Triton must not live on as an orphan
                # holding the ports and the GPU.
                preexec_fn=_die_with_parent,
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        LOG.info("tritonserver ready (pid %d)", self._process.pid)
        return self

    def stubs(self) -> dict[int, str]:
        """This server's live python-backend stubs: pid -> model name."""
        if self._process is None:
            return {}
        return _stubs_in_session(self._process.pid, what="model")

    def _track_owned(self) -> None:
        """Remember our stubs and shm regions while the processes exist to be asked."""
        if self._process is None:
            return
        stubs = _stubs_in_session(self._process.pid)
        self._stub_pids.update(stubs)
        self._our_regions.update(stubs.values())
        self._our_regions.update(_mapped_regions(self._process.pid))

    def _wait_ready(self) -> None:
        if self._process is None:
            raise RuntimeError("tritonserver not started")
        url = f"{self.http_url}/v2/health/ready"
        deadline = time.monotonic() + self.startup_timeout
        while True:
            self._track_owned()
            code = self._process.poll()
            if code is not None:
                raise RuntimeError(
                    _startup_failure(
                        f"tritonserver exited with code {code} during startup",
                        self.log_file,
                        self._log_start,
                    )
                )
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    if resp.status == 200:
                        self._track_owned()
                        return
            except OSError:
                # URLError/HTTPError are OSErrors: refused while not listening yet, HTTP 400
                # while models are still loading (strict readiness), or a slow answer.
                pass
            if self._interrupted.is_set():
                raise RuntimeError("tritonserver startup interrupted")
            if time.monotonic() > deadline:
                raise RuntimeError(
                    _startup_failure(
                        f"tritonserver not ready after {self.startup_timeout:g} s at {url}",
                        self.log_file,
                        self._log_start,
                    )
                )
            self._interrupted.wait(0.2)

    def stop(self, timeout: float = 30) -> int | None:
        """Shut the server down and clean up after it; safe to call twice.

        SIGTERM lets Triton unload models and stop its stubs; after ``timeout`` seconds the whole
        process group gets SIGKILL. Then every ``/dev/shm/triton_python_backend_shm_region_*``
        that was not there before :meth:`start` and that belonged to this server's stubs is
        removed: a killed server leaks them, but another server's regions are never touched.
        Returns the server's exit code (None if it was never started).
        """
        proc = self._process
        if proc is None:
            return None
        if proc.poll() is None:
            self._track_owned()
            LOG.info("stopping tritonserver (pid %d)", proc.pid)
            try:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                LOG.warning("tritonserver did not stop in %g s; killing it", timeout)
                try:
                    # The group is ours: the leader is not reaped yet, so its id cannot be reused.
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
        self._reap_stubs(proc.pid)
        self._remove_leaked_regions()
        self._process = None
        LOG.info("tritonserver exited with code %s", proc.returncode)
        return proc.returncode

    def _reap_stubs(self, sid: int, grace: float = 5.0) -> None:
        """Kill stubs that outlive the server (each stub polls for its parent, but slowly)."""
        deadline = time.monotonic() + grace
        while True:
            alive = [pid for pid in self._stub_pids if _session_of(pid) == sid]
            if not alive:
                return
            if time.monotonic() > deadline:
                for pid in alive:
                    LOG.warning("killing leftover python backend stub %d", pid)
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                return
            time.sleep(0.1)

    def _remove_leaked_regions(self) -> None:
        leaked = (_shm_regions() & self._our_regions) - self._shm_before
        for name in sorted(leaked):
            LOG.info("removing leaked shared memory %s", SHM_DIR / name)
            try:
                (SHM_DIR / name).unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                LOG.warning("could not remove %s: %s", SHM_DIR / name, exc)

    def __repr__(self) -> str:
        return (
            f"TritonServer(repository={str(self.repository)!r}, grpc={self.grpc_url!r}, "
            f"http={self.http_url!r}, running={self.running})"
        )
