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
