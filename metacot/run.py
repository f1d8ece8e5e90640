"""The run folder every stage writes, and atomic directory writes.

Layout (the unit users look at)::

    RUN/config.yaml            resolved config of the run (rewritten on resume only if unchanged)
    RUN/metrics.jsonl          one JSON object per logged step; each has ``step``
    RUN/checkpoints/step-N/    resumable training state (trainer-native format, e.g. DeepSpeed's)
    RUN/final/                 weights as safetensors, loadable with ``from_pretrained``
    RUN/report/                PNG plots

Checkpoints and ``final/`` are written into a hidden temporary sibling and renamed into place only once complete,
with a ``metacot_complete.json`` marker written last; a killed write therefore never looks complete and
:meth:`Run.latest_checkpoint` never returns it. What this module leaves out: the training state itself (each
trainer saves its own state into the folder :meth:`Run.checkpoint` hands it).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

from metacot.config import to_dict, to_yaml

COMPLETE_MARKER = "metacot_complete.json"


class RunError(RuntimeError):
    """A run folder is in a state that the requested action cannot use; the message says what to do."""


@contextlib.contextmanager
def atomic_dir(dest: Path, *, overwrite: bool = False, meta: dict[str, Any] | None = None) -> Iterator[Path]:
    """Yield a temporary folder that becomes ``dest`` only if the block finishes without error.

    The marker file ``metacot_complete.json`` (with ``meta`` and a timestamp) is written last, then the folder is
    renamed. On error the temporary folder is removed and ``dest`` is untouched.

    Args:
        dest: final folder path.
        overwrite: replace an existing ``dest`` (the old one is removed only after the new one is complete).
        meta: extra facts to record in the marker.

    Raises:
        RunError: ``dest`` exists and ``overwrite`` is False.
    """
    dest = Path(dest)
    if dest.exists() and not overwrite:
        raise RunError(f"{dest} already exists; choose another folder or pass overwrite")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".tmp-{dest.name}-{os.getpid()}-{time.monotonic_ns()}"
    tmp.mkdir()
    try:
        yield tmp
        commit_dir(tmp, dest, meta)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def commit_dir(tmp: Path, dest: Path, meta: dict[str, Any] | None = None) -> None:
    """Mark the filled temporary folder ``tmp`` complete and rename it to ``dest`` (replacing an old ``dest``).

    Used directly where several processes fill one folder (DeepSpeed's collective checkpoint save): every rank
    writes into ``tmp``, then the main rank commits it.
    """
    marker = {"complete": True, "time": time.time(), **(meta or {})}
    (tmp / COMPLETE_MARKER).write_text(json.dumps(marker, indent=2))
    _fsync_dir(tmp)
    if dest.exists():
        old = dest.parent / f".old-{dest.name}-{os.getpid()}"
        os.rename(dest, old)
        os.rename(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, dest)


def _fsync_dir(path: Path) -> None:
    for name in os.listdir(path):
        child = path / name
        if child.is_file():
            with open(child, "rb") as fh:
                os.fsync(fh.fileno())


def is_complete(path: Path) -> bool:
    """True when ``path`` was finished by :func:`atomic_dir` (its marker exists)."""
    return (Path(path) / COMPLETE_MARKER).is_file()


class Run:
    """A stage's run folder: config, metrics, checkpoints, final weights and report.

    Args:
        root: the run folder (created if absent).
        cfg: the resolved config dataclass, saved as ``config.yaml``.
        resume: continuing an existing run is allowed. Without it, a folder that already has checkpoints is refused
            so that a run never overwrites another by accident.
        writer: False on the non-main ranks of a distributed run: they use the paths but write nothing.
    """

    def __init__(self, root: str | Path, cfg: Any, *, resume: bool = False, writer: bool = True) -> None:
        self.root = Path(root)
        self.cfg = cfg
        self.writer = writer
        self._metrics: Any = None
        self._wandb: Any = None
        if not writer:
            return
        has_state = (self.root / "checkpoints").is_dir() and any(
            is_complete(p) for p in (self.root / "checkpoints").iterdir()
        )
        if has_state and not resume:
            raise RunError(
                f"{self.root} already holds checkpoints of an earlier run; resume it (resume=true) or choose a new "
                f"output folder"
            )
        for sub in ("checkpoints", "report"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._clean_partial_checkpoints()
        config_text = to_yaml(cfg)
        config_path = self.root / "config.yaml"
        if config_path.exists() and resume and config_path.read_text() != config_text:
            # Keep the original and record the new one beside it: a resumed run must not hide what changed.
            (self.root / f"config.resumed-{int(time.time())}.yaml").write_text(config_text)
        else:
            config_path.write_text(config_text)
        self._metrics = open(self.root / "metrics.jsonl", "a", encoding="utf-8")

    # -- paths ---------------------------------------------------------------------------------------------------
    @property
    def final_dir(self) -> Path:
        return self.root / "final"

    @property
    def report_dir(self) -> Path:
        return self.root / "report"

    @property
    def checkpoints_dir(self) -> Path:
        return self.root / "checkpoints"

    # -- metrics -------------------------------------------------------------------------------------------------
    def log(self, step: int, **metrics: Any) -> None:
        """Append one JSON line ``{"step": step, **metrics}`` (and send it to wandb if enabled).

        Non-finite floats are written as null so the file stays valid JSON.
        """
        if not self.writer:
            return
        row = {"step": int(step), **{k: _jsonable(v) for k, v in metrics.items()}}
        self._metrics.write(json.dumps(row) + "\n")
        self._metrics.flush()
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=int(step))

    def init_wandb(self, project: str, mode: str = "offline", name: str | None = None) -> None:
        """Start wandb (offline by default, files under ``RUN/wandb``) with the resolved config."""
        import wandb  # lazy: optional heavy dependency

        os.environ.setdefault("WANDB_SILENT", "true")
        self._wandb = wandb.init(
            project=project, mode=mode, dir=str(self.root), name=name or self.root.name, config=to_dict(self.cfg),
            reinit="finish_previous",
        )

    def read_metrics(self) -> list[dict[str, Any]]:
        """All rows of ``metrics.jsonl``, in order."""
        path = self.root / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    # -- checkpoints ---------------------------------------------------------------------------------------------
    def checkpoint(self, step: int, meta: dict[str, Any] | None = None) -> contextlib.AbstractContextManager[Path]:
        """Context manager yielding a temporary folder that becomes ``checkpoints/step-<step>`` when complete."""
        return atomic_dir(self.checkpoints_dir / f"step-{step}", overwrite=True, meta={"step": step, **(meta or {})})

    def latest_checkpoint(self) -> Path | None:
        """The complete checkpoint with the highest step, or None. Incomplete ones are never returned."""
        return latest_checkpoint(self.checkpoints_dir)

    def prune_checkpoints(self, keep: int) -> None:
        """Remove all but the newest ``keep`` complete checkpoints (``keep <= 0`` keeps all)."""
        if keep <= 0:
            return
        steps = sorted(_complete_steps(self.checkpoints_dir))
        for step in steps[:-keep]:
            shutil.rmtree(self.checkpoints_dir / f"step-{step}", ignore_errors=True)

    def _clean_partial_checkpoints(self) -> None:
        for path in self.checkpoints_dir.glob(".tmp-*"):
            shutil.rmtree(path, ignore_errors=True)

    def close(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _complete_steps(folder: Path) -> list[int]:
    steps = []
    if folder.is_dir():
        for path in folder.iterdir():
            if path.name.startswith("step-") and path.name[5:].isdigit() and is_complete(path):
                steps.append(int(path.name[5:]))
    return steps


def latest_checkpoint(folder: str | Path) -> Path | None:
    """Newest complete ``step-N`` folder under ``folder``, or None."""
    steps = _complete_steps(Path(folder))
    return Path(folder) / f"step-{max(steps)}" if steps else None


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item") and callable(value.item):  # torch / numpy scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
