"""The run folder every stage writes, and atomic directory writes.

Layout (the unit users look at)::

    RUN/config.yaml            resolved config of the run (rewritten on resume only if unchanged)
    RUN/metrics.jsonl          one JSON object per logged step; each has ``step``
    RUN/checkpoints/step-N/    resumable training state (trainer-native format, e.g. DeepSpeed's)
    RUN/final/                 weights as safetensors, loadable with ``from_pretrained``
    RUN/report/                PNG plots

    RUN/.lock                  the owner's lock (see below)

Checkpoints and ``final/`` are written into a hidden temporary sibling and renamed into place only once complete,
with a ``metacot_complete.json`` marker written last; a killed write therefore never looks complete and
:meth:`Run.latest_checkpoint` never returns it. Pruning renames an old checkpoint to a hidden trash name before
deleting it, so a killed prune never leaves a ``step-N`` marked complete with files missing; opening a run removes
the leftovers of killed writes and prunes (``.tmp-*``, ``.trash-*``, ``.old-*``).

One owner per run folder: :class:`RunLock` holds ``fcntl.flock`` on ``RUN/.lock`` for the run's life and writes its
pid, host and start time into it, so a second run on the same folder is refused with the holder's pid and host. The
kernel releases the lock when its process dies (a crash, SIGKILL, a requeued SLURM job), so the next run takes the
folder over and logs whose stale lock it took. ``flock`` is exact on a local disk and between processes of one host;
across hosts it holds only where the shared filesystem forwards locks (NFSv4, or NFSv3 with a lock manager; Lustre
mounted with ``flock``). A filesystem mounted with ``localflock`` or ``nolock`` sees only its own host's locks:
there, do not start a run of the same folder from two hosts.

``metrics.jsonl`` is cut back to the newest complete checkpoint when a run folder is opened: rows after it belong
to an attempt whose state was lost (a crash, a preemption) and are logged again by the resumed run, so every step
has one row. What this module leaves out: the training state itself (each trainer saves its own state into the
folder :meth:`Run.checkpoint` hands it).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import math
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Iterator

from metacot.config import to_dict, to_yaml

COMPLETE_MARKER = "metacot_complete.json"
LOCK_FILE = ".lock"
# Hidden leftovers of a killed write (.tmp-), prune (.trash-) or replacement (.old-): never complete, removed at start.
LEFTOVER_PREFIXES = (".tmp-", ".trash-", ".old-")

log = logging.getLogger(__name__)


WANDB_ID_FILE = "wandb_id.txt"  # the run folder's wandb run id, so that every resume continues that run


class RunError(RuntimeError):
    """A run folder is in a state that the requested action cannot use; the message says what to do."""


class RunLockedError(RunError):
    """Another live process owns the run folder."""


class SaveError(RunError):
    """Writing a checkpoint or ``final/`` failed; the message names the folder and the cause."""


class RunLock:
    """``fcntl.flock`` on ``RUN/.lock``, held from :meth:`acquire` to :meth:`release` (or the process's end).

    Args:
        root: the run folder (created if absent).

    Attributes:
        took_over: the owner record (pid, host, started) of a stale lock this one replaced, else None.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.path = self.root / LOCK_FILE
        self.took_over: dict[str, Any] | None = None
        self._fh: Any = None

    def acquire(self) -> RunLock:
        """Take the lock or refuse.

        Raises:
            RunLockedError: another process holds it; the message names its pid, host and start time.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _read_owner(fh)
            fh.close()
            raise RunLockedError(
                f"{self.root} is in use by another run (pid {owner.get('pid', '?')} on host {owner.get('host', '?')}, "
                f"started {owner.get('started', '?')}): two runs in one folder would overwrite each other's "
                f"checkpoints and metrics. Wait for it to end, stop it, or choose another output_dir") from None
        previous = _read_owner(fh)
        if previous:  # written by an owner that never released: it died (crash, SIGKILL, requeue)
            self.took_over = previous
            alive = previous.get("host") == socket.gethostname() and _pid_alive(int(previous.get("pid", 0)))
            log.warning("%s: took over the stale lock of pid %s on host %s (started %s)%s", self.root,
                        previous.get("pid"), previous.get("host"), previous.get("started"),
                        "" if alive else ": that process is gone")
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}))
        fh.flush()
        os.fsync(fh.fileno())
        self._fh = fh
        return self

    def release(self) -> None:
        """Empty the owner record (a clean end) and release the lock. Idempotent."""
        if self._fh is None:
            return
        self._fh.seek(0)
        self._fh.truncate()
        self._fh.close()  # closing the file releases the flock
        self._fh = None

    @property
    def held(self) -> bool:
        return self._fh is not None


def _read_owner(fh: Any) -> dict[str, Any]:
    fh.seek(0)
    try:
        owner = json.loads(fh.read() or "{}")
    except json.JSONDecodeError:  # torn by a kill between truncate and write
        return {"pid": "?", "host": "?"}
    return owner if isinstance(owner, dict) else {}


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def describe_write_error(exc: BaseException, folder: Path) -> str:
    """The cause of a failed write into ``folder``, in words: "disk full" when the disk is full.

    torch's zip writer reports ENOSPC as ``RuntimeError: [enforce fail at inline_container.cc] unexpected pos``,
    without the errno; so besides an errno in the exception chain, a small probe write into ``folder`` tells.
    """
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT) or \
                "No space left on device" in str(cause):
            return "disk full (no space left on the device)"
        cause = cause.__cause__ or cause.__context__
    probe = Path(folder) / ".metacot-space-probe"
    try:
        with open(probe, "wb") as fh:
            fh.write(b"\0" * 2**20)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            return "disk full (no space left on the device)"
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


@contextlib.contextmanager
def saving(dest: Path, tmp: Path, kept: str) -> Iterator[None]:
    """Turn a failed write of ``tmp`` (the folder becoming ``dest``) into a :class:`SaveError` that names ``dest``
    and the cause; ``tmp`` is removed. ``kept`` says what stays usable (e.g. the previous checkpoint)."""
    try:
        yield
    except (OSError, RuntimeError) as exc:
        if isinstance(exc, RunError):
            raise
        cause = describe_write_error(exc, tmp if tmp.is_dir() else dest.parent)
        shutil.rmtree(tmp, ignore_errors=True)
        raise SaveError(f"saving {dest} failed: {cause}. Its temporary folder was removed and {kept}; free space "
                        f"(or fix the cause) and start the same command again") from exc


def resume_note(run: "Run") -> str:
    """What a restart resumes from, for :func:`saving`'s message."""
    latest = run.latest_checkpoint()
    return f"the newest complete checkpoint {latest} stays the resume point" if latest else \
        "there is no earlier complete checkpoint: a restart begins at step 0"


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


def remove_dir(path: Path) -> None:
    """Delete a folder atomically as far as readers see: rename it to a hidden trash name, then delete that.

    A kill during the deletion leaves only the trash folder (removed when the run folder is next opened), never a
    folder under its old name with files missing.
    """
    trash = path.parent / f".trash-{path.name}-{os.getpid()}-{time.monotonic_ns()}"
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


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
        shutil.rmtree(old, ignore_errors=True)  # hidden: a kill here leaves a leftover, never a broken dest
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
        lock: the folder's :class:`RunLock`, already acquired (the trainers take it before loading models); None =
            acquire one now. The run releases it in :meth:`close`.

    Raises:
        RunLockedError: another live process owns the folder.
        RunError: the folder holds checkpoints and ``resume`` is False.
    """

    def __init__(self, root: str | Path, cfg: Any, *, resume: bool = False, writer: bool = True,
                 lock: RunLock | None = None) -> None:
        self.root = Path(root)
        self.cfg = cfg
        self.writer = writer
        self._metrics: Any = None
        self._wandb: Any = None
        self.lock = lock
        if not writer:
            return
        if self.lock is None:
            self.lock = RunLock(self.root).acquire()
        try:
            self._open(resume)
        except BaseException:
            self.lock.release()
            raise

    def _open(self, resume: bool) -> None:
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
        self._clean_leftovers()
        config_text = to_yaml(self.cfg)
        config_path = self.root / "config.yaml"
        if config_path.exists() and resume and config_path.read_text() != config_text:
            # Keep the original and record the new one beside it: a resumed run must not hide what changed.
            (self.root / f"config.resumed-{int(time.time())}.yaml").write_text(config_text)
        else:
            config_path.write_text(config_text)
        latest = self.latest_checkpoint()
        self._cut_metrics(int(latest.name[5:]) if latest is not None else None)
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
        # A resumed run (same folder: requeue, crash, another node) continues the same wandb run: its id is kept in
        # the run folder. wandb drops re-logged steps at or below its last one (the steps between the resume point
        # and the crash); metrics.jsonl holds them.
        id_file = self.root / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else None
        self._wandb = wandb.init(
            project=project, mode=mode, dir=str(self.root), name=name or self.root.name, config=to_dict(self.cfg),
            reinit="finish_previous", id=run_id, resume="allow" if run_id else None,
        )
        if run_id is None:
            tmp = id_file.with_name(f".tmp-{WANDB_ID_FILE}-{os.getpid()}")
            tmp.write_text(self._wandb.id + "\n")
            tmp.replace(id_file)

    def read_metrics(self) -> list[dict[str, Any]]:
        """All rows of ``metrics.jsonl``, in order."""
        return read_metrics(self.root / "metrics.jsonl")

    def _cut_metrics(self, step: int | None) -> None:
        """Keep only the rows up to ``step`` (None: none), and drop a line torn by a kill; rewritten atomically."""
        path = self.root / "metrics.jsonl"
        if not path.is_file():
            return
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        rows = read_metrics(path, skip_torn=True)
        kept = [r for r in rows if step is not None and int(r.get("step", 0)) <= step]
        if len(kept) == len(lines):
            return
        tmp = path.with_name(f".tmp-metrics-{os.getpid()}.jsonl")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        os.replace(tmp, path)
        log.warning("%s: metrics.jsonl cut back to the resume point (step %s): %d rows of a lost attempt dropped",
                    self.root, step, len(lines) - len(kept))

    # -- checkpoints ---------------------------------------------------------------------------------------------
    def checkpoint(self, step: int, meta: dict[str, Any] | None = None) -> contextlib.AbstractContextManager[Path]:
        """Context manager yielding a temporary folder that becomes ``checkpoints/step-<step>`` when complete."""
        return atomic_dir(self.checkpoints_dir / f"step-{step}", overwrite=True, meta={"step": step, **(meta or {})})

    def latest_checkpoint(self) -> Path | None:
        """The complete checkpoint with the highest step, or None. Incomplete ones are never returned."""
        return latest_checkpoint(self.checkpoints_dir)

    def prune_checkpoints(self, keep: int) -> None:
        """Remove all but the newest ``keep`` complete checkpoints (``keep <= 0`` keeps all), each atomically
        (:func:`remove_dir`)."""
        if keep <= 0:
            return
        steps = sorted(_complete_steps(self.checkpoints_dir))
        for step in steps[:-keep]:
            remove_dir(self.checkpoints_dir / f"step-{step}")

    def _clean_leftovers(self) -> None:
        for folder in (self.root, self.checkpoints_dir):
            for path in folder.iterdir():
                if path.name.startswith(LEFTOVER_PREFIXES):
                    if path.is_dir():
                        shutil.rmtree(path, ignore_errors=True)
                    else:
                        path.unlink(missing_ok=True)

    def close(self) -> None:
        """Close the metrics file and wandb, and release the folder's lock. Idempotent."""
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        if self.lock is not None:
            self.lock.release()


def _complete_steps(folder: Path) -> list[int]:
    steps = []
    if folder.is_dir():
        for path in folder.iterdir():
            if path.name.startswith("step-") and path.name[5:].isdigit() and is_complete(path):
                steps.append(int(path.name[5:]))
    return steps


def read_metrics(path: str | Path, *, skip_torn: bool = False) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl``, in order. ``skip_torn``: drop a torn last line (a kill mid-write)."""
    from metacot.jsonl import read_dicts

    return read_dicts(path, torn_tail="drop" if skip_torn else "error")


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
