"""Stage 2 Flow-GRPO: tune the generation expert on early (high-noise) denoising steps with a CEC reward.

Starting from a Stage 1 ``final/`` folder, the understanding side (the VLM: CoT writer and condition encoder) is
frozen and the QwenImage MMDiT is tuned (LoRA or full) with GRPO on a stochastic version of the flow sampler:

1. ``rollout``: per prompt (source image + instruction + Meta-CoT), ``G`` samples. With ``data.cot_source=model``
   (the default: the method) the frozen understanding expert of the Stage 1 model writes ONE Meta-CoT per prompt,
   shared by the prompt's whole group: greedy, once per prompt and cached (``data.cot_sampling=sample``: rewritten
   every iteration); the fixed evaluation prompts get theirs at setup. The generator is conditioned on the raw
   written text (what a user's model does) and the CEC reward checks the edit against that same CoT; a written CoT
   that does not parse is counted (``cot_unparsed``, ``cot_unparsed_share`` in metrics.jsonl; ``eval_cot_unparsed``
   for the evaluation prompts), never replaced by the dataset's: the VLM judge reads its raw text, the rule judge
   gives it no score (the sample drops out of its group). ``oracle`` conditions on the dataset's Meta-CoT instead.
   A written CoT too long for the condition budget is cut to its longest fitting prefix (``cot_cut``). Every written
   CoT is appended to ``RUN/cots.jsonl``. SDE steps only inside this iteration's window (drawn from the run seed
   and the iteration, shared by every rank and group), ODE elsewhere; rewards of each rollout batch are computed in
   worker threads while the next batch samples (on-policy: training waits until the iteration's rewards are in).
2. ``advantages``: rewards gathered from all ranks, normalised per group (``metacot.flow_grpo.math``); a sample
   without a score drops out of its group; zero-spread groups are counted and carry no gradient.
3. ``train_policy``: clipped-ratio GRPO loss on each window step's log-prob (``metacot.flow_grpo.sde``), optional KL
   to the reference policy on the SDE means (LoRA: adapters disabled; full: a frozen copy of the MMDiT only),
   gradients accumulated over samples and window steps, ``inner_epochs`` passes, optional EMA.
4. ``maybe_evaluate`` on fixed held-out prompts with a measure other than the reward, ``maybe_save_checkpoint``.

Launch: ``metacot grpo --config tiny`` (CPU, in-process DeepSpeed at world size 1); N GPUs: ``accelerate launch
--num_processes N -m metacot.flow_grpo.cli --config FILE``; SLURM with judge nodes: ``metacot launch slurm grpo``.
Left out on purpose: sequence-parallel rollouts, reward models inside the trainer process (judges are servers).
"""

from __future__ import annotations

import copy
import json
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from metacot.cot import parse_lenient, render
from metacot.cot.schema import EditRecord
from metacot.facts import grpo_facts
from metacot.final import FROZEN, consolidate, write_final
from metacot.flow_grpo.config import GRPOConfig
from metacot.flow_grpo.gate import check_calibration_gate
from metacot.flow_grpo.preflight import (
    GRPOInputs,
    check_inputs,
    check_source_area,
    grpo_records,
    reward_specs,
    stage1_prompt_options,
)
from metacot.flow_grpo.math import (
    draw_window,
    ema_update,
    group_advantages,
    grpo_policy_loss,
    kl_to_reference,
)
from metacot.flow_grpo.rollout import (
    Conditions,
    Trajectory,
    decode,
    sample_with_window,
    score_step,
)
from metacot.flow_grpo.sde import default_clip_range
from metacot.jsonl import append_rows
from metacot.models.conditioning import NEGATIVE_PROMPT, build_prompt, encode_conditions
from metacot.models.loading import EditingModel, load_editing_model
from metacot.models.sampler import encode_latents, image_shapes, sigma_schedule, source_shape
from metacot.models.speed import apply_speed_options
from metacot.run import Run, RunLock
from metacot.sft.data import condition_prompt
from metacot.training import (
    StopFlag,
    build_accelerator,
    claim_run_folder,
    epoch_batch_indices,
    load_training_state,
    lr_lambda,
    on_every_rank,
    plot_metrics,
    prepare_expert,
    progress_bar,
    release_accelerator,
    save_checkpoint,
    seed_everything,
    step_generator,
    stop_if_requested,
    trainable_parameters,
)
from metacot.understanding import fit_to_budget, load_understanding, write_cots
from rewards.contract import (
    RewardBatch,
    WeightedReward,
    build_reward,
    build_weighted_reward,
)


@dataclass
class Prompt:
    """One editing prompt of the GRPO data, decoded once."""

    record: EditRecord
    source: Image.Image  # at the output size: rewards, CoT writing and grids see this one
    target: Image.Image | None
    # What the judges check the edit against: a MetaCoT (the record's, or a written one that parsed), the raw text of a
    # written CoT that did not parse, or None (no CoT: no-CoT models).
    cot: Any
    cot_text: str | None  # what the generator is conditioned on (rendered oracle CoT, or the raw written text)
    # The source at the source latent size (data.source_area) when that differs from the output size: what the
    # condition encoder and the VAE see.
    context: Image.Image | None = None
    written: bool = False  # cot / cot_text were written by the understanding expert (cached under greedy decoding)
    cot_cut: bool = False  # the written CoT was cut to fit the condition budget (understanding.fit_to_budget)

    @property
    def conditioning_image(self) -> Image.Image:
        return self.source if self.context is None else self.context


@dataclass
class GRPOState:
    cfg: GRPOConfig
    run: Run
    accelerator: Any
    policy: Any  # the prepared (DeepSpeed) MMDiT, LoRA-wrapped or full
    optimizer: Any
    scheduler: Any
    base: EditingModel
    und: tuple[Any, Any] | None  # the frozen understanding expert (vlm, processor) when it writes the CoTs, else None
    prompts: list[Prompt]
    eval_prompts: list[Prompt]
    reward: WeightedReward
    eval_metric: Any
    reference: Any  # frozen MMDiT copy for the KL under full tuning, else None
    ema: list[torch.Tensor] | None
    device: torch.device
    grad_accum: int
    iteration: int = 0
    optimizer_step: int = 0
    train_seconds: float = 0.0  # summed time_iteration (train.max_seconds)
    unscored_streak: int = 0  # iterations in a row below judge.min_scored_share (not trained on)
    timings: dict[str, float] = field(default_factory=dict)
    eval_cot_stats: dict[str, float] = field(default_factory=dict)  # eval_cot_unparsed(_share) of the eval prompts


# -- setup -----------------------------------------------------------------------------------------------------------

def _load_prompts(source: str | list[EditRecord], base: EditingModel, cfg: GRPOConfig,
                  limit: int | None = None) -> list[Prompt]:
    """Decode the prompts of ``source``: records checked by :func:`check_inputs`, or a JSONL path (checked here)."""
    records = grpo_records(source, cfg, base.processor, limit) if isinstance(source, str) else source
    res = cfg.data.resolution
    src = source_shape(base, res, res, cfg.data.source_area)

    def load(p: Any, size: tuple[int, int] = (res, res)) -> Image.Image | None:
        if p is None:
            return None
        with Image.open(p) as img:
            return img.convert("RGB").resize(size, Image.Resampling.BICUBIC)

    oracle = cfg.data.cot_source == "oracle"
    return [Prompt(r, load(r.source_image), load(r.target_image), r.cot if oracle else None,
                   render(r.cot) if oracle and r.cot is not None else None,
                   load(r.source_image, (src[1], src[0])) if src != (res, res) else None) for r in records]


def writes_cots(cfg: GRPOConfig) -> bool:
    """The understanding expert writes the CoTs: ``cot_source=model`` and a model trained with CoT."""
    return cfg.data.cot_source == "model" and not stage1_prompt_options(cfg.model)["no_cot"]


def write_prompt_cots(state: GRPOState, prompts: list[Prompt], split: str) -> dict[str, float]:
    """Let the frozen understanding expert write the Meta-CoT of ``prompts`` (one each, shared by its group).

    Greedy decoding is deterministic, so a prompt is written once and cached; with ``data.cot_sampling=sample``
    it is rewritten on every call (once per iteration). Returns ``{cot_unparsed, cot_unparsed_share, cot_cut}`` over
    ``prompts`` summed over ranks ({} when the CoTs are not written); newly written CoTs go to ``RUN/cots.jsonl``.
    """
    from accelerate.utils import gather_object

    cfg, acc = state.cfg, state.accelerator
    if state.und is None:
        return {}
    sample = cfg.data.cot_sampling == "sample"
    todo = [p for p in prompts if sample or not p.written]
    vlm, processor = state.und
    include = stage1_prompt_options(cfg.model)["include_instruction"]
    step = cfg.rollout.batch_size
    for start in range(0, len(todo), step):
        chunk = todo[start:start + step]
        written = write_cots(vlm, processor, [p.source for p in chunk], [p.record.instruction for p in chunk],
                             max_new_tokens=cfg.data.max_cot_tokens,
                             temperature=cfg.data.cot_temperature if sample else None,
                             seed=((cfg.train.seed * 1_000_003 + state.iteration) * 1_009 + acc.process_index)
                             * 100_003 + start)
        for p, w in zip(chunk, written):
            # Over the condition budget: the generator (and so the judge) gets the longest prefix that fits.
            text, p.cot_cut = fit_to_budget(state.base.processor, p.record.instruction, w.text,
                                            include_instruction=include)
            p.cot = (parse_lenient(text).cot or text) if p.cot_cut else w.for_judge
            p.cot_text, p.written = text, True
    records = gather_object([{"iteration": state.iteration, "split": split, "id": p.record.id, "text": p.cot_text,
                              "parsed": not isinstance(p.cot, str), "cut": p.cot_cut} for p in todo])
    if acc.is_main_process and records:
        append_rows(state.run.root / "cots.jsonl", records)
    counts = acc.gather(torch.tensor([sum(isinstance(p.cot, str) for p in prompts), sum(p.cot_cut for p in prompts),
                                      len(prompts)], device=state.device).view(1, 3)).sum(0)
    return {"cot_unparsed": int(counts[0]), "cot_unparsed_share": float(counts[0] / max(1, int(counts[2]))),
            "cot_cut": int(counts[1])}


def build_rewards(cfg: GRPOConfig) -> WeightedReward:
    """The weighted training reward; VLM-judge components get the ``judge`` block as constructor options (a served
    judge is contacted here: an unreachable one fails now)."""
    return build_weighted_reward(reward_specs(cfg))


def setup(cfg: GRPOConfig, *, lock: RunLock | None = None, inputs: GRPOInputs | None = None,
          reward: WeightedReward | None = None) -> GRPOState:
    """Load the Stage 1 model, data and rewards; check the gate; wrap the MMDiT; build DeepSpeed; resume.

    ``lock``, ``inputs`` and ``reward`` come from :func:`train`, which takes and checks them before any model loads;
    without them (benchmarks, tests) setup checks its inputs itself.
    """
    seed_everything(cfg.train.seed)  # adapter initialisation draws from the global RNG
    device = cfg.train.resolved_device()
    dtype = torch.bfloat16 if cfg.train.resolved_precision() == "bf16" else torch.float32
    if inputs is None:  # train() ran check_inputs, which checks it
        check_source_area(cfg)
    base = load_editing_model(cfg.model, device=device, dtype=dtype)
    base.vlm.requires_grad_(False)
    base.vae.requires_grad_(False)
    # The Stage-1-trained expert writes the CoTs; it is not the text encoder when a LoRA-tuned VLM conditioned the
    # MMDiT adapter-off (final/understanding/), so it is loaded by the one loader every path shares.
    und = load_understanding(cfg.model, device=device, dtype=dtype, text_encoder=(base.vlm, base.processor)) \
        if writes_cots(cfg) else None
    gate = inputs.gate if inputs else check_calibration_gate(cfg)
    prompts = _load_prompts(inputs.train if inputs else cfg.data.train, base, cfg)
    eval_prompts = _load_prompts(inputs.eval if inputs else cfg.data.eval or cfg.data.train, base, cfg,
                                 limit=cfg.eval.prompts)
    reward = reward if reward is not None else build_rewards(cfg)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_rank = cfg.samples_per_iteration // world
    if cfg.rollout.prompts_per_iteration % world or per_rank % (cfg.policy.micro_batch_size
                                                                * cfg.policy.updates_per_epoch):
        raise ValueError(
            f"rollout.prompts_per_iteration={cfg.rollout.prompts_per_iteration} must be a multiple of the "
            f"{world} processes (a group never spans ranks), and each rank's {per_rank} samples must split into "
            f"policy.updates_per_epoch x policy.micro_batch_size")
    grad_accum = per_rank // (cfg.policy.micro_batch_size * cfg.policy.updates_per_epoch) * cfg.rollout.window_size
    reference = None
    if cfg.policy.kl_beta > 0 and cfg.generation.mode == "full":
        reference = copy.deepcopy(base.transformer).requires_grad_(False).eval()
    policy = prepare_expert(base.transformer, cfg.generation, cfg.generation.lora.target_modules)
    speed = apply_speed_options(policy, cfg.generation)
    optimizer = torch.optim.AdamW(trainable_parameters(policy), lr=cfg.generation.lr,
                                  weight_decay=cfg.generation.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(cfg.train.warmup_steps, cfg.train.max_steps, cfg.train.lr_schedule))
    accelerator = build_accelerator(cfg.train, micro_batch=cfg.policy.micro_batch_size, grad_accum=grad_accum)
    policy, optimizer, scheduler = accelerator.prepare(policy, optimizer, scheduler)
    run = Run(cfg.output_dir, cfg, resume=cfg.train.resume, writer=accelerator.is_main_process, lock=lock)
    if accelerator.is_main_process:
        (run.root / "gate.json").write_text(json.dumps(gate, indent=2))
        if speed:
            (run.root / "speed.json").write_text(json.dumps(speed, indent=2))
    ema = None
    if cfg.policy.ema_decay > 0:
        ema = [p.detach().clone().float() for p in trainable_parameters(accelerator.unwrap_model(policy))]
    state = GRPOState(cfg, run, accelerator, policy, optimizer, scheduler, base, und, prompts, eval_prompts, reward,
                      build_reward(cfg.eval.metric), reference, ema, device, grad_accum)
    # The fixed evaluation prompts get their CoTs once, here (greedy or sampled: the same ones at every evaluation).
    state.eval_cot_stats = {f"eval_{k}": v for k, v in write_prompt_cots(state, eval_prompts, "eval").items()}
    latest = run.latest_checkpoint() if cfg.train.resume else None
    if latest is not None:
        saved = load_training_state(accelerator, latest)
        state.iteration, state.optimizer_step = int(saved["step"]), int(saved["optimizer_step"])
        state.train_seconds = float(saved.get("train_seconds", 0.0))
        state.unscored_streak = int(saved.get("unscored_streak", 0))
        if ema is not None:
            loaded = torch.load(latest / "ema.pt", weights_only=True)
            for dst, src in zip(ema, loaded):
                dst.copy_(src)
        accelerator.print(f"resumed from {latest} at iteration {state.iteration}")
    if cfg.train.wandb_mode != "disabled" and accelerator.is_main_process:
        run.init_wandb(cfg.train.wandb_project, mode=cfg.train.wandb_mode)
    if gate.get("override"):
        run.log(state.iteration, calibration_gate_override=1)
    return state


# -- rollout ---------------------------------------------------------------------------------------------------------

def _conditions(state: GRPOState, prompts: list[Prompt]) -> Conditions:
    """Encode each prompt once (frozen VLM), plus the CFG negative branch and the source latents."""
    base, cfg = state.base, state.cfg
    sources = [p.conditioning_image for p in prompts]
    opts = stage1_prompt_options(cfg.model)
    # No CoT (no-CoT models) or an empty written one: the instruction alone.
    texts = [condition_prompt(p.record.instruction, p.cot_text, **opts) if (p.cot_text or "").strip()
             else build_prompt(p.record.instruction, None) for p in prompts]
    with torch.no_grad():
        embeds, mask = encode_conditions(base.vlm, base.processor, sources, texts)
        neg_embeds = neg_mask = None
        if cfg.rollout.cfg_scale > 1:
            neg_embeds, neg_mask = encode_conditions(base.vlm, base.processor, sources,
                                                     [NEGATIVE_PROMPT] * len(prompts))
        src = source_shape(base, cfg.data.resolution, cfg.data.resolution, cfg.data.source_area)
        latents = encode_latents(base, sources).to(state.device)
    return Conditions(embeds, mask, neg_embeds, neg_mask, latents, src)


def _output_tokens(state: GRPOState) -> int:
    """Latent tokens of one output image (the source's may differ: ``data.source_area``)."""
    _, rows, cols = image_shapes(state.base, state.cfg.data.resolution, state.cfg.data.resolution)
    return rows * cols


def _reward_batch(prompts: list[Prompt], images: list[Image.Image]) -> RewardBatch:
    recs = [p.record for p in prompts]
    return RewardBatch([p.source for p in prompts], images, [r.instruction for r in recs], [p.cot for p in prompts],
                       extras={"ids": [r.id for r in recs], "categories": [r.category for r in recs],
                               "target_images": [p.target for p in prompts],
                               "scene_before": [r.scene_before for r in recs],
                               "scene_after": [r.scene_after for r in recs]})


def rollout(state: GRPOState, pool: ThreadPoolExecutor) -> dict[str, Any]:
    """Sample this rank's groups for the iteration; rewards are computed in ``pool`` as batches finish."""
    cfg, acc = state.cfg, state.accelerator
    r = cfg.rollout
    it = state.iteration
    chosen = epoch_batch_indices(len(state.prompts), r.prompts_per_iteration, it, cfg.train.seed)
    mine = chosen[acc.process_index:: acc.num_processes]  # whole groups per rank
    prompts = [state.prompts[i] for i in mine]
    t_cot = time.perf_counter()
    cot_stats = write_prompt_cots(state, prompts, "train")
    t_cot = time.perf_counter() - t_cot
    cond = _conditions(state, prompts)
    G, n = r.group_size, len(prompts) * r.group_size
    owner = torch.arange(len(prompts), device=state.device).repeat_interleave(G)  # prompt of each sample
    cond = cond.select(owner)
    res = cfg.data.resolution
    seq, channels = _output_tokens(state), cond.image_latents.shape[2]
    sigmas = [float(s) for s in sigma_schedule(state.base, r.num_steps, seq)]
    window = draw_window(r.num_steps, r.window_size, r.window_max, cfg.train.seed, it)
    # Every draw of a group (initial noise, then the SDE noise of each window step) comes from that group's own stream,
    # keyed by its position in the iteration's prompt list: a sample gets the same noise whatever the number of ranks
    # or the rollout batch size, so a run on N ranks repeats the 1-rank run (tests/test_multirank.py).
    x_parts, sde_parts = [], []
    for slot in range(acc.process_index, len(chosen), acc.num_processes):  # the positions of `mine` in `chosen`
        gen = step_generator(cfg.train.seed, it, stream=1 + slot, device="cpu")
        x_parts.append(torch.randn((1 if r.same_initial_noise else G, seq, channels), generator=gen))
        sde_parts.append(torch.randn((len(window), G, seq, channels), generator=gen))
    x_init = torch.cat(x_parts).to(state.device, cond.image_latents.dtype)
    if r.same_initial_noise:
        x_init = x_init[owner]
    sde_noise = torch.cat(sde_parts, dim=1).to(state.device)
    policy = state.accelerator.unwrap_model(state.policy)
    state.policy.eval()  # sampling: no dropout (train_policy switches back); one compiled variant per mode
    trajs: list[Trajectory] = []
    futures: list[Future] = []
    t0 = time.perf_counter()
    for start in range(0, n, r.batch_size):
        idx = torch.arange(start, min(n, start + r.batch_size), device=state.device)
        traj = sample_with_window(state.base, policy, x_init[idx], cond.select(idx), sigmas, window, size=res,
                                  cfg_scale=r.cfg_scale, noise_level=r.noise_level, sde_type=r.sde_type,
                                  noise=sde_noise[:, idx])
        trajs.append(traj)
        images = decode(state.base, traj.final, res, res)
        batch_prompts = [prompts[int(owner[i])] for i in idx.tolist()]
        futures.append(pool.submit(state.reward.score, _reward_batch(batch_prompts, images)))
    state.timings = {"time_rollout": time.perf_counter() - t0, **({"time_cot": t_cot} if cot_stats else {})}
    cat = lambda name: torch.cat([getattr(t, name) for t in trajs], dim=-3 if name == "final" else 1)  # noqa: E731
    # Rewards stay pending ("futures"): collect_rewards waits for them, after work that does not need them.
    return {"cond": cond, "window": window, "sigmas": sigmas, "prompt_ids": torch.tensor(mine)[owner.cpu()],
            "latents": cat("latents"), "next_latents": cat("next_latents"),
            "log_probs": torch.cat([t.log_probs for t in trajs], dim=1), "futures": futures,
            "deadline": time.monotonic() + cfg.reward_timeout_s, "cot_stats": cot_stats}


def collect_rewards(state: GRPOState, ro: dict[str, Any]) -> None:
    """Wait for the rollout's reward futures (bounded by ``reward_timeout_s`` from the end of sampling) and put
    ``rewards`` / ``reward_parts`` into ``ro``; the wait is logged as ``time_reward_wait``."""
    t0 = time.perf_counter()
    totals: list[float | None] = []
    parts: dict[str, list[float | None]] = {}
    for fut in ro.pop("futures"):
        try:
            total, comp = fut.result(timeout=max(0.0, ro["deadline"] - time.monotonic()))
        except TimeoutError as exc:
            raise TimeoutError(f"rewards of iteration {state.iteration} not ready within reward_timeout_s="
                               f"{state.cfg.reward_timeout_s}s; is the judge server alive and fast enough?") from exc
        totals += total
        for k, v in comp.items():
            parts.setdefault(k, []).extend(v)
    ro.update(rewards=totals, reward_parts=parts)
    state.timings["time_reward_wait"] = time.perf_counter() - t0


def compute_advantages(state: GRPOState, ro: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
    """Gather rewards and group ids from all ranks, normalise per group, return this rank's advantages."""
    acc, p = state.accelerator, state.cfg.policy
    rewards = torch.tensor([float("nan") if v is None else v for v in ro["rewards"]], dtype=torch.float64,
                           device=state.device)
    groups = ro["prompt_ids"].to(state.device)
    all_rewards, all_groups = acc.gather(rewards), acc.gather(groups)
    adv, stats = group_advantages(all_rewards, all_groups, std_mode=p.std_mode, clip=p.adv_clip)
    n = rewards.shape[0]
    mine = adv.view(acc.num_processes, n)[acc.process_index]
    scored = all_rewards[~torch.isnan(all_rewards)]
    stats = {**stats, "reward_mean": float(scored.mean()) if scored.numel() else float("nan"),
             "reward_std": float(scored.std()) if scored.numel() > 1 else 0.0,
             "reward_none": int(torch.isnan(all_rewards).sum()),
             "adv_mean": float(adv.mean()), "adv_abs_mean": float(adv.abs().mean()), "adv_max": float(adv.max())}
    for name, values in ro["reward_parts"].items():
        v = torch.tensor([float("nan") if x is None else x for x in values], dtype=torch.float64, device=state.device)
        v = acc.gather(v)
        v = v[~torch.isnan(v)]
        stats[f"reward_{name}_mean"] = float(v.mean()) if v.numel() else float("nan")
        stats[f"reward_{name}_std"] = float(v.std()) if v.numel() > 1 else 0.0
    return mine.to(torch.float32), stats


# -- policy update -----------------------------------------------------------------------------------------------------

def _scores(state: GRPOState, module: Any, ro: dict[str, Any], idx: torch.Tensor, j: int) -> tuple[torch.Tensor, ...]:
    r = state.cfg.rollout
    s, s_next = ro["sigmas"][ro["window"][j]], ro["sigmas"][ro["window"][j] + 1]
    return score_step(state.base, module, ro["latents"][j][idx], ro["next_latents"][j][idx], ro["cond"].select(idx),
                      s, s_next, size=state.cfg.data.resolution, cfg_scale=r.cfg_scale, noise_level=r.noise_level,
                      sde_type=r.sde_type)


def _epoch_order(state: GRPOState, n: int, epoch: int) -> torch.Tensor:
    gen = step_generator(state.cfg.train.seed, state.iteration, stream=10_000 + epoch)
    return torch.randperm(n, generator=gen).to(state.device)


def old_log_probs(state: GRPOState, ro: dict[str, Any]) -> torch.Tensor:
    """The old log-probs [W, n] of the ratio: the rollout's, or (``policy.old_logprob=recompute``) recomputed with
    the training forward. Needs no reward, so it runs while the judge scores the last rollout batch."""
    p = state.cfg.policy
    state.policy.train()  # the rollout sampled in eval mode; the recompute must run what the updates run
    old = ro["log_probs"]
    if p.old_logprob != "recompute":
        return old
    # Same micro-batches, same module, same autograd mode as the first update (kernels may differ between grad and
    # no-grad forwards), so the first inner step's ratio is exactly 1; the graphs are dropped at once.
    old = torch.empty_like(old)
    n, mb = old.shape[1], p.micro_batch_size
    order = _epoch_order(state, n, 0)
    for start in range(0, n, mb):
        idx = order[start:start + mb]
        for j in range(len(ro["window"])):
            old[j, idx] = _scores(state, state.policy, ro, idx, j)[0].detach().to(old.dtype)
    return old


def train_policy(state: GRPOState, ro: dict[str, Any], adv: torch.Tensor,
                 old: torch.Tensor | None = None) -> dict[str, float]:
    """GRPO updates over the iteration's samples against ``old`` log-probs (default: :func:`old_log_probs`);
    returns averaged loss statistics."""
    cfg, acc = state.cfg, state.accelerator
    p, r = cfg.policy, cfg.rollout
    n, W = adv.shape[0], len(ro["window"])
    mb = p.micro_batch_size
    clip = p.clip_range if p.clip_range is not None else default_clip_range(r.sde_type)
    policy = acc.unwrap_model(state.policy)
    if old is None:
        old = old_log_probs(state, ro)
    state.policy.train()
    sums: dict[str, float] = {}
    count = 0
    chunk = n // p.updates_per_epoch
    for epoch in range(p.inner_epochs):
        order = _epoch_order(state, n, epoch)
        for start in range(0, n, mb):
            idx = order[start:start + mb]
            for j in range(W):
                # accumulate(): only every grad_accum-th backward (samples x window steps of one update) is a
                # boundary at which accelerate / DeepSpeed apply the optimizer.
                with acc.accumulate(state.policy):
                    logp, mean, std = _scores(state, state.policy, ro, idx, j)
                    loss, stats = grpo_policy_loss(logp, old[j, idx].to(logp.dtype), adv[idx].to(logp.dtype), clip,
                                                   p.clip_range_high)
                    if p.kl_beta > 0:
                        kl = _kl(state, policy, ro, idx, j, mean, std)
                        loss = loss + p.kl_beta * kl.mean()
                        stats["kl_ref"] = kl.mean().detach()
                    acc.backward(loss)
                stats["loss"] = loss.detach()
                # Sums stay on the device: a float() per micro-step would make the host wait for the GPU each
                # time instead of queueing the next step's kernels (one transfer at the end).
                for k, v in stats.items():
                    v = torch.as_tensor(v, dtype=torch.float64, device=state.device)
                    sums[k] = sums[k] + v if k in sums else v
                count += 1
            if (start + mb) % chunk == 0:
                _optimizer_step(state)
    values = torch.stack(list(sums.values())).cpu().tolist() if sums else []
    out = {k: v / max(1, count) for k, v in zip(sums, values)}
    out["clip_range"] = clip
    return out


def _kl(state: GRPOState, policy: Any, ro: dict[str, Any], idx: torch.Tensor, j: int, mean: torch.Tensor,
        std: torch.Tensor) -> torch.Tensor:
    """KL to the reference policy on the SDE means: adapters disabled (LoRA) or the frozen copy (full)."""
    with torch.no_grad():
        if state.reference is not None:
            ref_mean = _scores(state, state.reference, ro, idx, j)[1]
        else:
            with policy.disable_adapter():
                ref_mean = _scores(state, policy, ro, idx, j)[1]
    return kl_to_reference(mean, ref_mean, std)


def _optimizer_step(state: GRPOState) -> None:
    acc, cfg = state.accelerator, state.cfg
    if acc.distributed_type.name != "DEEPSPEED" and cfg.train.grad_clip > 0:
        acc.clip_grad_norm_(state.policy.parameters(), cfg.train.grad_clip)
    state.optimizer.step()
    state.scheduler.step()
    state.optimizer.zero_grad(set_to_none=True)
    state.optimizer_step += 1
    if state.ema is not None:
        ema_update(state.ema, [t.detach().float() for t in trainable_parameters(acc.unwrap_model(state.policy))],
                   state.cfg.policy.ema_decay)


# -- evaluation, checkpoints, final --------------------------------------------------------------------------------

def _swap_ema(state: GRPOState) -> list[torch.Tensor] | None:
    """Put the EMA weights into the policy; returns the live weights to restore (None without EMA)."""
    if state.ema is None:
        return None
    params = trainable_parameters(state.accelerator.unwrap_model(state.policy))
    live = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, e in zip(params, state.ema):
            p.copy_(e.to(p.dtype))
    return live


def _restore(state: GRPOState, live: list[torch.Tensor] | None) -> None:
    if live is None:
        return
    with torch.no_grad():
        for p, v in zip(trainable_parameters(state.accelerator.unwrap_model(state.policy)), live):
            p.copy_(v)


def evaluate(state: GRPOState) -> dict[str, float]:
    """ODE edits of the fixed held-out prompts (EMA weights if enabled) scored by the eval metric and the reward."""
    cfg = state.cfg
    prompts = state.eval_prompts
    live = _swap_ema(state)
    try:
        policy = state.accelerator.unwrap_model(state.policy)
        state.policy.eval()
        cond = _conditions(state, prompts)
        seq, channels = _output_tokens(state), cond.image_latents.shape[2]
        gen = step_generator(cfg.train.seed, 0, stream=99)  # the same noise at every evaluation
        x = torch.randn((len(prompts), seq, channels), generator=gen).to(state.device)
        sigmas = [float(s) for s in sigma_schedule(state.base, cfg.eval.num_steps, seq)]
        traj = sample_with_window(state.base, policy, x, cond, sigmas, [], size=cfg.data.resolution,
                                  cfg_scale=cfg.rollout.cfg_scale,
                                  noise_level=0.0, sde_type=cfg.rollout.sde_type, generator=gen)
        images = decode(state.base, traj.final, cfg.data.resolution, cfg.data.resolution)
    finally:
        _restore(state, live)
    batch = _reward_batch(prompts, images)
    metric = [v for v in state.eval_metric(batch) if v is not None]
    reward = [v for v in state.reward(batch) if v is not None]
    out = {f"eval_{cfg.eval.metric}": sum(metric) / len(metric) if metric else float("nan"),
           "eval_reward": sum(reward) / len(reward) if reward else float("nan"), **state.eval_cot_stats}
    if state.accelerator.is_main_process:
        _save_grid(state, prompts, images)
    return out


def _save_grid(state: GRPOState, prompts: list[Prompt], images: list[Image.Image]) -> None:
    """report/eval-<iteration>.png: rows of source | edit | ground truth for the first held-out prompts."""
    k = min(8, len(prompts))
    size = state.cfg.data.resolution
    grid = Image.new("RGB", (3 * size, k * size), "white")
    for row in range(k):
        for col, img in enumerate((prompts[row].source, images[row], prompts[row].target)):
            if img is not None:
                grid.paste(img.resize((size, size)), (col * size, row * size))
    grid.save(state.run.report_dir / f"eval-{state.iteration:05d}.png")


def maybe_save_checkpoint(state: GRPOState, force: bool = False) -> Path | None:
    every = state.cfg.train.save_every
    if not force and not (every and state.iteration % every == 0):
        return None
    if (state.run.checkpoints_dir / f"step-{state.iteration}").exists():
        return None
    write_ema = None
    if state.ema is not None:
        write_ema = lambda folder: torch.save([e.cpu() for e in state.ema], folder / "ema.pt")  # noqa: E731
    return save_checkpoint(state.accelerator, state.run, state.iteration,
                           {"optimizer_step": state.optimizer_step, "train_seconds": state.train_seconds,
                            "unscored_streak": state.unscored_streak},
                           state.cfg.train.keep_checkpoints, write_ema)


def save_final(state: GRPOState) -> Path:
    """Consolidate the tuned MMDiT (EMA weights if enabled), merge LoRA, write ``RUN/final/``."""
    cfg, acc = state.cfg, state.accelerator
    live = _swap_ema(state)
    try:
        parts = consolidate(acc, state.policy, cfg.model, FROZEN, cfg.generation, {"transformer": ""})
    finally:
        _restore(state, live)
    if parts is not None:
        fresh, vlm, transformer = parts
        facts = grpo_facts(cfg, state.iteration, optimizer_steps=state.optimizer_step, ema=cfg.policy.ema_decay > 0)
        write_final(state.run.final_dir, fresh, vlm, transformer, und=FROZEN, gen=cfg.generation,
                    condition_with_adapter=True, facts=facts, carry_understanding_from=Path(cfg.model))
    acc.wait_for_everyone()
    return state.run.final_dir


# -- the loop ----------------------------------------------------------------------------------------------------------

def iteration_step(state: GRPOState, pool: ThreadPoolExecutor) -> dict[str, Any]:
    """One GRPO iteration: rollout -> (old log-probs while the rewards come in) -> advantages -> policy updates.
    Returns its metrics."""
    t0 = time.perf_counter()
    ro = rollout(state, pool)
    t1 = time.perf_counter()
    old = old_log_probs(state, ro)  # needs no reward: overlaps the judge's last batch
    t_old = time.perf_counter() - t1
    on_every_rank(f"collecting the rewards of iteration {state.iteration}", lambda: collect_rewards(state, ro),
                  state.device)  # before the rewards are gathered: a judge failure on one rank stops them all
    adv, adv_stats = compute_advantages(state, ro)
    t2 = time.perf_counter()
    share = 1.0 - adv_stats["reward_none"] / state.cfg.samples_per_iteration
    if share < state.cfg.judge.min_scored_share:
        state.unscored_streak += 1  # too little was scored to trust the advantages: no update
        loss_stats: dict[str, Any] = {"unscored_iteration": 1}
    else:
        state.unscored_streak = 0
        loss_stats = train_policy(state, ro, adv, old)
    state.iteration += 1
    state.train_seconds += time.perf_counter() - t0
    return {"optimizer_step": state.optimizer_step, **ro["cot_stats"], **adv_stats, **loss_stats, **state.timings,
            "time_old_logprob": t_old, "time_train": time.perf_counter() - t2 + t_old,
            "time_iteration": time.perf_counter() - t0, "train_seconds": state.train_seconds, "scored_share": share,
            "window_start": ro["window"][0], "window_end": ro["window"][-1],
            "lr": float(state.scheduler.get_last_lr()[-1])}


class UnscoredError(RuntimeError):
    """Too many iterations in a row in which the reward scored too few samples; the run stopped without final/."""


def stop_if_unscored(state: GRPOState, metrics: dict[str, Any], last: bool = False) -> None:
    """Raise :class:`UnscoredError` once ``judge.max_unscored_iterations`` iterations in a row were below
    ``judge.min_scored_share`` (none of them was trained on), or when the ``last`` iteration ends a run that never
    trained (shorter than that streak, but a run that scored nothing all the same)."""
    j = state.cfg.judge
    never_trained = last and state.unscored_streak and state.optimizer_step == 0
    if state.unscored_streak < j.max_unscored_iterations and not never_trained:
        return
    first = state.iteration - state.unscored_streak + 1
    raise UnscoredError(
        f"iterations {first}-{state.iteration}: the reward scored {metrics['scored_share']:.0%} of the last "
        f"iteration's samples, below judge.min_scored_share={j.min_scored_share:g}, {state.unscored_streak} "
        f"iterations in a row (judge.max_unscored_iterations={j.max_unscored_iterations}); none was trained on and "
        f"no final/ was written. A VLM judge whose replies do not parse logs them (try `metacot reward score` on a "
        f"few samples, another judge.mode or prompt); fix it and start the same command again to resume")


def _out_of_time(state: GRPOState) -> bool:
    budget = state.cfg.train.max_seconds
    return bool(budget) and state.train_seconds >= budget


def train(cfg: GRPOConfig) -> Path:
    """Run Stage 2 to ``train.max_steps`` iterations (resuming if possible); returns ``final/``.

    The run folder's lock is taken, and every input checked (:func:`check_inputs`) and the rewards built (a served
    judge is contacted), before any model loads.
    """
    lock = claim_run_folder(cfg.output_dir)
    try:
        inputs = check_inputs(cfg)
        state = setup(cfg, lock=lock, inputs=inputs, reward=build_rewards(cfg))
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    acc = state.accelerator
    bar = progress_bar(cfg.train, acc, state.iteration, "grpo")
    stop = StopFlag()
    pool = ThreadPoolExecutor(max_workers=cfg.reward_workers, thread_name_prefix="reward")
    try:
        if state.iteration == 0:
            # Every rank evaluates (a ZeRO-3 forward is collective); only the main rank writes.
            state.run.log(0, **evaluate(state))
        while state.iteration < cfg.train.max_steps and not _out_of_time(state):
            stop_if_requested(stop, state.run, state.iteration, lambda: maybe_save_checkpoint(state, force=True),
                              state.device)
            metrics = iteration_step(state, pool)
            every = cfg.eval.every
            last = state.iteration == cfg.train.max_steps or _out_of_time(state)
            if (every and state.iteration % every == 0) or last:
                metrics.update(evaluate(state))
            if _out_of_time(state):
                metrics["stopped_by_time"] = 1
            if state.iteration % cfg.train.log_every == 0 or last or "eval_reward" in metrics or \
                    "unscored_iteration" in metrics:
                state.run.log(state.iteration, **metrics)
            stop_if_unscored(state, metrics, last)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}")
            maybe_save_checkpoint(state)
        maybe_save_checkpoint(state, force=True)
        final = save_final(state)
    except BaseException:
        state.run.close()
        pool.shutdown(wait=False, cancel_futures=True)
        release_accelerator(acc)
        raise
    finally:
        if bar is not None:
            bar.close()
    pool.shutdown()
    if acc.is_main_process:
        rows = state.run.read_metrics()
        metric = f"eval_{cfg.eval.metric}"
        plot_metrics(rows, ["reward_mean", "eval_reward", metric, "zero_spread_share", "approx_kl", "clipfrac"],
                     state.run.report_dir / "reward.png", "Stage 2 Flow-GRPO")
        first = next((r for r in rows if metric in r), {})
        last = next((r for r in reversed(rows) if metric in r), {})
        acc.print(f"grpo done: {state.iteration} iterations; {metric} {first.get(metric)} -> {last.get(metric)}; "
                  f"eval_reward {first.get('eval_reward')} -> {last.get('eval_reward')} -> {final}")
    state.run.close()
    release_accelerator(acc)
    return final
