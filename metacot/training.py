"""Training plumbing shared by Stage 1 (SFT) and Stage 2 (Flow-GRPO).

What lives here: the config blocks both stages share (:class:`TrainConfig`, :class:`ExpertConfig`), the
accelerate + DeepSpeed set-up (DeepSpeed JSON files in ``launch/deepspeed/`` with ``"auto"`` values filled from the
config, so one file serves every batch size), LoRA / freezing of an expert, per-step seeded generators (resume is
exact because every random draw of step ``s`` depends only on ``(seed, s)``), checkpoint save / load in
accelerate's and DeepSpeed's own format, and metric plots. What does not: anything about a stage's math.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import torch

from metacot.config import check
from metacot.launch_files import LAUNCH_DIR

DEEPSPEED_DIR = LAUNCH_DIR / "deepspeed"


@dataclass
class LoRAConfig:
    r: int = 8  # adapter rank
    alpha: int = 16  # scaling numerator: the update is (alpha / r) * B @ A
    dropout: float = 0.0
    # Module names (suffixes) that get adapters. Empty = the expert's default set (attention projections).
    target_modules: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        check(self.r > 0, "lora.r", "must be a positive rank")
        check(self.alpha > 0, "lora.alpha", "must be positive")


@dataclass
class ExpertConfig:
    mode: str = "lora"  # "full" (all weights train), "lora" (peft adapters train) or "frozen"
    lr: float = 1e-4  # peak learning rate of this expert's parameters
    weight_decay: float = 0.0
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% more compute
    # Speed options of the generation expert (the MMDiT; metacot.models.speed, measured in benchmarks/NOTES.md):
    checkpoint_blocks: Optional[int] = None  # with gradient_checkpointing: recompute only the first N blocks (None=all)
    fused_lora_inference: bool = True  # no-grad forwards (rollouts, eval) run LoRA layers as one merged matmul
    compile: bool = False  # torch.compile each transformer block (first steps pay the compilation)
    attention_backend: str = ""  # a diffusers attention backend, e.g. _native_cudnn; "" = diffusers' default

    def __post_init__(self) -> None:
        check(self.mode in {"full", "lora", "frozen"}, "mode", f"is {self.mode!r}; use full, lora or frozen")
        check(self.lr >= 0, "lr", "must be >= 0")
        check(self.checkpoint_blocks is None or self.checkpoint_blocks >= 0, "checkpoint_blocks",
              f"is {self.checkpoint_blocks}; use a number of blocks >= 0, or leave it unset for all")
        check(self.checkpoint_blocks is None or self.gradient_checkpointing, "checkpoint_blocks",
              "takes effect only with gradient_checkpointing=true; set that too, or remove checkpoint_blocks")

    def check_mmdit_only(self, key: str) -> None:
        """Refuse the MMDiT-only speed options on another expert (the VLM), naming the key."""
        for name, default in (("checkpoint_blocks", None), ("compile", False), ("attention_backend", "")):
            check(getattr(self, name) == default, f"{key}.{name}",
                  "applies to the generation expert (the MMDiT) only; remove it from this expert")

    @property
    def trainable(self) -> bool:
        return self.mode != "frozen"


@dataclass
class TrainConfig:
    max_steps: int = 100  # optimizer steps (SFT) or GRPO iterations (Flow-GRPO)
    # Flow-GRPO: also stop once the iterations (rollout + reward wait + training; evaluation excluded) have taken this
    # many seconds in all, for comparisons at equal GPU time (0 = no time budget). The final/ is written as usual.
    max_seconds: float = 0.0
    seed: int = 0
    # DeepSpeed: "zero2", "zero3", "zero3_offload" (files in launch/deepspeed/), a path to a JSON file, or "none"
    # (plain accelerate, e.g. for quick CPU experiments).
    deepspeed: str = "zero2"
    device: str = "auto"  # "auto" (cuda when available), "cpu" or "cuda"
    mixed_precision: str = "auto"  # "auto" = bf16 on GPU, fp32 on CPU; or "no" / "bf16"
    grad_clip: float = 1.0  # max global grad norm (0 = off)
    warmup_steps: int = 0  # linear warm-up of the learning rate
    lr_schedule: str = "constant"  # after warm-up: "constant", "cosine" or "linear" decay to 0 at max_steps
    log_every: int = 1
    save_every: int = 0  # checkpoint every N steps (0 = only at the end and on a stop signal)
    keep_checkpoints: int = 2  # newest complete checkpoints kept (0 = all)
    resume: bool = True  # continue from the newest complete checkpoint in the run folder, if any
    wandb_mode: str = "offline"  # "offline", "online" or "disabled"
    wandb_project: str = "metacot"
    progress: bool = True  # tqdm progress bar

    def __post_init__(self) -> None:
        check(self.max_steps > 0, "train.max_steps", "must be > 0")
        check(self.max_seconds >= 0, "train.max_seconds", "must be >= 0 (0 = no time budget)")
        check(self.lr_schedule in {"constant", "cosine", "linear"}, "train.lr_schedule",
              f"is {self.lr_schedule!r}; use constant, cosine or linear")
        check(self.mixed_precision in {"auto", "no", "bf16"}, "train.mixed_precision", "use auto, no or bf16")
        check(self.device in {"auto", "cpu", "cuda"}, "train.device", "use auto, cpu or cuda")
        check(self.wandb_mode in {"offline", "online", "disabled"}, "train.wandb_mode",
              "use offline, online or disabled")
        check(self.warmup_steps >= 0 and self.log_every > 0 and self.save_every >= 0, "train",
              "warmup_steps and save_every must be >= 0, log_every > 0")

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("train.device=cuda but no CUDA GPU is visible; set train.device=cpu or auto")
        return torch.device(self.device)

    def resolved_precision(self) -> str:
        if self.mixed_precision != "auto":
            return self.mixed_precision
        return "bf16" if self.resolved_device().type == "cuda" else "no"


# -- distributed set-up ------------------------------------------------------------------------------------------

def ensure_process_group_env() -> None:
    """Fill RANK/WORLD_SIZE/MASTER_* for a single in-process run when no launcher set them.

    ``accelerate launch`` / ``torchrun`` / the SLURM templates set these; tests and ``metacot quickstart`` run the
    real DeepSpeed engine at world size 1 inside the current process instead of spawning a launcher.
    """
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(sock.getsockname()[1])


def deepspeed_config(name_or_path: str, *, micro_batch: int, grad_accum: int, grad_clip: float,
                     bf16: bool) -> dict[str, Any] | None:
    """Load a DeepSpeed JSON (preset name or path) and fill its ``"auto"`` values from the run's config.

    Returns None for ``"none"`` (plain accelerate without DeepSpeed).
    """
    if name_or_path == "none":
        return None
    path = DEEPSPEED_DIR / f"{name_or_path}.json"
    if not path.is_file():
        path = Path(name_or_path)
    if not path.is_file():
        presets = ", ".join(sorted(p.stem for p in DEEPSPEED_DIR.glob("*.json")))
        raise FileNotFoundError(f"train.deepspeed={name_or_path!r} is neither a preset ({presets}) nor a JSON file")
    cfg = json.loads(path.read_text())
    fill = {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": grad_accum,
            "gradient_clipping": grad_clip}
    for key, value in fill.items():
        if cfg.get(key) == "auto":
            cfg[key] = value
    if isinstance(cfg.get("bf16"), dict) and cfg["bf16"].get("enabled") == "auto":
        cfg["bf16"]["enabled"] = bf16
    cfg.pop("train_batch_size", None)  # derived by DeepSpeed from micro batch x accumulation x world size
    return cfg


def build_accelerator(train: TrainConfig, *, micro_batch: int, grad_accum: int) -> Any:
    """An ``accelerate.Accelerator`` with the DeepSpeed plugin of the config (or none).

    Never passes ``cpu=True`` together with a DeepSpeed plugin: DeepSpeed would then silently not be used
    (shared/notes/environment.md); on a CPU-only machine DeepSpeed picks its CPU accelerator by itself.
    """
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin

    ensure_process_group_env()
    precision = train.resolved_precision()
    ds = deepspeed_config(train.deepspeed, micro_batch=micro_batch, grad_accum=grad_accum,
                          grad_clip=train.grad_clip, bf16=precision == "bf16")
    if ds is None:
        from accelerate.utils import DistributedDataParallelKwargs

        # Some LoRA targets get no gradient in a step (e.g. the last block's text-stream output projections):
        # DDP must be told, or its second step fails.
        return Accelerator(mixed_precision=precision, cpu=train.resolved_device().type == "cpu",
                           gradient_accumulation_steps=grad_accum, step_scheduler_with_optimizer=False,
                           kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    handlers = []
    if train.resolved_device().type == "cpu":
        from accelerate.utils import InitProcessGroupKwargs

        # Without an explicit gloo group, accelerate + DeepSpeed on CPU tell every rank it is rank 0 of 1.
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    # step_scheduler_with_optimizer=False: the trainers step their schedule once per optimizer step, and their batch
    # sizes are global. accelerate's default steps it num_processes times per call (it assumes per-process batches):
    # on 8 GPUs warm-up and cosine decay would run 8x fast, ending the schedule an eighth into the run.
    return Accelerator(mixed_precision=precision, deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=ds),
                       gradient_accumulation_steps=grad_accum, step_scheduler_with_optimizer=False,
                       kwargs_handlers=handlers)


class RankFailure(RuntimeError):
    """Another rank failed a step that every rank must finish; this rank stopped too instead of waiting for it."""


def on_every_rank(what: str, fn: Callable[[], Any], device: torch.device | str = "cpu") -> Any:
    """Run ``fn`` here, then agree with every rank that it succeeded everywhere (one all-reduce) before any rank
    goes on to the next collective.

    Why: a rank whose ``fn`` raised (a judge that stopped answering) would leave the others blocked in their next
    gather until the backend's timeout (NCCL: 10+ minutes; across nodes nobody kills them). With the agreement every
    rank stops at once: the failing rank with its own error, the others with :class:`RankFailure` naming it.
    ``device``: where the flag tensor lives (the process group's device: CUDA for NCCL).
    """
    import torch.distributed as dist

    error: BaseException | None = None
    result = None
    try:
        result = fn()
    except Exception as exc:  # re-raised below, after the other ranks know
        error = exc
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        flags = torch.zeros(dist.get_world_size(), dtype=torch.int64, device=device)
        flags[dist.get_rank()] = int(error is not None)
        dist.all_reduce(flags)
        failed = [r for r, f in enumerate(flags.tolist()) if f]
        if failed and error is None:
            raise RankFailure(f"{what} failed on rank(s) {failed}; rank {dist.get_rank()} stops too rather than wait "
                              f"for them in the next collective (the cause is in rank {failed[0]}'s error)")
    if error is not None:
        raise error
    return result


def release_accelerator(accelerator: Any) -> None:
    """Free an accelerator's engines and reset accelerate's process-wide state (so a second run can start
    in the same process, as the tests and the quickstart do)."""
    from accelerate.state import AcceleratorState
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    accelerator.free_memory()
    AcceleratorState._reset_state(reset_partial_state=True)
    unset_hf_deepspeed_config()


@contextlib.contextmanager
def plain_model_loading() -> Iterator[None]:
    """Load models with real (unpartitioned) weights even while a ZeRO-3 accelerator is alive.

    Under ZeRO-3, accelerate switches transformers into DeepSpeed's partitioned-init mode, so ``from_pretrained``
    would build empty parameters; consolidating a run into a fresh CPU copy needs the plain mode for a moment.
    """
    from transformers.integrations import deepspeed as hf_ds

    saved = hf_ds._hf_deepspeed_config_weak_ref
    hf_ds._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = saved


# -- experts -----------------------------------------------------------------------------------------------------

def prepare_expert(module: torch.nn.Module, cfg: ExpertConfig, default_targets: Sequence[str]) -> torch.nn.Module:
    """Freeze, fully unfreeze, or wrap ``module`` with LoRA adapters according to ``cfg``.

    Returns the module to train (a ``peft.PeftModel`` for LoRA). Only adapter weights train under LoRA.
    """
    if cfg.mode == "frozen":
        module.requires_grad_(False)
        return module
    if cfg.mode == "full":
        module.requires_grad_(True)
        return module
    from peft import LoraConfig, get_peft_model

    targets = list(cfg.lora.target_modules) or list(default_targets)
    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=targets, init_lora_weights=True)
    module.requires_grad_(False)
    return get_peft_model(module, lora)


def trainable_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def lr_lambda(warmup: int, total: int, schedule: str) -> Callable[[int], float]:
    """Multiplier of the peak learning rate at optimizer step ``s`` (0-based)."""

    def fn(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return fn


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices): LoRA initialisation and any library draws become repeatable."""
    from accelerate.utils import set_seed

    set_seed(seed)


def step_generator(seed: int, step: int, stream: int = 0, device: str | torch.device = "cpu") -> torch.Generator:
    """A generator whose state depends only on ``(seed, step, stream)``.

    Every random draw of a training step comes from such generators, so a resumed run draws exactly what an
    uninterrupted one would, without saving RNG state.
    """
    gen = torch.Generator(device=device)
    gen.manual_seed((seed * 1_000_003 + step * 7_919 + stream * 104_729) % (2**63 - 1))
    return gen


def epoch_batch_indices(n: int, batch: int, step: int, seed: int) -> list[int]:
    """Indices of samples for ``step``: consecutive slices of per-epoch seeded permutations of ``range(n)``.

    The data position is a pure function of the step, so resume continues exactly where the run stopped.
    """
    if n <= 0:
        raise ValueError("cannot draw batches from an empty dataset")
    out: list[int] = []
    start = step * batch
    while len(out) < batch:
        epoch, offset = divmod(start + len(out), n)
        gen = torch.Generator().manual_seed(seed * 7_919 + epoch)
        perm = torch.randperm(n, generator=gen).tolist()
        out.extend(perm[offset: offset + batch - len(out)])
    return out


# -- checkpoints ---------------------------------------------------------------------------------------------------

def save_checkpoint(accelerator: Any, run: Any, step: int, extra: dict[str, Any], keep: int,
                    write_extra: Callable[[Path], None] | None = None) -> Path:
    """Save resumable state as ``RUN/checkpoints/step-<step>``, atomically, from every rank.

    Model, optimizer, scheduler and RNG states go in accelerate/DeepSpeed's native format (DeepSpeed saves
    collectively: each rank writes its shard into the same folder), plus ``trainer_state.json`` with ``extra``.
    All ranks write into a temporary folder that the main rank commits (marker + rename) only after everyone
    finished, so a killed save is never mistaken for a checkpoint. ``write_extra(folder)`` (main rank) adds
    files of the trainer's own (e.g. EMA weights).

    Raises:
        metacot.run.SaveError: the write failed (disk full, ...); the temporary folder is removed and the previous
            checkpoint stays the resume point.
    """
    from metacot.run import commit_dir, resume_note, saving

    tmp = run.checkpoints_dir / f".tmp-step-{step}"
    dest = run.checkpoints_dir / f"step-{step}"
    with saving(dest, tmp, resume_note(run)):
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        if accelerator.is_main_process:
            layout = {"world_size": accelerator.num_processes, "distributed": accelerator.distributed_type.name}
            (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **layout, **extra}, indent=2))
            if write_extra is not None:
                write_extra(tmp)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            commit_dir(tmp, dest, {"step": step})
    if accelerator.is_main_process:
        run.prune_checkpoints(keep)
    accelerator.wait_for_everyone()
    return dest


def load_training_state(accelerator: Any, source: Path) -> dict[str, Any]:
    """Restore what :func:`save_checkpoint` wrote; returns its ``trainer_state.json`` dict.

    Raises:
        metacot.run.RunError: a DeepSpeed checkpoint written by another number of ranks. Its optimizer states are
            partitioned per rank (ZeRO-2 and ZeRO-3), and loading them on another layout fails deep inside DeepSpeed
            with a tensor-size mismatch; refused here with the way out instead.
    """
    from metacot.run import RunError

    state = json.loads((source / "trainer_state.json").read_text())
    saved, now = state.get("world_size"), accelerator.num_processes
    if accelerator.distributed_type.name == "DEEPSPEED" and saved is not None and saved != now:
        raise RunError(
            f"{source} was written by {saved} ranks with DeepSpeed, and this run has {now}: DeepSpeed partitions the "
            f"optimizer states per rank, so they cannot be loaded on another number of ranks. Resume with "
            f"{saved} processes (nodes x GPUs per node), or export these weights (metacot export RUN --step "
            f"{state.get('step')}) and start a new run from them on {now} ranks (model=<the export>, "
            f"train.resume=false)")
    accelerator.load_state(str(source))
    return state


def claim_run_folder(output_dir: str | Path) -> Any:
    """The run folder's :class:`metacot.run.RunLock`, taken before any model loads; None on the other ranks (the
    main rank, ``RANK`` 0, owns the folder for the whole distributed run).

    Raises:
        metacot.run.RunLockedError: another live run owns the folder.
    """
    from metacot.run import RunLock

    if int(os.environ.get("RANK", "0")) != 0:
        return None
    return RunLock(output_dir).acquire()


# -- reporting -----------------------------------------------------------------------------------------------------

def plot_metrics(rows: Iterable[dict[str, Any]], keys: Sequence[str], path: Path, title: str,
                 x_key: str = "step") -> Path | None:
    """Line plot of ``keys`` against ``x_key`` from metrics rows; one panel per key. Returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(rows)
    present = [k for k in keys if any(r.get(k) is not None for r in rows)]
    if not present:
        return None
    fig, axes = plt.subplots(1, len(present), figsize=(4.2 * len(present), 3.2), squeeze=False)
    for ax, key in zip(axes[0], present):
        pts = [(r[x_key], r[key]) for r in rows if r.get(key) is not None and x_key in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 50 else None)
        ax.set_title(key)
        ax.set_xlabel(x_key)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# -- stop signals (preemption) ---------------------------------------------------------------------------------------

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "try again later"; the SLURM templates requeue the job on it


class Preempted(RuntimeError):
    """A stop signal arrived; a checkpoint was saved at ``step`` and the run can be resumed."""

    def __init__(self, step: int, checkpoint: Path | None) -> None:
        super().__init__(f"stopped by a signal at step {step}; checkpoint {checkpoint}. Start the same command "
                         f"again (or requeue the job) to resume from it")
        self.step, self.checkpoint = step, checkpoint


def progress_bar(train: TrainConfig, accelerator: Any, initial: int, desc: str) -> Any:
    """A tqdm bar over ``train.max_steps`` on the main rank when ``train.progress``; None otherwise."""
    if not (train.progress and accelerator.is_main_process):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=train.max_steps, initial=initial, desc=desc, dynamic_ncols=True)


def stop_if_requested(stop: "StopFlag", run: Any, step: int, save: Callable[[], Path | None],
                      device: torch.device | str = "cpu") -> None:
    """At a step boundary: if a stop signal arrived on any rank, checkpoint (``save``), log it and raise
    :class:`Preempted`.

    Several ranks agree first (one all-reduce of the flag per step; ``device``: the process group's device). A signal
    reaches the ranks at slightly different times; a rank that saw it one boundary before another would enter the
    collective save while the other enters the next step's collectives, and both would hang or abort.
    """
    import torch.distributed as dist

    requested = stop.requested
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        flag = torch.tensor([int(requested)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        requested = bool(flag.item())
        if requested and stop.signal_name is None:
            stop.signal_name = "a signal on another rank"
    if not requested:
        return
    checkpoint = save() or run.latest_checkpoint()
    run.log(step, stopped_by=stop.signal_name)
    raise Preempted(step, checkpoint)


class StopFlag:
    """Set by SIGUSR1 / SIGTERM (SLURM's warning signal before a time limit or preemption, or ``scancel``).

    The training loop checks it at each step boundary, saves a checkpoint and raises :class:`Preempted`; stopping
    between steps keeps the saved state consistent (no half-applied optimizer step).
    """

    def __init__(self, signals: Sequence[str] = ("SIGUSR1", "SIGTERM")) -> None:
        import signal
        import threading

        self.requested = False
        self.signal_name: str | None = None
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be installed from the main thread
        for name in signals:
            signal.signal(getattr(signal, name), self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        import signal

        self.requested = True
        self.signal_name = signal.Signals(signum).name
