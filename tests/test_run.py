"""The run folder: metrics lines, atomic checkpoints, resume safety."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from metacot.run import Run, RunError, atomic_dir, is_complete, latest_checkpoint


@dataclass
class Cfg:
    lr: float = 0.1


def test_metrics_and_config(tmp_path: Path) -> None:
    run = Run(tmp_path / "r", Cfg())
    run.log(1, loss=0.5, bad=float("nan"))
    run.log(2, loss=0.25)
    run.close()
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 1, "loss": 0.5, "bad": None}, {"step": 2, "loss": 0.25}]
    assert "lr: 0.1" in (tmp_path / "r" / "config.yaml").read_text()


def test_checkpoint_is_atomic_and_latest_is_complete(tmp_path: Path) -> None:
    run = Run(tmp_path / "r", Cfg())
    with run.checkpoint(1) as d:
        (d / "w.bin").write_bytes(b"1")
    with pytest.raises(ZeroDivisionError):
        with run.checkpoint(2) as d:
            (d / "w.bin").write_bytes(b"2")
            1 / 0
    assert run.latest_checkpoint() == tmp_path / "r" / "checkpoints" / "step-1"
    assert not (tmp_path / "r" / "checkpoints" / "step-2").exists()
    # A folder that looks like a checkpoint but has no completion marker is never resumed from.
    (tmp_path / "r" / "checkpoints" / "step-9").mkdir()
    assert run.latest_checkpoint().name == "step-1"


def _slow_writer(dest: str) -> None:
    with atomic_dir(Path(dest)) as d:
        (d / "part.bin").write_bytes(b"x" * 10)
        time.sleep(60)  # killed here, mid-write


def test_killed_write_is_never_complete(tmp_path: Path) -> None:
    ckpts = tmp_path / "checkpoints"
    proc = mp.get_context("fork").Process(target=_slow_writer, args=(str(ckpts / "step-5"),))
    proc.start()
    deadline = time.time() + 20
    while time.time() < deadline and not list(ckpts.glob(".tmp-*")):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    assert list(ckpts.glob(".tmp-*")), "the writer should have left its temporary folder behind"
    assert latest_checkpoint(ckpts) is None
    assert not is_complete(ckpts / "step-5")
    # Opening the run cleans the leftover and still finds nothing to resume.
    run = Run(tmp_path, Cfg())
    assert run.latest_checkpoint() is None and not list(ckpts.glob(".tmp-*"))


def test_existing_run_refused_without_resume(tmp_path: Path) -> None:
    run = Run(tmp_path / "r", Cfg())
    with run.checkpoint(3) as d:
        (d / "x").write_text("x")
    run.close()
    with pytest.raises(RunError, match="resume"):
        Run(tmp_path / "r", Cfg())
    again = Run(tmp_path / "r", Cfg(lr=0.2), resume=True)
    assert again.latest_checkpoint().name == "step-3"
    assert list((tmp_path / "r").glob("config.resumed-*.yaml")), "a changed config on resume is recorded"


def test_atomic_dir_refuses_existing(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    with pytest.raises(RunError, match="already exists"):
        with atomic_dir(tmp_path / "out"):
            pass
