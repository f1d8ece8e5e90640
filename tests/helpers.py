"""Small helpers shared by the trainer tests (importable because tests/conftest.py puts tests/ on sys.path)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file


def weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors files in ``folder``."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def changed_keys(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> set[str]:
    assert a.keys() == b.keys()
    return {k for k in a if not torch.equal(a[k], b[k])}


def metrics(run: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def preempt_at(monkeypatch: Any, module: Any, step_fn: str, at: int) -> None:
    """Send this process SIGUSR1 (SLURM's warning signal) right after training step ``at``: the real stop path
    (signal handler -> checkpoint at the step boundary -> Preempted)."""
    real = getattr(module, step_fn)

    def wrapped(state: Any, *args: Any) -> Any:
        out = real(state, *args)
        if getattr(state, "step", getattr(state, "iteration", None)) == at:
            os.kill(os.getpid(), signal.SIGUSR1)
        return out

    monkeypatch.setattr(module, step_fn, wrapped)


class LocalJudge:
    """A real HTTP judge server (stdlib ``http.server`` in a thread) that misbehaves on purpose.

    ``/health`` and ``/v1/models`` (serving ``judge``) answer like vLLM; ``/v1/chat/completions`` answers a valid
    completion whose text holds no score (``behaviour="garbage"``) or never answers (``"silent"``: it holds the
    request until the server stops). ``chat_requests`` counts the completion requests received. A context manager.
    """

    def __init__(self, behaviour: str) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        judge = self
        self.behaviour = behaviour
        self.chat_requests = 0
        self.stopping = threading.Event()

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep the test output quiet
                pass

            def _json(self, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                self._json({"data": [{"id": "judge"}]} if self.path == "/v1/models" else {})

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                judge.chat_requests += 1
                if judge.behaviour == "silent":
                    judge.stopping.wait(60)  # bounded, so a broken test cannot hang forever
                    return
                self._json({"choices": [{"message": {"content": "The edit looks fine to me."},
                                         "finish_reason": "stop"}]})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "LocalJudge":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.server.shutdown()
        self.server.server_close()
