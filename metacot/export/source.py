"""Where an export's weights come from: a run's ``final/`` folder, or a complete checkpoint consolidated into one.

A run folder is identified by its ``config.yaml`` (Stage 1 SFT or Stage 2 Flow-GRPO, told apart by their keys).
:func:`resolve_source` checks that what was asked for exists and is complete (``metacot.run.is_complete``);
:func:`require_base` that the base model the run started from is still where the run recorded it (paths in
``config.yaml`` are as the run was given them: relative ones resolve against the current folder).

:func:`final_from_checkpoint` rebuilds a ``final/``-style folder from ``RUN/checkpoints/step-N/``: DeepSpeed's own
``get_fp32_state_dict_from_zero_checkpoint`` gathers the ZeRO-2/3 shards into plain fp32 tensors (plain-accelerate
checkpoints hold ``model.safetensors``), and :func:`metacot.final.consolidate` / :func:`metacot.final.write_final`
load them into a fresh copy of the run's base model carrying the trainer's adapters and write the folder, exactly as
the trainers do at the end of a run. Flow-GRPO checkpoints with an EMA (``ema.pt``) export the EMA weights, as
``final/`` does.

Left out: checkpoints of other trainers, and partial loads (a trained tensor missing from the checkpoint is an error).
"""

from __future__ import annotations

import contextlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from metacot.config import ConfigError, load_config
from metacot.facts import read_facts
from metacot.run import is_complete

if TYPE_CHECKING:
    import torch


class ExportError(RuntimeError):
    """An export cannot be made as asked; the message says what is wrong and how to fix it."""


@dataclass
class RunSource:
    """A run folder and the weights of it to export.

    Attributes:
        run: the run folder.
        stage: ``"sft"`` or ``"grpo"``.
        cfg: the run's resolved config (``SFTConfig`` or ``GRPOConfig``).
        final: the complete ``final/`` folder to export (None when exporting a checkpoint).
        checkpoint: the complete ``checkpoints/step-N`` folder (None when exporting ``final/``).
        step: the training step (GRPO: iteration) of the exported weights.
    """

    run: Path
    stage: str
    cfg: Any
    final: Path | None
    checkpoint: Path | None
    step: int

    @property
    def base_model(self) -> Path:
        """The pipeline folder the run started from (SFT: the base model; GRPO: the Stage 1 ``final/``)."""
        return Path(self.cfg.model)


def run_stage(config_path: Path) -> str:
    """``"sft"`` or ``"grpo"`` from the keys of a run's ``config.yaml``.

    Raises:
        ExportError: the file is missing or belongs to neither stage.
    """
    from omegaconf import OmegaConf

    if not config_path.is_file():
        raise ExportError(f"{config_path.parent} is not a metacot run folder: it has no config.yaml; pass the folder "
                          f"a `metacot sft` / `metacot grpo` run wrote (its output_dir)")
    keys = set(OmegaConf.load(config_path).keys())
    if "rollout" in keys:
        return "grpo"
    if "und_loss_weight" in keys:
        return "sft"
    raise ExportError(f"{config_path}: neither an SFT config (no und_loss_weight) nor a Flow-GRPO config (no rollout); "
                      f"pass the output folder of a metacot training run")


def load_run_config(run: Path) -> tuple[str, Any]:
    """The stage and validated config dataclass of a run folder."""
    stage = run_stage(run / "config.yaml")
    if stage == "sft":
        from metacot.sft.config import SFTConfig as schema
    else:
        from metacot.flow_grpo.config import GRPOConfig as schema  # type: ignore[no-redef]
    try:
        return stage, load_config(schema, run / "config.yaml")
    except ConfigError as exc:
        raise ExportError(f"{run / 'config.yaml'} no longer loads as a {stage} config ({exc}); was it edited by hand?"
                          ) from exc


def _complete_steps(run: Path) -> list[int]:
    folder = run / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(int(p.name[5:]) for p in folder.iterdir()
                  if p.name.startswith("step-") and p.name[5:].isdigit() and is_complete(p))


def resolve_source(run: str | Path, step: int | None = None) -> RunSource:
    """Check a run folder and pick what to export: its ``final/`` (``step=None``) or checkpoint ``step``.

    Raises:
        ExportError: no such folder, no complete ``final/`` / checkpoint, or a checkpoint whose base model is gone.
    """
    run = Path(run)
    if not run.is_dir():
        raise ExportError(f"run folder {run} does not exist; pass the output_dir of a metacot sft/grpo run")
    stage, cfg = load_run_config(run)
    steps = _complete_steps(run)
    listed = ", ".join(map(str, steps)) or "none"
    if step is None:
        final = run / "final"
        if not is_complete(final):
            why = "is incomplete (no metacot_complete.json: the run stopped while writing it)" if final.exists() \
                else "does not exist (the run has not finished)"
            hint = f"export a checkpoint with --step N (complete checkpoints: {listed})" if steps \
                else "finish or resume the run first (it has no complete checkpoint either)"
            raise ExportError(f"{final} {why}; {hint}")
        meta = read_facts(final)
        return RunSource(run, stage, cfg, final, None, int(meta.get("step", -1)))
    ckpt = run / "checkpoints" / f"step-{step}"
    if step not in steps:
        why = "is incomplete (interrupted while saving)" if ckpt.exists() else "does not exist"
        raise ExportError(f"checkpoint {ckpt} {why}; complete checkpoints of this run: {listed}"
                          + ("" if steps else " (export final/ by leaving out --step)"))
    return RunSource(run, stage, cfg, None, ckpt, step)


def require_base(path: Path, why: str) -> Path:
    """Refuse when the base pipeline folder a run recorded is gone (it is needed to rebuild or un-merge weights)."""
    from metacot.models.loading import ModelFolderError, check_model_folder

    try:
        return check_model_folder(path)
    except ModelFolderError as exc:
        raise ExportError(f"the base model the run recorded cannot be found or is incomplete ({exc}); it is needed "
                          f"{why}. Restore it at {path}, or export the run's final/ with --merge-lora") from exc


# -- checkpoint consolidation ------------------------------------------------------------------------------------------

def read_checkpoint_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    """Plain fp32 tensors of the trained module saved in a checkpoint (state-dict names of the prepared module).

    DeepSpeed checkpoints (``latest`` + ``pytorch_model/``) are gathered with DeepSpeed's own ZeRO-2/3 utility;
    checkpoints of runs without DeepSpeed hold accelerate's ``model.safetensors``.
    """
    if (ckpt / "model.safetensors").is_file():
        from safetensors.torch import load_file

        return load_file(ckpt / "model.safetensors")
    latest = ckpt / "latest"
    tag = latest.read_text().strip() if latest.is_file() else "pytorch_model"
    if not (ckpt / tag).is_dir():
        raise ExportError(f"{ckpt}: neither accelerate's model.safetensors nor a DeepSpeed folder {tag}/ was found; "
                          f"the checkpoint was not written by a metacot trainer")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    shards = sorted(p.name for p in (ckpt / tag).glob("*_model_states.pt"))
    optim = sorted(p.name for p in (ckpt / tag).glob("*_optim_states.pt"))
    if len(optim) != len(shards):  # one model-state and one optimizer-state file per rank
        raise ExportError(f"{ckpt / tag}: {len(shards)} ranks' model states but {len(optim)} optimizer-state shards "
                          f"({', '.join(optim) or 'none'}); a rank's shard is missing, so no complete weights can be "
                          f"rebuilt. Export another checkpoint (--step) or final/; nothing was written")
    with contextlib.redirect_stdout(sys.stderr):  # it reports progress on stdout; keep the CLI's stdout for results
        try:
            return get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=tag)
        except (ValueError, FileNotFoundError) as exc:  # DeepSpeed's own check of the shards it expects
            raise ExportError(f"{ckpt / tag}: the DeepSpeed shards do not form a complete checkpoint ({exc}); export "
                              f"another checkpoint (--step) or final/; nothing was written") from exc


class _SavedState:
    """Stands in for the accelerator in :func:`metacot.final.consolidate`: the state comes from disk."""

    is_main_process = True

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        self.state = state

    def get_state_dict(self, engine: Any) -> dict[str, torch.Tensor]:
        return self.state


def _apply_ema(ckpt: Path, module: torch.nn.Module) -> bool:
    """Copy ``ema.pt`` (the trainer's EMA of the trainable parameters, in their order) into ``module``."""
    import torch

    path = ckpt / "ema.pt"
    if not path.is_file():
        return False
    ema = torch.load(path, weights_only=True)  # a list of tensors: no code is unpickled
    params = [p for p in module.parameters() if p.requires_grad]
    if len(ema) != len(params) or any(e.shape != p.shape for e, p in zip(ema, params, strict=False)):
        raise ExportError(f"{path} holds {len(ema)} tensors that do not match the {len(params)} trainable parameters "
                          f"of the run's generation expert; the checkpoint and config.yaml disagree")
    with torch.no_grad():
        for p, e in zip(params, ema, strict=True):
            p.copy_(e)
    return True


def final_facts(src: RunSource, trainer_state: dict[str, Any], ema: bool) -> dict[str, Any]:
    """The facts the trainers record in ``final/metacot.json`` (same keys), for a checkpoint's rebuilt folder."""
    from metacot.facts import grpo_facts, sft_facts

    if src.stage == "sft":
        return sft_facts(src.cfg, src.step, from_checkpoint=str(src.checkpoint))
    return grpo_facts(src.cfg, src.step, optimizer_steps=trainer_state.get("optimizer_step"), ema=ema,
                      from_checkpoint=str(src.checkpoint))


def final_from_checkpoint(src: RunSource, out: Path) -> Path:
    """Consolidate ``src.checkpoint`` and write a ``final/``-style folder at ``out`` (as the trainer would).

    Raises:
        ExportError: the base model is gone, or the checkpoint does not match the run's config.
    """
    from metacot.final import FROZEN, consolidate, write_final

    assert src.checkpoint is not None
    cfg = src.cfg
    require_base(src.base_model, "to rebuild the model the checkpoint's weights belong to")
    state = read_checkpoint_weights(src.checkpoint)
    trainer_state = json.loads((src.checkpoint / "trainer_state.json").read_text())
    if src.stage == "sft":
        und, gen, prefix = cfg.understanding, cfg.generation, {"vlm": "vlm.", "transformer": "transformer."}
        cwa, carry = cfg.condition_with_adapter, None
    else:
        und, gen, prefix, cwa, carry = FROZEN, cfg.generation, {"transformer": ""}, True, src.base_model
    try:
        parts = consolidate(_SavedState(state), None, str(src.base_model), und, gen, prefix)
    except RuntimeError as exc:
        raise ExportError(f"{src.checkpoint}: {exc}; the checkpoint does not belong to this config.yaml") from exc
    assert parts is not None
    fresh, vlm, transformer = parts
    ema = src.stage == "grpo" and _apply_ema(src.checkpoint, transformer)
    return write_final(out, fresh, vlm, transformer, und=und, gen=gen, condition_with_adapter=cwa,
                       facts=final_facts(src, trainer_state, ema), carry_understanding_from=carry)
