"""Stage 2 Flow-GRPO configuration (``metacot grpo --config FILE key=value ...``).

Fields are documented where declared; ``__post_init__`` refuses combinations that would silently misbehave.
Presets: ``metacot/configs/grpo_tiny.yaml`` (CPU) and ``grpo_qwen_image_edit.yaml`` (real scale).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING

from metacot.config import check
from metacot.training import ExpertConfig, LoRAConfig, TrainConfig

MMDIT_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


@dataclass
class GRPOData:
    train: str = MISSING  # JSONL of edit records (prompts: source image + instruction [+ Meta-CoT, scenes])
    eval: str = ""  # held-out JSONL for the periodic evaluation ("" = the first eval_prompts of train; discouraged)
    resolution: int = 32  # edits run at resolution x resolution (multiple of 16)
    # Pixel area at which source images are VAE-encoded as the edit context: 0 = the output size (resolution^2);
    # 1048576 = the stock QwenImageEditPipeline (about one megapixel whatever the output size; the real-weights
    # presets use it). Stage 2 must use Stage 1's value (recorded in final/metacot.json).
    source_area: int = 0
    # Whose Meta-CoT conditions the generator and is what the CEC reward checks the edit against:
    # "model" (the method): the frozen understanding expert of `model` writes one CoT per prompt from (source,
    # instruction), shared by the prompt's whole group; "oracle": the record's own (annotated) Meta-CoT, an upper
    # bound that the deployed model never has. "data" is the old name of "oracle" (accepted, with a warning).
    cot_source: str = "model"
    cot_sampling: str = "greedy"  # "greedy": written once per prompt and reused; "sample": rewritten every iteration
    cot_temperature: float = 1.0  # sampling temperature of the CoT when cot_sampling=sample
    max_cot_tokens: int = 384  # generation budget when cot_source=model


@dataclass
class Rollout:
    group_size: int = 8  # G samples per prompt; advantages are normalised within a group
    prompts_per_iteration: int = 4  # prompts per GRPO iteration over all processes
    batch_size: int = 8  # samples per rollout forward (the whole group + both CFG branches run in one batch)
    num_steps: int = 10  # denoising steps of a rollout ("denoising reduction": fewer than at evaluation)
    cfg_scale: float = 4.0  # true CFG scale in rollout and training (1 = off)
    noise_level: float = 1.0  # a: the SDE's noise scale inside the window
    sde_type: str = "sde"  # "sde" (Flow-GRPO) or "cps" (coefficients-preserving)
    same_initial_noise: bool = True  # all samples of a group start from the same x_T
    # Early-step window: `window_size` consecutive SDE steps drawn per iteration within the first `window_max`
    # steps (the high-noise part); ODE steps elsewhere. window_size = window_max = num_steps is plain Flow-GRPO.
    window_size: int = 2
    window_max: int = 4


@dataclass
class Policy:
    micro_batch_size: int = 8  # samples per training forward (each forward covers one window step)
    updates_per_epoch: int = 1  # optimizer steps per inner epoch (the rank's samples split into this many chunks)
    inner_epochs: int = 1  # passes over an iteration's samples
    clip_range: Optional[float] = None  # PPO clip eps (None = metacot.flow_grpo.sde.default_clip_range(sde_type))
    clip_range_high: Optional[float] = None  # asymmetric upper clip (None = symmetric)
    adv_clip: float = 5.0  # advantages clipped to [-adv_clip, adv_clip]
    std_mode: str = "group"  # advantage std: "group" or "batch" (batch-wide)
    kl_beta: float = 0.0  # weight of the KL to the reference policy on the SDE means (0 = off)
    ema_decay: float = 0.0  # EMA of trained weights, used for evaluation and final/ (0 = off)
    # "recompute": old log-probs are recomputed with the training forward before the first update, so the ratio is
    # exactly 1 on the first inner step whatever the rollout batching; "rollout": use the rollout's log-probs.
    old_logprob: str = "recompute"


@dataclass
class JudgeConfig:
    """The served VLM judge (reward ``cec_vlm``) and its calibration gate."""

    url: str = ""  # OpenAI-compatible server, e.g. http://127.0.0.1:8000 (``metacot reward serve``)
    model: str = ""  # served model name ("" = the server's only model; refused when it serves several)
    prompt: str = "cec_v1"  # prompt variant (rewards/prompts/<name>.txt)
    mode: str = "choice"  # score reading: "parse", "choice" (structured outputs) or "logprobs"
    calibration: str = ""  # calibration.json (or its folder) from ``metacot reward calibrate``
    allow_uncalibrated: bool = False  # override the gate; recorded in the run folder (gate.json) and metrics
    # Accept a calibration made against simulated annotators (demos and tiny runs only; real runs need humans).
    allow_simulated_labels: bool = False
    # Bounds of one judge request: each attempt waits timeout_s; a transient failure (no connection, timeout, HTTP
    # 429 / 5xx) is retried `retries` times with backoff, so a judge that never answers fails the run after
    # (retries + 1) x timeout_s plus ~2 s of backoff: about a minute with the defaults.
    timeout_s: float = 20.0
    retries: int = 2
    api_key_env: str = ""  # environment variable holding the judge server's API key ("" = a server without a key)
    # An iteration whose total reward scored fewer than this share of its samples (a judge whose replies do not
    # parse, CoTs the rule judge cannot read) is not trained on; after max_unscored_iterations such iterations in a
    # row the run stops with an error and writes no final/. 0 = train on whatever was scored.
    min_scored_share: float = 0.5
    max_unscored_iterations: int = 2


@dataclass
class EvalConfig:
    every: int = 10  # evaluate every N iterations (0 = only at the end)
    prompts: int = 16  # fixed held-out prompts
    num_steps: int = 20  # full denoising steps (ODE) at evaluation
    metric: str = "target_similarity"  # a measure different from the training reward (exposes reward hacking)


@dataclass
class GRPOConfig:
    model: str = MISSING  # Stage 1 final/ folder (or any QwenImageEditPipeline folder)
    output_dir: str = MISSING
    data: GRPOData = field(default_factory=GRPOData)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=100, warmup_steps=0))
    generation: ExpertConfig = field(default_factory=lambda: ExpertConfig(
        mode="lora", lr=3e-4, weight_decay=1e-4, lora=LoRAConfig(r=32, alpha=64, target_modules=list(MMDIT_LORA_TARGETS))))
    rollout: Rollout = field(default_factory=Rollout)
    policy: Policy = field(default_factory=Policy)
    # name -> {weight: w, fn: built-in name or dotted path (default: name), **constructor kwargs}.
    # Empty = the embedded default, the rule-based CEC judge. (A YAML `rewards:` block replaces this default
    # rather than adding to it; on the command line add components with rewards.NAME.weight=W.)
    rewards: dict[str, Any] = field(default_factory=dict)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    reward_workers: int = 2  # threads computing rewards while later rollout batches still sample
    reward_timeout_s: float = 600.0  # bounded wait for an iteration's rewards, then a clear error

    def __post_init__(self) -> None:
        r, p = self.rollout, self.policy
        check(self.generation.trainable, "generation.mode", "is frozen: Stage 2 trains the generation expert")
        check(self.data.source_area >= 0, "data.source_area", "must be 0 (the output size) or a pixel area")
        check(r.group_size >= 2, "rollout.group_size", "must be >= 2: advantages are relative within a group")
        check(r.sde_type in {"sde", "cps"}, "rollout.sde_type", "use sde or cps")
        check(0 < r.noise_level, "rollout.noise_level", "must be > 0 (0 would make every step deterministic)")
        check(1 <= r.window_size <= r.window_max <= r.num_steps, "rollout.window_size / window_max",
              f"need 1 <= window_size ({r.window_size}) <= window_max ({r.window_max}) <= num_steps ({r.num_steps})")
        check(r.batch_size % r.group_size == 0 or r.group_size % r.batch_size == 0, "rollout.batch_size",
              f"({r.batch_size}) and group_size ({r.group_size}) must divide one another so groups are not split "
              f"unevenly across rollout batches")
        if r.sde_type == "cps":
            check(r.noise_level <= 1, "rollout.noise_level", "must be <= 1 for cps (s = sigma_next * sin(a pi / 2))")
            check(r.window_max < r.num_steps, "rollout.window_max",
                  "must be < num_steps for cps: its last step (sigma_next = 0) is deterministic, with no density")
        check(p.std_mode in {"group", "batch"}, "policy.std_mode", "use group or batch")
        check(p.old_logprob in {"recompute", "rollout"}, "policy.old_logprob", "use recompute or rollout")
        check(p.inner_epochs >= 1 and p.updates_per_epoch >= 1, "policy", "inner_epochs, updates_per_epoch >= 1")
        check(0 <= p.ema_decay < 1, "policy.ema_decay", "must be in [0, 1)")
        check(p.kl_beta >= 0, "policy.kl_beta", "must be >= 0")
        if self.data.cot_source == "data":
            warnings.warn("data.cot_source=data is deprecated: it is now called oracle (the dataset's Meta-CoT); "
                          "running with data.cot_source=oracle", FutureWarning, stacklevel=2)
            self.data.cot_source = "oracle"
        check(self.data.cot_source in {"model", "oracle"}, "data.cot_source",
              "use model (the understanding expert writes the CoT) or oracle (the dataset's CoT)")
        check(self.data.cot_sampling in {"greedy", "sample"}, "data.cot_sampling", "use greedy or sample")
        check(self.data.cot_temperature > 0, "data.cot_temperature", "must be > 0 (use cot_sampling=greedy for 0)")
        check(self.data.max_cot_tokens >= 1, "data.max_cot_tokens", "must be >= 1")
        check(self.data.resolution % 16 == 0, "data.resolution", "must be a multiple of 16")
        j = self.judge
        check(j.mode in {"parse", "choice", "logprobs"}, "judge.mode", "use parse, choice or logprobs")
        check(j.timeout_s > 0, "judge.timeout_s", "must be > 0 seconds (the wait of one request attempt)")
        check(j.retries >= 0, "judge.retries", "must be >= 0 (further attempts after a transient failure)")
        check(0 <= j.min_scored_share <= 1, "judge.min_scored_share", "must be a share in [0, 1]")
        check(j.max_unscored_iterations >= 1, "judge.max_unscored_iterations",
              "must be >= 1 (iterations below judge.min_scored_share in a row before the run stops)")
        if not self.rewards:
            self.rewards = {"cec_rule": {"weight": 1.0}}
        samples = r.group_size * self.rollout.prompts_per_iteration
        check(samples % (p.micro_batch_size * p.updates_per_epoch) == 0, "policy.micro_batch_size",
              f"group_size x prompts_per_iteration = {samples} samples must split into updates_per_epoch "
              f"({p.updates_per_epoch}) chunks of whole micro-batches ({p.micro_batch_size})")

    @property
    def samples_per_iteration(self) -> int:
        return self.rollout.group_size * self.rollout.prompts_per_iteration
