"""``metacot.json`` facts: one builder for the trainers and the checkpoint export, one reading of the prompt options."""

from __future__ import annotations

import json
from pathlib import Path

from metacot.config import load_config
from metacot.export.source import RunSource, final_facts
from metacot.facts import grpo_facts, prompt_options, read_facts, source_area, write_facts
from metacot.flow_grpo.config import GRPOConfig

NO_COT_STAGE1 = {"stage": "sft", "base_model": "/base", "step": 40, "no_cot": True, "include_instruction": False,
                 "source_area": 4096}


def _grpo_cfg(tmp_path: Path) -> GRPOConfig:
    stage1 = tmp_path / "sft" / "final"
    stage1.mkdir(parents=True)
    write_facts(stage1, NO_COT_STAGE1)
    return load_config(GRPOConfig, "tiny", [f"model={stage1}", f"data.train={tmp_path}/train.jsonl",
                                             f"output_dir={tmp_path}/grpo", "data.source_area=4096"], stage="grpo")


def test_a_grpo_checkpoint_export_is_prompted_as_its_stage1_was(tmp_path: Path) -> None:
    """A Flow-GRPO run on a no-CoT Stage 1 without the instruction: `metacot export --step N` rebuilds the facts of
    the checkpoint, and the export and `metacot edit` must prompt the generator as it was trained (before, the
    rebuilt facts left the prompt options out and inference fell back to instruction + Meta-CoT)."""
    cfg = _grpo_cfg(tmp_path)
    src = RunSource(tmp_path / "grpo", "grpo", cfg, None, tmp_path / "grpo" / "checkpoints" / "step-3", 3)
    rebuilt = final_facts(src, {"optimizer_step": 6}, ema=False)
    assert prompt_options(rebuilt) == {"no_cot": True, "include_instruction": False}
    assert source_area(rebuilt) == 4096 and rebuilt["stage1"] == NO_COT_STAGE1
    # The trainer's final/ and the checkpoint's rebuilt folder say the same, but for where they came from.
    trained = grpo_facts(cfg, 3, optimizer_steps=6, ema=False)
    assert {k: v for k, v in rebuilt.items() if k != "from_checkpoint"} == trained


def test_prompt_options_of_every_kind_of_facts() -> None:
    assert prompt_options({}) == {"no_cot": False, "include_instruction": True}, "a plain pipeline: the defaults"
    assert prompt_options(NO_COT_STAGE1) == {"no_cot": True, "include_instruction": False}
    # A Flow-GRPO final written before it recorded the options at the top: its Stage 1's hold.
    old_grpo = {"stage": "grpo", "step": 2, "stage1": NO_COT_STAGE1}
    assert prompt_options(old_grpo) == {"no_cot": True, "include_instruction": False}
    assert prompt_options({**old_grpo, "no_cot": False}) == {"no_cot": False, "include_instruction": False}


def test_facts_round_trip_and_a_folder_without_them(tmp_path: Path) -> None:
    assert read_facts(tmp_path) == {}
    write_facts(tmp_path, {"stage": "sft", "path": tmp_path})  # paths are written as text
    assert read_facts(tmp_path) == {"stage": "sft", "path": str(tmp_path)}
    assert json.loads((tmp_path / "metacot.json").read_text())["stage"] == "sft"
