"""Run fixtures: one tiny Stage 1 SFT run and one tiny Flow-GRPO run on top of it, trained in-process once per session.

For the export, edit, quickstart and eval tests. Both runs use the real trainers through DeepSpeed ZeRO-2 at world
size 1 on the tiny models (``tiny_models``) and the tiny synthetic dataset (``tiny_dataset``):

- ``tiny_sft_run``: 2 steps, batch 4, both experts LoRA (so exports have two adapters to merge or keep),
  checkpoints at steps 1 and 2 kept, ``final/`` = step 2.
- ``tiny_grpo_run``: 2 iterations from ``tiny_sft_run/final`` on the dataset's (oracle) Meta-CoT, groups of 2,
  2 denoising steps, rule-based CEC reward
  plus brightness (the CEC rule scores random tiny edits all alike, and groups without spread teach nothing: the
  brightness term makes the LoRA actually move), checkpoints at iterations 1 and 2, ``final/``, ``gate.json``,
  ``report/reward.png``.
- ``tiny_sft_export``: ``metacot export`` of ``tiny_sft_run`` (merged LoRA, fp32, verified).

Each is built once (a complete ``final/`` or export is reused) and must not be modified by tests: copy it first.
"""

from __future__ import annotations

from pathlib import Path

import pytest

RUN_FAST = ["train.wandb_mode=disabled", "train.progress=false", "train.warmup_steps=0", "train.save_every=1",
            "train.keep_checkpoints=0", "train.max_steps=2"]
SFT_FAST = RUN_FAST + ["batch_size=4", "micro_batch_size=2", "data.understanding_ratio=0.5",
                       "understanding.mode=lora", "generation.mode=lora"]
GRPO_FAST = RUN_FAST + ["rollout.group_size=2", "rollout.prompts_per_iteration=2", "rollout.batch_size=4",
                        "rollout.num_steps=2", "rollout.window_size=1", "rollout.window_max=1", "rollout.cfg_scale=1.0",
                        "policy.micro_batch_size=2", "policy.updates_per_epoch=1", "eval.every=0", "eval.prompts=2",
                        "eval.num_steps=2", "rewards.brightness.weight=1.0",
                        # The GRPO mechanics on the dataset's CoT: a 2-step SFT VLM writes unparsable CoTs, which the
                        # rule judge leaves unscored (tests/test_model_cot.py covers cot_source=model).
                        "data.cot_source=oracle"]


def sft_config(models_pipeline: Path, data: Path, out: Path, *extra: str):
    """The tiny SFT config of the shared run, with extra ``key=value`` overrides."""
    from metacot.config import load_config
    from metacot.sft.config import SFTConfig

    return load_config(SFTConfig, "tiny", [f"model={models_pipeline}", f"data.train={data / 'train.jsonl'}",
                                           f"output_dir={out}", *SFT_FAST, *extra], stage="sft")


@pytest.fixture(scope="session")
def tiny_sft_run(tiny_models, tiny_dataset: Path, session_dir: Path) -> Path:
    """Folder of a finished 2-step tiny SFT run (see the module docstring)."""
    from metacot.run import is_complete
    from metacot.sft.trainer import train

    run = session_dir / "runs" / "sft"
    if not is_complete(run / "final"):
        train(sft_config(Path(tiny_models.pipeline), tiny_dataset, run))
    return run


@pytest.fixture(scope="session")
def tiny_grpo_run(tiny_sft_run: Path, tiny_dataset: Path, session_dir: Path) -> Path:
    """Folder of a finished 2-iteration tiny Flow-GRPO run started from ``tiny_sft_run/final``."""
    from metacot.config import load_config
    from metacot.flow_grpo.config import GRPOConfig
    from metacot.flow_grpo.trainer import train
    from metacot.run import is_complete

    run = session_dir / "runs" / "grpo"
    if not is_complete(run / "final"):
        cfg = load_config(GRPOConfig, "tiny", [
            f"model={tiny_sft_run / 'final'}", f"data.train={tiny_dataset / 'train.jsonl'}",
            f"data.eval={tiny_dataset / 'val.jsonl'}", f"output_dir={run}", *GRPO_FAST], stage="grpo")
        train(cfg)
    return run


@pytest.fixture(scope="session")
def tiny_sft_export(tiny_sft_run: Path, session_dir: Path) -> Path:
    """``metacot export`` of ``tiny_sft_run``: LoRA merged, fp32, checked against the run."""
    from metacot.export.exporter import export_run
    from metacot.run import is_complete

    out = session_dir / "exports" / "sft"
    if not is_complete(out):
        export_run(tiny_sft_run, out, dtype="fp32", check_against_run=tiny_sft_run, say=lambda _: None)
    return out
