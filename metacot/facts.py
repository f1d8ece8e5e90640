"""The facts a trained model folder records about itself, ``metacot.json``: the one writer and the rules to read them.

Where they live: a run's ``final/`` (beside ``model_index.json``), a ``final/``-style folder that ``metacot export
--step N`` rebuilds from a checkpoint, and an export (under ``final_meta`` of the export's own ``metacot.json``; see
:func:`metacot.understanding.describe_model_folder`, which finds them for every kind of folder).

What they say: the stage (``sft`` / ``grpo``), the base model, the step, how the generator was prompted
(``no_cot``, ``include_instruction``), the area its source latents were encoded at (``source_area``), and, for
Flow-GRPO, the rewards, the judge and the whole Stage 1 facts under ``stage1``. The trainers and the checkpoint
export build them with the same two functions (:func:`sft_facts`, :func:`grpo_facts`), so a checkpoint's export is
prompted exactly as the run's ``final/`` would be; inference reads them only through :func:`prompt_options` and
:func:`source_area`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

FACTS_FILE = "metacot.json"


def read_facts(folder: str | Path) -> dict[str, Any]:
    """The facts of ``folder`` (a run's ``final/``), or {} for a folder without them (a plain pipeline)."""
    path = Path(folder) / FACTS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def write_facts(folder: str | Path, facts: dict[str, Any], *, sort_keys: bool = False) -> None:
    (Path(folder) / FACTS_FILE).write_text(json.dumps(facts, indent=2, sort_keys=sort_keys, default=str) + "\n")


def stage1_facts(facts: dict[str, Any]) -> dict[str, Any]:
    """The Stage 1 facts: the folder's own for an SFT final, those kept under ``stage1`` for a Flow-GRPO one."""
    return facts if facts.get("stage") == "sft" else facts.get("stage1", {})


def prompt_options(facts: dict[str, Any]) -> dict[str, bool]:
    """How the generator was conditioned: ``no_cot`` and ``include_instruction`` of ``build_prompt``.

    Flow-GRPO keeps its Stage 1's (it never changes the prompt format; finals written before it recorded them at the
    top have them only under ``stage1``); a folder without facts (``{}``) gets the defaults: instruction + Meta-CoT.
    """
    defaults = {"no_cot": False, "include_instruction": True}
    return {k: bool(facts.get(k, _upstream(facts).get(k, default))) for k, default in defaults.items()}


def source_area(facts: dict[str, Any]) -> int:
    """The pixel area the generator saw its source latents at in training (``data.source_area``; 0 = the output
    size, also for finals written before the option existed). Inference must encode the source the same way."""
    return int(facts.get("source_area", _upstream(facts).get("source_area", 0)))


def _upstream(facts: dict[str, Any]) -> dict[str, Any]:
    """A Flow-GRPO folder's Stage 1 facts, where older finals kept what they did not record at the top; else {}."""
    return facts.get("stage1", {}) if facts.get("stage") == "grpo" else {}


def sft_facts(cfg: Any, step: int, **extra: Any) -> dict[str, Any]:
    """The facts of a Stage 1 model trained with ``cfg`` (an ``SFTConfig``) to ``step``."""
    return {"stage": "sft", "base_model": str(cfg.model), "step": step, "no_cot": cfg.no_cot,
            "include_instruction": cfg.include_instruction, "source_area": cfg.data.source_area, **extra}


def grpo_facts(cfg: Any, step: int, *, optimizer_steps: Any, ema: bool, **extra: Any) -> dict[str, Any]:
    """The facts of a Flow-GRPO model trained with ``cfg`` (a ``GRPOConfig``) to iteration ``step``: its own, the
    prompt options of the Stage 1 model it started from, and that model's whole facts under ``stage1``."""
    upstream = read_facts(cfg.model)
    facts = {"stage": "grpo", "base_model": str(cfg.model), "step": step, **prompt_options(stage1_facts(upstream)),
             "source_area": cfg.data.source_area, "cot_source": cfg.data.cot_source,
             "optimizer_steps": optimizer_steps, "rewards": dict(cfg.rewards),
             "judge": {"model": cfg.judge.model, "prompt": cfg.judge.prompt}, "ema": ema, **extra}
    if upstream:
        facts["stage1"] = upstream
    return facts
