"""``export_run``: turn a run's final weights or a checkpoint into a folder plain diffusers/transformers users load.

Order of work, all inside one temporary folder that becomes ``--out`` only when everything passed
(:func:`metacot.run.atomic_dir`): refuse bad input early (no complete source, base model gone, output exists, too
little disk) -> rebuild a ``final/`` from the checkpoint if ``--step`` -> write the weights (:mod:`.layout`) -> smoke
test in a fresh process and optional weight comparison (:mod:`.verify`) -> model card and ``metacot.json``
(:mod:`.card`). A failure at any point leaves no export behind, and an old export (``--overwrite``) is replaced only
by a complete, verified one.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metacot.export.card import (
    EXAMPLE_INSTRUCTION,
    collect_facts,
    copy_reports,
    example_prompt,
    render_readme,
)
from metacot.export.layout import DTYPES, check_disk, lora_experts, model_numel, safetensors_numel, write_weights
from metacot.export.source import ExportError, RunSource, final_from_checkpoint, require_base, resolve_source
from metacot.export.verify import SMOKE_STEPS, check_against, smoke_test
from metacot.facts import prompt_options, read_facts, write_facts
from metacot.models.conditioning import NEGATIVE_PROMPT
from metacot.run import atomic_dir, is_complete


@dataclass
class ExportResult:
    out: Path
    facts: dict[str, Any]
    seconds: float


def _say(message: str) -> None:
    print(f"[export] {message}", file=sys.stderr, flush=True)


def _checkpoint_lora_experts(src: RunSource) -> list[str]:
    cfg = src.cfg
    experts = ["generation"] if cfg.generation.mode == "lora" else []
    if src.stage == "sft" and cfg.understanding.mode == "lora":
        experts.append("understanding")
    return sorted(experts)


def estimate_bytes(src: RunSource, final_meta: dict[str, Any] | None, dtype: str) -> int:
    """Bytes the export needs at most on its filesystem, including a rebuilt ``final/`` for ``--step``."""
    itemsize = DTYPES[dtype].itemsize
    if src.final is not None:
        assert final_meta is not None
        numel = model_numel(src.final)
        if not final_meta["understanding"]["is_text_encoder"]:
            numel += safetensors_numel(src.final / final_meta["understanding"]["path"])
        work = 0
    else:
        numel = model_numel(src.base_model) + safetensors_numel(src.base_model / "understanding")
        if src.stage == "sft" and src.cfg.understanding.mode == "lora" and not src.cfg.condition_with_adapter:
            numel += safetensors_numel(src.base_model / "text_encoder")  # written again as a separate expert
        work = numel * 4  # the rebuilt final/ is float32
    return int((numel * itemsize + work) * 1.05) + (64 << 20)


def _preflight(src: RunSource, out: Path, keep_lora: bool,
               overwrite: bool) -> tuple[dict[str, Any] | None, Path | None]:
    """Refuse what cannot work before any heavy step; returns the source's ``metacot.json`` and the LoRA base."""
    if out.exists() and not overwrite:
        raise ExportError(f"{out} already exists; pass --overwrite to replace it (the old export is removed only once "
                          f"the new one is complete and verified) or choose another --out")
    if out.resolve() in (src.run.resolve(), (src.run / "final").resolve()):
        raise ExportError(f"--out {out} would replace the run's own folder; choose a folder outside the run")
    final_meta = read_facts(src.final) if src.final is not None else None
    if src.checkpoint is not None:
        require_base(src.base_model, "to rebuild the model the checkpoint's weights belong to")
    base = None
    if keep_lora:
        experts = lora_experts(final_meta) if final_meta is not None else _checkpoint_lora_experts(src)
        if not experts:
            raise ExportError(f"{src.run} trained no LoRA adapters (all experts full or frozen), so --keep-lora has "
                              f"nothing to keep; use --merge-lora")
        recorded = Path(final_meta["base_model"]) if final_meta is not None else src.base_model
        base = require_base(recorded, "for --keep-lora: the adapters are stored beside the base weights they apply "
                                      "to, which are read from it")
    return final_meta, base


def _reference(check_run: Path, src: RunSource, work_final: Path, work: Path) -> Path:
    """The ``final/``-style folder of ``check_run`` that the export is compared with."""
    if src.checkpoint is None:
        final = check_run / "final"
        if not is_complete(final):
            raise ExportError(f"--check-against {check_run}: it has no complete final/ to compare with")
        return final
    if check_run.resolve() == src.run.resolve():
        return work_final
    other = resolve_source(check_run, src.step)
    return final_from_checkpoint(other, work / "reference")


def export_run(run: str | Path, out: str | Path, *, keep_lora: bool = False, step: int | None = None,
               dtype: str = "bf16", check_against_run: str | Path | None = None, overwrite: bool = False,
               say: Callable[[str], None] = _say) -> ExportResult:
    """Export a run (its ``final/`` or checkpoint ``step``) to ``out``; see the module docstring.

    Args:
        run: the run folder.
        out: the export folder to create.
        keep_lora: keep LoRA experts as peft adapters beside their base weights instead of merging them.
        step: export this complete checkpoint instead of ``final/``.
        dtype: ``"bf16"`` or ``"fp32"`` for the saved weights.
        check_against_run: compare the written weights with this run's (usually the same run).
        overwrite: replace an existing ``out`` (only once the new export is complete and verified).
        say: progress messages.

    Returns:
        The export folder, its facts (as in ``metacot.json``) and the time taken.

    Raises:
        ExportError: bad input (the message says what to do). OSError: too little disk.
        metacot.export.verify.VerificationError: the written export failed its checks (nothing is left behind).
    """
    if dtype not in DTYPES:
        raise ExportError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    start = time.perf_counter()
    src = resolve_source(run, step)
    out = Path(out)
    final_meta, base = _preflight(src, out, keep_lora, overwrite)
    check_disk(out, estimate_bytes(src, final_meta, dtype))
    with atomic_dir(out, overwrite=overwrite, meta={"kind": "metacot_export", "run": str(src.run.resolve()),
                                                    "step": src.step}) as tmp:
        work = tmp / ".work"
        final = src.final
        if final is None:
            say(f"consolidating {src.checkpoint} with DeepSpeed's zero_to_fp32 into the run's base model")
            final = final_from_checkpoint(src, work / "final")
            final_meta = read_facts(final)
        assert final_meta is not None
        say(f"writing pipeline/ and understanding/ ({dtype}, LoRA {'kept' if keep_lora else 'merged'})")
        layout = write_weights(final, final_meta, tmp, keep_lora=keep_lora, dtype=dtype, base=base).to_dict()
        say("reloading in a fresh process without metacot for a 2-step edit")
        options = prompt_options(final_meta)
        smoke = smoke_test(tmp, layout, example_prompt(options), EXAMPLE_INSTRUCTION, NEGATIVE_PROMPT)
        verification: dict[str, Any] = {"smoke": smoke}
        if check_against_run is not None:
            say(f"comparing the written weights with {check_against_run}")
            reference = _reference(Path(check_against_run), src, final, work)
            verification["check_against"] = {"run": str(Path(check_against_run).resolve()),
                                             "folders": check_against(tmp, layout, reference)}
        shutil.rmtree(work, ignore_errors=True)
        facts = {**collect_facts(src, final_meta), "layout": layout, "verification": verification,
                 "verification_steps": SMOKE_STEPS}
        facts["reports"] = copy_reports(facts, tmp)
        write_facts(tmp, facts, sort_keys=True)
        (tmp / "README.md").write_text(render_readme(facts))
    return ExportResult(out, facts, time.perf_counter() - start)
