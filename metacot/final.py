"""Write a stage's ``final/`` folder: the weights Stage 2, the export and ``metacot edit`` load.

Layout::

    final/                      a diffusers QwenImageEditPipeline folder (LoRA merged), loadable with from_pretrained;
                                its text_encoder is the VLM that conditions the MMDiT
    final/understanding/        only when the understanding expert differs from the text encoder (LoRA-tuned VLM
                                with conditions encoded adapter-off): the merged VLM as a transformers folder
    final/adapters/<expert>/    peft adapter folders of LoRA-tuned experts, over the base recorded in metacot.json
    final/metacot.json          facts for machines: stage, base model, expert modes, prompt format, step

Weights are consolidated with ``accelerator.get_state_dict`` (DeepSpeed ZeRO-3 shards are gathered to the main
rank) and loaded into a fresh CPU float32 copy of the base models carrying the same adapters; adapters are then
saved and merged. The copy costs host memory once at the end of a run, and keeps one code path for every ZeRO stage.
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
from pathlib import Path
from typing import Any

import torch

from metacot.facts import sft_facts, write_facts
from metacot.models.conditioning import build_prompt
from metacot.models.loading import EditingModel, load_editing_model, save_editing_model
from metacot.run import atomic_dir, saving
from metacot.training import ExpertConfig, plain_model_loading, prepare_expert

PROMPT_FORMAT_DOC = build_prompt.__doc__ or ""
FROZEN = ExpertConfig(mode="frozen")


def consolidate(accelerator: Any, engine: Any, base_path: str, und: ExpertConfig, gen: ExpertConfig,
                prefix: dict[str, str]) -> tuple[EditingModel, torch.nn.Module, torch.nn.Module] | None:
    """Full-precision CPU copies of the trained VLM and MMDiT (adapters attached), on the main rank only.

    Args:
        engine: the prepared module whose state dict holds the trained weights.
        prefix: where each expert sits in that state dict, e.g. ``{"vlm": "vlm.", "transformer": "transformer."}``
            for SFT's pair, ``{"transformer": ""}`` when the engine is the MMDiT alone.

    Returns:
        ``(fresh base copy, vlm, transformer)`` on the main process, None on the others.
    """
    state = accelerator.get_state_dict(engine)  # collective under ZeRO-3
    if not accelerator.is_main_process:
        return None
    with plain_model_loading():
        fresh = load_editing_model(base_path, device="cpu", dtype=torch.float32)
    modules = {"vlm": prepare_expert(fresh.vlm, und, und.lora.target_modules),
               "transformer": prepare_expert(fresh.transformer, gen, gen.lora.target_modules)}
    for name, pre in prefix.items():
        part = {k[len(pre):]: v.float().cpu() for k, v in state.items() if k.startswith(pre)}
        missing, unexpected = modules[name].load_state_dict(part, strict=False)
        trainable = {k for k, p in modules[name].named_parameters() if p.requires_grad}
        if unexpected or trainable & set(missing):
            raise RuntimeError(f"consolidated {name} weights do not match the model: missing trained keys "
                               f"{sorted(trainable & set(missing))[:5]}, unexpected {unexpected[:5]}")
    return fresh, modules["vlm"], modules["transformer"]


def _merged(module: torch.nn.Module, cfg: ExpertConfig) -> torch.nn.Module:
    return module.merge_and_unload() if cfg.mode == "lora" else module


def write_final(out: Path, fresh: EditingModel, vlm: torch.nn.Module, transformer: torch.nn.Module, *,
                und: ExpertConfig, gen: ExpertConfig, condition_with_adapter: bool, facts: dict[str, Any],
                carry_understanding_from: Path | None = None) -> Path:
    """Write the folder described in the module docstring from consolidated CPU modules.

    Args:
        carry_understanding_from: an earlier ``final/`` whose separate ``understanding/`` folder is copied over
            (Stage 2 does not touch the understanding expert).
    """
    kept = "the checkpoints are untouched: a restart resumes from the newest and writes final/ again"
    with atomic_dir(out, overwrite=True, meta={"kind": "final", **facts}) as tmp, saving(out, tmp, kept):
        adapters = {}
        for name, module, cfg in (("understanding", vlm, und), ("generation", transformer, gen)):
            if cfg.mode == "lora":
                module.save_pretrained(tmp / "adapters" / name)
                adapters[name] = f"adapters/{name}"
        separate = und.mode == "lora" and not condition_with_adapter
        if separate:
            # Conditions were encoded adapter-off: the text encoder stays the stock VLM (its base weights never
            # trained); the tuned understanding expert is written beside it.
            merged_vlm = copy.deepcopy(vlm).merge_and_unload()
            merged_vlm.save_pretrained(tmp / "understanding", safe_serialization=True)
            fresh.processor.save_pretrained(tmp / "understanding")
            text_encoder = vlm.unload()
        else:
            text_encoder = _merged(vlm, und)
        carried = carry_understanding_from is not None and (carry_understanding_from / "understanding").is_dir()
        if carried:
            shutil.copytree(carry_understanding_from / "understanding", tmp / "understanding")
        pipeline = dataclasses.replace(fresh, vlm=text_encoder, transformer=_merged(transformer, gen))
        save_editing_model(pipeline, tmp, atomic=False)
        meta = {
            **facts,
            "understanding": {"mode": und.mode, "is_text_encoder": not (separate or carried),
                              "path": "understanding" if (separate or carried) else "text_encoder"},
            "generation": {"mode": gen.mode},
            "adapters": adapters,
            "condition_with_adapter": condition_with_adapter,
            "prompt_format": "metacot.models.conditioning.build_prompt",
            "prompt_format_doc": PROMPT_FORMAT_DOC,
        }
        write_facts(tmp, meta)
    return out


def save_final(state: Any) -> Path:
    """Stage 1: consolidate both experts of the prepared pair and write ``RUN/final/``."""
    cfg, acc = state.cfg, state.accelerator
    parts = consolidate(acc, state.experts, cfg.model, cfg.understanding, cfg.generation,
                        {"vlm": "vlm.", "transformer": "transformer."})
    if parts is not None:
        fresh, vlm, transformer = parts
        write_final(state.run.final_dir, fresh, vlm, transformer, und=cfg.understanding, gen=cfg.generation,
                    condition_with_adapter=cfg.condition_with_adapter,
                    facts=sft_facts(cfg, state.step))
    acc.wait_for_everyone()
    return state.run.final_dir
