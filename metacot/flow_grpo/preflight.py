"""Stage 2 inputs, checked before any model loads (``metacot grpo`` and ``metacot data check --stage grpo``).

Every check here reads files and configs only (the model folder's processor for token counts, no weights), so a
wrong input fails in seconds, not after the models loaded:

- the reward specs against each reward's real signature (``rewards.NAME.KEY`` typos name the key and the accepted
  ones); VLM-judge components (``cec_vlm``, a dotted path to ``rewards.cec:CECJudge``, or a subclass) get the
  ``judge`` block's settings and need a well-formed ``judge.url`` and, when named, a set ``judge.api_key_env``;
- the calibration gate (:mod:`metacot.flow_grpo.gate`) and ``data.source_area`` against the Stage 1 model's;
- the training and evaluation JSONL: schema and images (``file:line``), no edit records, and with
  ``data.cot_source=oracle`` a Meta-CoT on every record and every condition within the encoder's text budget
  (``file:line`` of each one over it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from metacot.config import ConfigError
from metacot.cot import render
from metacot.cot.schema import DataError, EditRecord, load_records
from metacot.facts import prompt_options, read_facts, source_area
from metacot.flow_grpo.config import GRPOConfig
from metacot.flow_grpo.gate import check_calibration_gate, is_vlm_judge
from rewards.contract import RewardSpecError, check_reward_specs


@dataclass
class GRPOInputs:
    """What the checks read: the edit records of both splits and the gate's record (``gate.json``)."""

    train: list[EditRecord]
    eval: list[EditRecord]
    gate: dict[str, Any]


def check_inputs(cfg: GRPOConfig) -> GRPOInputs:
    """Run every check of the module docstring.

    Raises:
        ConfigError, rewards.contract.RewardSpecError: a config key is wrong (the message names it).
        CalibrationGateError: the VLM judge is not calibrated.
        DataError: a data file is unusable (``file:line`` of each problem).
        ValueError: ``data.source_area`` differs from Stage 1's.
    """
    from metacot.models.loading import load_processor

    check_rewards(cfg)
    gate = check_calibration_gate(cfg)
    check_source_area(cfg)
    processor = load_processor(cfg.model)
    train = grpo_records(cfg.data.train, cfg, processor)
    evaluation = grpo_records(cfg.data.eval or cfg.data.train, cfg, processor, limit=cfg.eval.prompts)
    return GRPOInputs(train, evaluation, gate)


# -- rewards and the judge -------------------------------------------------------------------------------------------

def reward_specs(cfg: GRPOConfig) -> dict[str, dict[str, Any]]:
    """The ``rewards`` config with the ``judge`` block's settings given to every VLM-judge component (options set on
    the component itself win)."""
    judge = cfg.judge
    shared = {"url": judge.url, "model": judge.model or None, "prompt": judge.prompt, "mode": judge.mode,
              "timeout_s": judge.timeout_s, "retries": judge.retries, "api_key_env": judge.api_key_env or None}
    specs = {}
    for name, opts in cfg.rewards.items():
        opts = dict(opts or {})
        specs[name] = {**shared, **opts} if is_vlm_judge(name, opts) else opts
    return specs


def check_rewards(cfg: GRPOConfig) -> None:
    """Reward specs against the real signatures; the judge's URL and key variable for VLM-judge components."""
    specs = reward_specs(cfg)
    try:
        check_reward_specs(specs)
    except RewardSpecError as exc:
        raise ConfigError(str(exc)) from exc
    for name, opts in specs.items():
        if not is_vlm_judge(name, opts):
            continue
        own = dict(cfg.rewards[name] or {})
        key = f"rewards.{name}.url" if "url" in own else "judge.url"
        url = str(opts["url"] or "")
        parsed = urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ConfigError(f"{key}: {url!r} is not an http(s) address, and the reward rewards.{name} is the VLM "
                              f"judge; set {key}=http://HOST:PORT, the server `metacot reward serve` prints")
        env = opts.get("api_key_env")
        if env and not os.environ.get(env):
            key = f"rewards.{name}.api_key_env" if "api_key_env" in own else "judge.api_key_env"
            raise ConfigError(f"{key}: the environment variable {env} is unset; export it with the judge server's "
                              f"key, or set {key}= (empty) for a server without a key")


# -- Stage 1 facts ---------------------------------------------------------------------------------------------------

def stage1_prompt_options(model_dir: str) -> dict[str, bool]:
    """How the Stage 1 model was conditioned (``no_cot``, ``include_instruction`` of its ``metacot.json``), so
    Stage 2 conditions the generator the same way; plain pipeline folders get the defaults."""
    return prompt_options(read_facts(model_dir))


def check_source_area(cfg: GRPOConfig) -> None:
    """Refuse a ``data.source_area`` other than the one Stage 1 trained with (when its final/ records it)."""
    facts = read_facts(cfg.model)
    if not facts:  # a plain pipeline folder: no Stage 1 facts to match
        return
    trained = source_area(facts)
    if trained != cfg.data.source_area:
        raise ValueError(f"data.source_area={cfg.data.source_area}, but the Stage 1 model {cfg.model} was trained with "
                         f"source latents of area {trained}; set data.source_area={trained}")


# -- data --------------------------------------------------------------------------------------------------------------

def grpo_records(path: str, cfg: GRPOConfig, processor: Any, limit: int | None = None) -> list[EditRecord]:
    """The edit records of ``path`` (the first ``limit``), checked for this run.

    Raises:
        DataError: schema or image problems, no edit records, and with ``data.cot_source=oracle`` records without a
            Meta-CoT or over the condition budget; each as ``file:line``.
    """
    from metacot.models.conditioning import DEFAULT_MAX_TEXT_TOKENS, condition_text_token_counts
    from metacot.sft.data import condition_prompt

    # load_records refuses blank and unparsable lines, so record i is on line i + 1.
    edits = [(line, r) for line, r in enumerate(load_records(path, check_images=True), start=1)
             if isinstance(r, EditRecord)][:limit]
    if not edits:
        raise DataError(Path(path), [f"{path}: no edit records; Flow-GRPO needs (source image, instruction) prompts"])
    opts = stage1_prompt_options(cfg.model)
    if cfg.data.cot_source != "oracle":
        return [r for _, r in edits]  # the understanding expert writes the CoTs, cut to the budget as written
    missing = [f"{path}:{line}: {r.id} has no Meta-CoT" for line, r in edits if r.cot is None]
    if missing and not opts["no_cot"]:
        raise DataError(Path(path), missing + ["annotate them (`metacot data annotate`), or set "
                                               "data.cot_source=model to let the understanding expert write them"])
    annotated = [(line, r) for line, r in edits if r.cot is not None]
    prompts = [condition_prompt(r.instruction, render(r.cot), **opts) for _, r in annotated]
    counts = condition_text_token_counts(processor, prompts, with_image=True) if prompts else []
    over = [f"{path}:{line}: {r.id}: its condition (instruction + Meta-CoT) has {n} text tokens, over the encoder's "
            f"budget of {DEFAULT_MAX_TEXT_TOKENS}" for (line, r), n in zip(annotated, counts)
            if n > DEFAULT_MAX_TEXT_TOKENS]
    if over:
        raise DataError(Path(path), over + ["shorten those Meta-CoTs (fewer objects per scene), drop the records, or "
                                            "set data.cot_source=model (written CoTs are cut to fit)"])
    return [r for _, r in edits]
