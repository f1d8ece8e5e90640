"""The run folder: metrics lines, atomic checkpoints and pruning, resume safety, one owner, save failures."""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import shutil
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.conftest import require
from metacot.run import (
    Run,
    RunError,
    RunLock,
    RunLockedError,
    SaveError,
    atomic_dir,
    is_complete,
    latest_checkpoint,
)


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


def test_a_resumed_run_continues_its_wandb_run(tmp_path: Path) -> None:
    """wandb offline: the resumed run folder logs into the same wandb run id, stored in the folder."""
    run = Run(tmp_path / "r", Cfg())
    run.init_wandb("metacot-test", mode="offline")
    run.log(1, loss=0.5)
    first = run._wandb.id
    run.close()
    assert (tmp_path / "r" / "wandb_id.txt").read_text().strip() == first
    again = Run(tmp_path / "r", Cfg(), resume=True)
    again.init_wandb("metacot-test", mode="offline")
    assert again._wandb.id == first
    again.log(2, loss=0.25)
    again.close()
    other = Run(tmp_path / "other", Cfg())
    other.init_wandb("metacot-test", mode="offline")
    assert other._wandb.id != first
    other.close()
    offline = sorted(p.name for p in (tmp_path / "r" / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(first in name for name in offline), offline  # "-1" when in the same second


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


# -- one owner per run folder ---------------------------------------------------------------------------------------

def _hold_run(root: str, ready: str) -> None:
    """A second process that owns the run folder until it is killed."""
    run = Run(Path(root), Cfg())
    Path(ready).write_text(str(os.getpid()))
    time.sleep(120)  # killed here
    run.close()


def _start_owner(tmp_path: Path) -> mp.process.BaseProcess:
    ready = tmp_path / "ready"
    proc = mp.get_context("spawn").Process(target=_hold_run, args=(str(tmp_path / "r"), str(ready)))
    proc.start()
    deadline = time.time() + 60
    while time.time() < deadline and not ready.exists() and proc.is_alive():
        time.sleep(0.05)
    assert ready.exists(), "the owner process did not start"
    return proc


def test_second_run_on_one_folder_is_refused_with_the_owner(tmp_path: Path) -> None:
    """A real second process owns the folder: opening it here is refused, naming that process's pid and host."""
    proc = _start_owner(tmp_path)
    try:
        with pytest.raises(RunLockedError, match=rf"pid {proc.pid} on host {socket.gethostname()}"):
            Run(tmp_path / "r", Cfg())
        assert not (tmp_path / "r" / "metrics.jsonl").read_text(), "the refused run wrote nothing"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()


def test_stale_lock_of_a_killed_run_is_taken_over(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """SIGKILL leaves the owner record behind (a crash, a requeued SLURM job): the next run takes the folder over
    and says whose lock it took; a clean close leaves nothing to take over."""
    proc = _start_owner(tmp_path)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    with caplog.at_level(logging.WARNING, logger="metacot.run"):
        run = Run(tmp_path / "r", Cfg(), resume=True)
    assert run.lock.took_over["pid"] == proc.pid
    assert f"took over the stale lock of pid {proc.pid}" in caplog.text and "that process is gone" in caplog.text
    run.close()
    assert RunLock(tmp_path / "r").acquire().took_over is None


def test_lock_is_per_open_file_within_one_process(tmp_path: Path) -> None:
    run = Run(tmp_path / "r", Cfg())
    with pytest.raises(RunLockedError, match=f"pid {os.getpid()}"):
        Run(tmp_path / "r", Cfg())
    run.close()
    Run(tmp_path / "r", Cfg()).close()


# -- pruning and leftovers ------------------------------------------------------------------------------------------

def _prune_until_killed(root: str) -> None:
    """Prune with a deletion that stops half-way: the parent SIGKILLs this process at that exact point.

    The stall is injected (shutil.rmtree deletes half the files, then blocks) because the real deletion of a few
    files is too fast to kill reliably in the middle; the kill itself is real.
    """
    import shutil

    def half_then_block(path: Any, *args: Any, **kwargs: Any) -> None:
        files = sorted(Path(path).rglob("*"))
        for f in files[: len(files) // 2]:
            if f.is_file():
                f.unlink()
        Path(root, "stalled").write_text("1")
        time.sleep(120)

    shutil.rmtree = half_then_block
    run = Run(Path(root), Cfg(), resume=True)
    run.prune_checkpoints(keep=1)


def test_killed_prune_never_leaves_a_broken_checkpoint(tmp_path: Path) -> None:
    root = tmp_path / "r"
    run = Run(root, Cfg())
    for step in (1, 2):
        with run.checkpoint(step) as d:
            for i in range(10):
                (d / f"shard-{i}.bin").write_bytes(b"x" * 100)
    run.close()
    proc = mp.get_context("spawn").Process(target=_prune_until_killed, args=(str(root),))
    proc.start()
    deadline = time.time() + 60
    while time.time() < deadline and not (root / "stalled").exists() and proc.is_alive():
        time.sleep(0.05)
    assert (root / "stalled").exists(), "the prune did not reach its deletion"
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    ckpts = root / "checkpoints"
    assert not (ckpts / "step-1").exists(), "the pruned checkpoint left its name before any file was deleted"
    assert [p.name.split("-")[0] for p in ckpts.glob(".trash-*")] == [".trash"]
    assert latest_checkpoint(ckpts).name == "step-2" and len(list((ckpts / "step-2").iterdir())) == 11
    Run(root, Cfg(), resume=True).close()
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-2"], "opening the run removed the prune's leftover"


def test_metrics_are_cut_back_to_the_resume_point(tmp_path: Path) -> None:
    """Rows after the newest checkpoint belong to a lost attempt: a resumed run logs those steps again, once."""
    run = Run(tmp_path / "r", Cfg())
    for step in (1, 2):
        run.log(step, loss=1.0 / step)
    with run.checkpoint(2) as d:
        (d / "x").write_text("x")
    run.log(3, loss=0.3)
    run.close()
    with open(tmp_path / "r" / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 4, "lo')  # torn by a kill
    run = Run(tmp_path / "r", Cfg(), resume=True)
    run.log(3, loss=0.33)
    assert [(r["step"], r["loss"]) for r in run.read_metrics()] == [(1, 1.0), (2, 0.5), (3, 0.33)]
    run.close()


# -- save failures ----------------------------------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs: a real disk that fills up (needs root)."""
    import subprocess

    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True)
    require(done.returncode == 0, f"cannot mount a tmpfs (root needed): {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_save_names_the_folder_and_keeps_the_previous_checkpoint(small_disk: Path) -> None:
    """A real full disk during a real accelerate save: the error says "disk full" and names the folder, the
    temporary folder is gone and the previous checkpoint stays the resume point."""
    import torch

    from metacot.training import TrainConfig, build_accelerator, release_accelerator, save_checkpoint

    acc = build_accelerator(TrainConfig(deepspeed="none", device="cpu"), micro_batch=1, grad_accum=1)
    model = torch.nn.Linear(256, 256)  # 257 kB of weights + 514 kB of Adam state per checkpoint
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 256)).sum().backward()
    opt.step()
    model, opt = acc.prepare(model, opt)
    run = Run(small_disk / "r", Cfg())
    try:
        first = save_checkpoint(acc, run, 1, {}, keep=2)
        filler = small_disk / "filler"
        free = shutil.disk_usage(small_disk).free
        filler.write_bytes(b"\0" * (free - 300_000))  # room for less than one more checkpoint
        with pytest.raises(SaveError, match=r"saving .*checkpoints/step-2 failed: disk full") as err:
            save_checkpoint(acc, run, 2, {}, keep=2)
        assert "step-1 stays the resume point" in str(err.value)
        assert sorted(p.name for p in run.checkpoints_dir.iterdir()) == ["step-1"]
        assert run.latest_checkpoint() == first and is_complete(first)
        filler.unlink()
        acc.load_state(str(first))  # the previous checkpoint still loads
    finally:
        run.close()
        release_accelerator(acc)


@pytest.mark.parametrize("stage", ["sft", "grpo"])
def test_a_trainer_on_a_folder_another_process_owns_is_refused_before_loading(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], stage: str
) -> None:
    """Both stage commands take the folder's lock first: with a real second process owning the folder, the command
    exits 1 with one line naming that process, and nothing in the folder changed (no models were loaded: the model
    and data paths here do not even exist)."""
    from metacot.flow_grpo.cli import main as grpo_main
    from metacot.sft.cli import main as sft_main

    proc = _start_owner(tmp_path)
    try:
        before = sorted((p.name, p.stat().st_size) for p in (tmp_path / "r").iterdir())
        main = {"sft": sft_main, "grpo": grpo_main}[stage]
        rc = main(["--config", "tiny", f"model={tmp_path}/no-model", f"data.train={tmp_path}/no-data.jsonl",
                   f"output_dir={tmp_path / 'r'}", "train.wandb_mode=disabled"])
        err = capsys.readouterr().err.strip()
        assert rc == 1, err
        assert f"in use by another run (pid {proc.pid} on host {socket.gethostname()}" in err
        assert len(err.splitlines()) == 1
        assert sorted((p.name, p.stat().st_size) for p in (tmp_path / "r").iterdir()) == before
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
