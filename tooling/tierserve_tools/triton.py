"""A real ``tritonserver`` on this machine, without Docker or a GPU (local development and tests).

The ``nvidia-pytriton`` wheel bundles a real Triton Inference Server binary with the Python
backend, but no onnxruntime backend. A production repository written by the compiler uses
``platform: "onnxruntime_onnx"`` with GPU instance groups, so it cannot be served here as is.
``build_local_repository`` rewrites it into an equivalent CPU repository: the same ONNX files,
tensor names, datatypes, dims, ``max_batch_size``, dynamic batching and version policy, served
by a generic Python-backend shim (``tierserve_tools/triton_shim.py``) that wraps an
onnxruntime ``InferenceSession`` on the CPU execution provider. GPU-only settings (instance
groups, TensorRT/CUDA accelerators, ``model_warmup``) are dropped. Latencies measured against
it say nothing about GPU performance; protocol behaviour, batching and failure handling are real.

``TritonServer`` starts and stops the binary; ``register`` adds ``tierserve triton`` to the CLI.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import ctypes
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tierserve.errors import ConfigurationError, TierserveError
from tierserve_tools.emulation import free_port

SHIM_SOURCE = Path(__file__).with_name("triton_shim.py")
#: The decoupled Python-backend model.py that stands in for the vLLM backend (a GPU-placed generative model).
GENAI_SHIM_SOURCE = Path(__file__).with_name("triton_genai_shim.py")
SITE_PACKAGES_PARAM = "tierserve_site_packages"
LOCAL_HEADER = """\
# LOCAL DEVELOPMENT COPY written by tierserve_tools.triton.build_local_repository from
#   {source}
# Production serves this model with platform "onnxruntime_onnx" on GPU instances. The local
# tritonserver (nvidia-pytriton wheel) has no onnxruntime backend and no GPU, so this copy uses
# backend "python" (model.py wraps onnxruntime, CPU execution provider) with KIND_CPU instances.
# Dropped because they are GPU-only or need the onnxruntime backend: instance_group GPU kinds,
# optimization (TensorRT/CUDA accelerators, cuda graphs) and model_warmup.
# Kept: name, inputs/outputs (names, data types, dims), max_batch_size, dynamic_batching,
# version_policy, parameters.
"""


class TritonServerError(TierserveError):
    """The local tritonserver could not be found, started, or did not become ready."""

    code = "triton_server_error"


# --- repository conversion ---------------------------------------------------------------------


def default_site_packages() -> str:
    """The current interpreter's site-packages folders, ``os.pathsep``-joined (what the stub lacks)."""
    paths: list[str] = []
    for key in ("purelib", "platlib"):
        p = sysconfig.get_paths().get(key)
        if p and p not in paths:
            paths.append(p)
    return os.pathsep.join(paths)


def _load_config(path: Path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    cfg = model_config_pb2.ModelConfig()
    try:
        text_format.Parse(path.read_text(), cfg)
    except text_format.ParseError as exc:
        raise ConfigurationError(f"{path}: not a valid Triton model config: {exc}") from exc
    return cfg


def localize_config(cfg, site_packages: str):
    """Rewrite a production ModelConfig (in place, and returned) for the local Python backend."""
    from tritonclient.grpc import model_config_pb2

    cfg.ClearField("platform")
    cfg.backend = "python"
    cfg.ClearField("default_model_filename")
    cfg.cc_model_filenames.clear()
    del cfg.instance_group[:]
    group = cfg.instance_group.add()
    group.kind = model_config_pb2.ModelInstanceGroup.KIND_CPU
    group.count = 1
    cfg.ClearField("optimization")
    del cfg.model_warmup[:]
    cfg.parameters[SITE_PACKAGES_PARAM].string_value = site_packages
    return cfg


def build_local_repository(production_repo: Path, out_dir: Path, site_packages: str | None = None) -> Path:
    """Convert the compiler's production Triton repository into one the local server can run.

    For every ``production_repo/NAME/config.pbtxt``: write ``out_dir/NAME/config.pbtxt`` rewritten
    by :func:`localize_config`, copy each version folder (``VERSION/model.onnx`` and any external
    data next to it) and add the generic ``VERSION/model.py`` shim. Models already in ``out_dir``
    under the same name are replaced; others are left alone. Returns ``out_dir``.
    """
    from google.protobuf import text_format

    production_repo = Path(production_repo)
    out_dir = Path(out_dir)
    if not production_repo.is_dir():
        raise ConfigurationError(f"Triton repository {production_repo} does not exist; run tierserve compile")
    site_packages = site_packages if site_packages is not None else default_site_packages()
    shim = SHIM_SOURCE.read_text()
    models = sorted(p for p in production_repo.iterdir() if (p / "config.pbtxt").is_file())
    if not models:
        raise ConfigurationError(f"no NAME/config.pbtxt under {production_repo}: not a Triton repository")
    out_dir.mkdir(parents=True, exist_ok=True)
    for src in models:
        cfg = localize_config(_load_config(src / "config.pbtxt"), site_packages)
        if cfg.name and cfg.name != src.name:
            raise ConfigurationError(f"{src}/config.pbtxt names model {cfg.name!r}; the folder must match")
        versions = sorted(
            (p for p in src.iterdir() if p.is_dir() and p.name.isdigit() and (p / "model.onnx").is_file()),
            key=lambda p: int(p.name),
        )
        if not versions:
            raise ConfigurationError(f"{src}: no VERSION/model.onnx folder")
        dst = out_dir / src.name
        if dst.exists():
            shutil.rmtree(dst)
        dst.mkdir()
        for vdir in versions:
            shutil.copytree(vdir, dst / vdir.name)
            (dst / vdir.name / "model.py").write_text(shim)
        text = LOCAL_HEADER.format(source=src / "config.pbtxt") + text_format.MessageToString(cfg)
        (dst / "config.pbtxt").write_text(text)
    return out_dir


# --- a generative model: the local stand-in for the vLLM backend ------------------------------------

GENAI_HEADER = """\
# LOCAL DEVELOPMENT COPY written by tierserve_tools.triton from {source}
# Production serves this generative model with Triton's vLLM backend (backend "vllm", decoupled, model.json
# with the engine arguments and the Hugging Face weights) on a GPU. The local tritonserver has neither vLLM nor
# a GPU, so this copy is a decoupled Python-backend model (model.py: tierserve_tools/triton_genai_shim.py)
# running the model's onnxruntime-genai variant (the CPU tier's) on the CPU, with the vLLM backend's inputs
# and outputs (see docs/architecture.md for what differs).
"""
#: The vLLM backend's inputs the stand-in implements: (name, TYPE_*, dims, optional).
GENAI_INPUTS = (("text_input", "TYPE_STRING", [1], False), ("stream", "TYPE_BOOL", [1], True),
                ("sampling_parameters", "TYPE_STRING", [1], True), ("exclude_input_in_output", "TYPE_BOOL", [1], True),
                ("return_finish_reason", "TYPE_BOOL", [1], True), ("return_logprobs", "TYPE_BOOL", [1], True),
                ("return_num_input_tokens", "TYPE_BOOL", [1], True),
                ("return_num_output_tokens", "TYPE_BOOL", [1], True))
#: ... and its outputs.
GENAI_OUTPUTS = (("text_output", "TYPE_STRING", [-1]), ("finish_reason", "TYPE_STRING", [-1]),
                 ("logprobs", "TYPE_STRING", [-1]), ("num_input_tokens", "TYPE_UINT32", [1]),
                 ("num_output_tokens", "TYPE_UINT32", [-1]))


def genai_local_config(name: str, versions: list[str], site_packages: str, threads: int = 0,
                       max_concurrency: int = 4, source: str = "the model store") -> str:
    """The local ``config.pbtxt`` of a generative model: the stand-in's decoupled Python-backend config serving
    ``versions`` (``version_policy: specific``), with the vLLM backend's inputs and outputs."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as pb

    cfg = pb.ModelConfig(name=name, backend="python", max_batch_size=0)
    cfg.model_transaction_policy.decoupled = True
    for in_name, dtype, dims, optional in GENAI_INPUTS:
        cfg.input.add(name=in_name, data_type=pb.DataType.Value(dtype), dims=dims, optional=optional)
    for out_name, dtype, dims in GENAI_OUTPUTS:
        cfg.output.add(name=out_name, data_type=pb.DataType.Value(dtype), dims=dims)
    cfg.instance_group.add(kind=pb.ModelInstanceGroup.KIND_CPU, count=1)
    cfg.version_policy.specific.versions.extend(int(v) for v in versions)
    cfg.parameters[SITE_PACKAGES_PARAM].string_value = site_packages
    cfg.parameters["tierserve_ort_threads"].string_value = str(int(threads))
    cfg.parameters["tierserve_max_concurrency"].string_value = str(int(max_concurrency))
    return GENAI_HEADER.format(source=source) + text_format.MessageToString(cfg)


def write_genai_version(vdir: Path, fetch: Callable[[str, Path], None], variant: Any) -> None:
    """Fill ``vdir`` (a version folder) with ``variant``'s onnxruntime-genai files, each at its location in the
    model's folder (``fetch(store_path, destination)`` copies one), and the stand-in's ``model.py``; atomically
    (a temporary sibling renamed into place)."""
    vdir = Path(vdir)
    tmp = vdir.with_name(f".{vdir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    fetch(variant.path, tmp / Path(variant.path).name)
    for ext in variant.external_data:
        dst = tmp / variant.location(ext)
        dst.parent.mkdir(parents=True, exist_ok=True)
        fetch(ext.path, dst)
    (tmp / "model.py").write_text(GENAI_SHIM_SOURCE.read_text())
    shutil.rmtree(vdir, ignore_errors=True)
    tmp.rename(vdir)


# --- locating and preparing the binary ---------------------------------------------------------


def pytriton_dir() -> Path:
    """``.../site-packages/pytriton/tritonserver`` of the installed ``nvidia-pytriton`` wheel."""
    try:
        import importlib.util

        spec = importlib.util.find_spec("pytriton")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise TritonServerError(
            "the nvidia-pytriton wheel is not installed; pip install 'tierserve[local]' "
            "(or pip install nvidia-pytriton) to run a local tritonserver"
        )
    root = Path(next(iter(spec.submodule_search_locations))) / "tritonserver"
    if not (root / "bin" / "tritonserver").is_file():
        raise TritonServerError(f"{root}/bin/tritonserver is missing: reinstall nvidia-pytriton")
    return root


def pytriton_available() -> bool:
    try:
        pytriton_dir()
    except TritonServerError:
        return False
    return True


def _library_path(root: Path) -> str:
    paths = [sysconfig.get_config_var("LIBDIR") or ""]
    libs = root.parent.parent / "nvidia_pytriton.libs"  # site-packages/nvidia_pytriton.libs
    if libs.is_dir():
        paths.append(str(libs))
    existing = os.environ.get("LD_LIBRARY_PATH")
    if existing:
        paths.append(existing)
    return os.pathsep.join(p for p in paths if p)


def prepare_backend_dir(root: Path | None = None, cache_dir: Path | None = None) -> Path:
    """A backend directory holding ``python/`` (the backend plus this Python's stub, executable).

    Built once per wheel location and Python version under ``~/.cache/tierserve`` (atomically).
    """
    root = root or pytriton_dir()
    pyver = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / pyver / "triton_python_backend_stub"
    if not stub.is_file():
        raise TritonServerError(f"nvidia-pytriton has no Python-backend stub for Python {pyver} ({stub})")
    cache_dir = cache_dir or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tierserve"
    lib = root / "backends" / "python" / "libtriton_python.so"
    fingerprint = f"{root}:{lib.stat().st_size if lib.exists() else 0}:{stub.stat().st_mtime_ns}"
    key = f"{hashlib.sha256(fingerprint.encode()).hexdigest()[:12]}-py{pyver}"
    backend_dir = cache_dir / "triton-backends" / key
    if (backend_dir / "python" / "triton_python_backend_stub").is_file():
        return backend_dir
    backend_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=backend_dir.parent))
    try:
        shutil.copytree(root / "backends" / "python", tmp / "python", ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy2(stub, tmp / "python" / "triton_python_backend_stub")
        (tmp / "python" / "triton_python_backend_stub").chmod(0o755)
        try:
            tmp.rename(backend_dir)
        except OSError:  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return backend_dir


def _libc_prctl() -> Any:
    with contextlib.suppress(OSError, AttributeError):
        return ctypes.CDLL(None, use_errno=True).prctl
    return None


#: prctl(2), looked up here and not in the forked child (a dlopen there can deadlock on a lock another thread held).
_PRCTL = _libc_prctl()
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if _PRCTL is not None:
        _PRCTL(PR_SET_PDEATHSIG, signal.SIGKILL)


# --- the server process ------------------------------------------------------------------------

_LIVE: set[TritonServer] = set()
_LIVE_LOCK = threading.Lock()


def _stop_all_at_exit() -> None:
    with _LIVE_LOCK:
        servers = list(_LIVE)
    for s in servers:
        s.stop(grace_s=2.0)


atexit.register(_stop_all_at_exit)


class TritonServer:
    """One local ``tritonserver`` process serving ``model_repository``; a context manager.

    Ports default to free loopback ports picked at construction and kept across ``restart()``,
    so clients can reconnect to the same URLs. The server and its Python-backend stubs run in
    their own process group; ``stop()`` sends SIGTERM, waits ``grace_s``, then SIGKILLs the group;
    ``kill()`` SIGKILLs at once. When started from the main thread the server also gets
    PR_SET_PDEATHSIG, so it dies if this process is killed; an ``atexit`` hook stops the rest.
    Output (server log and stub output) goes to ``log_path``.
    """

    def __init__(
        self,
        model_repository: Path | str,
        *,
        host: str = "127.0.0.1",
        http_port: int = 0,
        grpc_port: int = 0,
        metrics_port: int = 0,
        log_path: Path | str | None = None,
        startup_timeout_s: float = 120.0,
        exit_timeout_s: int = 5,
        log_verbose: int = 0,
        extra_args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        self.model_repository = Path(model_repository).resolve()
        self.host = host
        self.http_port = http_port or free_port(host)
        self.grpc_port = grpc_port or free_port(host)
        self.metrics_port = metrics_port or free_port(host)
        if log_path is None:
            fd, name = tempfile.mkstemp(prefix="tritonserver-", suffix=".log")
            os.close(fd)
            log_path = name
        self.log_path = Path(log_path)
        self.startup_timeout_s = startup_timeout_s
        self.exit_timeout_s = exit_timeout_s
        self.log_verbose = log_verbose
        self.extra_args = tuple(extra_args)
        self.env = dict(env or {})  # e.g. SAGEMAKER_TRITON_DEFAULT_MODEL_NAME, as NVIDIA's SageMaker image sets it
        self.startup_s: float | None = None  # seconds the last start() took to become ready
        self._proc: subprocess.Popen | None = None
        self._lock = threading.RLock()

    # -- URLs --
    @property
    def _client_host(self) -> str:
        return "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host  # noqa: S104

    @property
    def http_url(self) -> str:
        return f"{self._client_host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self._client_host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self._client_host}:{self.metrics_port}/metrics"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def command(self) -> list[str]:
        root = pytriton_dir()
        return [
            str(root / "bin" / "tritonserver"),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={prepare_backend_dir(root)}",
            f"--http-address={self.host}",
            f"--grpc-address={self.host}",
            f"--metrics-address={self.host}",
            f"--http-port={self.http_port}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-port={self.metrics_port}",
            "--allow-gpu-metrics=false",
            f"--exit-timeout-secs={self.exit_timeout_s}",
            f"--log-verbose={self.log_verbose}",
            *self.extra_args,
        ]

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def exit_code(self) -> int | None:
        """The exit status when the server exited on its own (a crash, a ``kill -9`` from outside), else None
        (running, or stopped through ``stop()``/``kill()``, which forget the process)."""
        proc = self._proc
        return None if proc is None else proc.poll()

    def reap(self) -> None:
        """After the server exited on its own: SIGKILL what is left of its process group (its Python-backend
        stubs, which outlive it otherwise, reparented to init) and forget it. A later ``start()`` starts anew."""
        with self._lock:
            if self._proc is None or self._proc.poll() is None:
                return
            self._signal_group(signal.SIGKILL)
            self._proc = None
            with _LIVE_LOCK:
                _LIVE.discard(self)

    def start(self, die_with_parent: bool | None = None) -> TritonServer:
        """Start the server and wait until it is ready. ``die_with_parent``: PR_SET_PDEATHSIG (the server dies
        with this process). Linux sends it when the *thread* that started the server ends, so the default is on
        from the main thread only; a caller whose thread outlives the server (the supervisor) passes True."""
        if die_with_parent is None:
            die_with_parent = threading.current_thread() is threading.main_thread()
        with self._lock:
            if self.is_running():
                return self
            root = pytriton_dir()
            cmd = self.command()
            env = dict(os.environ, **self.env, LD_LIBRARY_PATH=_library_path(root))
            t0 = time.monotonic()
            with open(self.log_path, "ab") as log:
                self._proc = subprocess.Popen(
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    # The python-backend stub imports numpy as it starts, before model.py can touch
                    # sys.path, and it ignores PYTHONPATH (isolated init); its sys.path[0] is its
                    # working directory. Run it from this interpreter's site-packages so that it
                    # gets the numpy the wheel was built for (nvidia-pytriton pins numpy<2), not
                    # a global numpy 2.x, whose ABI silently yields empty output tensors.
                    cwd=default_site_packages().split(os.pathsep)[0],
                    start_new_session=True,
                    preexec_fn=_die_with_parent if die_with_parent and _PRCTL is not None else None,
                )
            with _LIVE_LOCK:
                _LIVE.add(self)
            try:
                self.wait_ready(self.startup_timeout_s)
            except BaseException:
                self.stop(grace_s=2.0)
                raise
            self.startup_s = time.monotonic() - t0
            return self

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        url = f"http://{self.http_url}/v2/health/ready"
        while True:
            proc = self._proc
            if proc is None or proc.poll() is not None:
                rc = proc.returncode if proc else None
                raise TritonServerError(
                    f"tritonserver exited with code {rc} before becoming ready; log {self.log_path}:\n"
                    + self.log_tail()
                )
            try:
                with urllib.request.urlopen(url, timeout=1.0) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise TritonServerError(
                    f"tritonserver not ready after {timeout_s:.0f}s; log {self.log_path}:\n" + self.log_tail()
                )
            time.sleep(0.1)

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def _signal_group(self, sig: int) -> None:
        proc = self._proc
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)  # the server and its stubs (own session => pgid == pid)

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM, wait up to ``grace_s``, then SIGKILL the whole process group. Idempotent."""
        with self._lock:
            proc = self._proc
            if proc is None:
                return
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=grace_s)
            self._signal_group(signal.SIGKILL)  # leftovers (stubs), or the server itself
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
            self._proc = None
            with _LIVE_LOCK:
                _LIVE.discard(self)

    def kill(self) -> None:
        """SIGKILL the server and its stubs at once (simulates a crash). Idempotent."""
        with self._lock:
            proc = self._proc
            if proc is None:
                return
            self._signal_group(signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
            self._proc = None
            with _LIVE_LOCK:
                _LIVE.discard(self)

    def freeze(self) -> None:
        """SIGSTOP the server and its stubs: connections are still accepted, nothing is answered (a hung GPU)."""
        self._signal_group(signal.SIGSTOP)

    def thaw(self) -> None:
        """SIGCONT what ``freeze`` stopped."""
        self._signal_group(signal.SIGCONT)

    def restart(self) -> TritonServer:
        self.stop()
        return self.start()

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid={self.pid}" if self.is_running() else "stopped"
        return f"TritonServer({self.model_repository}, http={self.http_url}, grpc={self.grpc_url}, {state})"


# --- the supervisor ----------------------------------------------------------------------------

#: The supervisor's restart backoff by default: the first delay (s), and the most it doubles to.
RESTART_BACKOFF_S = (1.0, 30.0)


class TritonSupervisor:
    """Restarts a :class:`TritonServer` that exited on its own, with exponential backoff.

    Every ``poll_s`` it looks at the server. When the server has exited on its own (not through ``stop()`` or
    ``kill()``, which are deliberate), it kills what is left of its process group at once (the Python-backend
    stubs, which would otherwise live on, reparented to init), waits ``backoff_s[0]`` seconds, doubled after
    each failed start up to ``backoff_s[1]``, and starts it again on the same ports, so that clients reconnect
    to the same URLs. ``status()`` says where it stands (``serving``, ``restarting``, ``stopped``), for the
    stack's readiness; ``on_event`` hears each exit and restart (one line of text), ``on_restart`` each
    successful restart (e.g. to load the store's versions again).

    The delay resets after a start that stayed up ``stable_s``; a crash loop keeps backing off.
    """

    def __init__(self, server: TritonServer, backoff_s: tuple[float, float] = RESTART_BACKOFF_S,
                 poll_s: float = 0.2, stable_s: float = 60.0, on_event: Callable[[str], None] | None = None,
                 on_restart: Callable[[], None] | None = None) -> None:
        if backoff_s[0] <= 0 or backoff_s[1] < backoff_s[0]:
            raise ConfigurationError(f"restart backoff {backoff_s}: give (first delay > 0, most >= first) seconds")
        self.server = server
        self.backoff_s = (float(backoff_s[0]), float(backoff_s[1]))
        self.poll_s = poll_s
        self.stable_s = stable_s
        self.on_event = on_event
        self.on_restart = on_restart
        self.state = "serving"
        self.restarts = 0
        self.last_exit: int | None = None
        self.last_error = ""
        self.next_attempt_s: float | None = None  # monotonic time of the next start, while restarting
        self._failures = 0
        self._started_at = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> TritonSupervisor:
        self._thread = threading.Thread(target=self._run, name="triton-supervisor", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.server.startup_timeout_s + 10)
            self._thread = None
        self.state = "stopped"

    def status(self) -> dict[str, Any]:
        """Where the GPU tier's server stands: state, restarts so far, the last exit status and start error,
        and the seconds until the next start while restarting."""
        wait = None if self.next_attempt_s is None else max(0.0, round(self.next_attempt_s - time.monotonic(), 1))
        return {"state": self.state, "restarts": self.restarts, "last_exit": self.last_exit,
                "last_error": self.last_error or None, "next_attempt_in_s": wait}

    def _say(self, text: str) -> None:
        if self.on_event is not None:
            with contextlib.suppress(Exception):
                self.on_event(text)

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            code = self.server.exit_code()
            if code is None:
                continue
            self.server.reap()  # its stubs go now, not when serve stops
            self.last_exit = code
            if time.monotonic() - self._started_at >= self.stable_s:
                self._failures = 0
            self.state = "restarting"
            self._restart(f"tritonserver exited (status {code}); its process group was killed")

    def _restart(self, why: str) -> None:
        while True:
            delay = min(self.backoff_s[1], self.backoff_s[0] * 2 ** self._failures)
            self.next_attempt_s = time.monotonic() + delay
            self._say(f"{why}; restarting it in {delay:g} s")
            if self._stop.wait(delay):
                return
            try:
                t0 = time.monotonic()
                self.server.start(die_with_parent=True)  # this thread outlives the server: see start()
            except TierserveError as exc:
                self._failures += 1
                self.last_error = exc.message.splitlines()[0]
                why = f"tritonserver did not start again ({self.last_error})"
                continue
            self._failures += 1
            self._started_at = time.monotonic()
            self.restarts += 1
            self.state, self.next_attempt_s, self.last_error = "serving", None, ""
            self._say(f"tritonserver restarted (pid {self.server.pid}, ready in {time.monotonic() - t0:.1f} s; "
                      f"restart {self.restarts})")
            if self.on_restart is not None:
                try:
                    self.on_restart()
                except Exception as exc:  # the sync's next poll tries again
                    self._say(f"after the restart: {exc}")
            return


# --- CLI -----------------------------------------------------------------------------------------


def register(subparsers) -> None:
    """Add ``tierserve triton`` to the top-level CLI's subparsers (sets ``func`` to the handler)."""
    p = subparsers.add_parser(
        "triton",
        help="run a real local tritonserver (CPU, Python-backend shim) on a compiled Triton repository",
        description=(
            "Convert the compiler's production Triton repository (onnxruntime_onnx, GPU) into a local "
            "CPU copy served through a Python-backend onnxruntime shim, and run the tritonserver "
            "binary from the nvidia-pytriton wheel in the foreground. Ctrl-C stops it."
        ),
    )
    p.add_argument("--repository", required=True, type=Path, help="the compiled repository, e.g. build/models/triton")
    p.add_argument("--http-port", type=int, default=8000, help="Triton's HTTP/REST port (KServe v2); 0: a free port")
    p.add_argument("--grpc-port", type=int, default=8001, help="Triton's gRPC port; 0: a free port")
    p.add_argument("--metrics-port", type=int, default=8002, help="Triton's Prometheus metrics port; 0: a free port")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--work-dir", type=Path, default=None, help="where to write the local repository (default: temp)")
    p.add_argument("--log-verbose", type=int, default=0, help="tritonserver's --log-verbose level (0: off)")
    p.set_defaults(func=run_cli)


def run_cli(args: argparse.Namespace) -> int:
    from tierserve_tools.signals import stop_on_signals

    with stop_on_signals() as stop:
        return _run_foreground(args, stop)


def _run_foreground(args: argparse.Namespace, stop: threading.Event) -> int:
    from tierserve import ports

    tmp = None
    try:
        # tritonserver's own "address already in use" comes after the repository is built, in its log: say it first
        ports.check_free(args.host, [(args.http_port, "--http-port", "Triton's HTTP service"),
                                     (args.grpc_port, "--grpc-port", "Triton's gRPC service"),
                                     (args.metrics_port, "--metrics-port", "Triton's metrics service")])
        if args.work_dir is None:
            tmp = tempfile.mkdtemp(prefix="tierserve-triton-")
            work = Path(tmp)
        else:
            work = Path(args.work_dir)
        repo = build_local_repository(args.repository, work / "repository")
        server = TritonServer(
            repo,
            host=args.host,
            http_port=args.http_port,
            grpc_port=args.grpc_port,
            metrics_port=args.metrics_port,
            log_path=work / "tritonserver.log",
            log_verbose=args.log_verbose,
        )
        try:
            server.start()
            print(
                f"tritonserver ready in {server.startup_s:.1f}s: http={server.http_url} grpc={server.grpc_url} "
                f"metrics={server.metrics_url} log={server.log_path} (Ctrl-C to stop)",
                flush=True,
            )
            while not stop.wait(0.5):
                if not server.is_running():
                    print(f"tritonserver exited unexpectedly; log tail:\n{server.log_tail()}", file=sys.stderr)
                    return 1
        finally:
            server.stop()
        print("tritonserver stopped", flush=True)
        return 0
    except TierserveError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
