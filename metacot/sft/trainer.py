"""Stage 1 SFT: train the understanding expert and the generation expert on Meta-CoT data.

One VLM (Qwen2.5-VL) is both experts' shared context: as the **understanding expert** it learns to write the
Meta-CoT (next-token loss on the assistant turn only: the CoT given image + instruction, and the answers of the
visual-understanding samples mixed in); as the **condition encoder** its last hidden states over
[source image, instruction + Meta-CoT] condition the QwenImage MMDiT, the **generation expert**, trained with the
rectified-flow loss (velocity target ``noise - x0``) with the source-image latents as edit context.

Why a plain loop and not trl's SFTTrainer: the joint step runs the same VLM twice (LM loss on the CoT, and as the
encoder whose hidden states feed the MMDiT loss) and back-propagates both losses through it in one optimizer
step; SFTTrainer owns a single causal-LM loss and cannot host the second model's loss. The loop is the
open-instruct shape: ``setup`` -> ``train_step`` -> ``maybe_save_checkpoint`` -> ``save_final``.

Launch: ``metacot sft --config tiny`` (CPU, in-process DeepSpeed at world size 1); on N GPUs
``accelerate launch --num_processes N -m metacot.sft.cli --config FILE``; on SLURM ``metacot launch slurm sft``.
Left out on purpose: sequence packing, multi-resolution bucketing (one square resolution per run), EMA (Stage 2 has it).
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from metacot.final import save_final
from metacot.models.conditioning import NEGATIVE_PROMPT, encode_conditions
from metacot.models.loading import EditingModel, load_editing_model
from metacot.models.sampler import (
    encode_latents,
    image_seq_len,
    image_shapes,
    mmdit_velocity,
    resize_sources,
    sampler_shift,
    source_shape,
)
from metacot.models.speed import apply_speed_options
from metacot.run import Run, RunLock
from metacot.sft.config import SFTConfig
from metacot.sft.data import (
    CheckedSFTData,
    EditSample,
    SFTDataset,
    UnderstandingSample,
    check_inputs,
    data_options,
    decode_sft_dataset,
    load_sft_dataset,
)
from metacot.sft.prepare import DROP_FLAGS, collate, lm_batch, prepare_dataset
from metacot.training import (
    StopFlag,
    build_accelerator,
    claim_run_folder,
    load_training_state,
    lr_lambda,
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

DROP_CASES = ("none", "text", "image", "both")


class Experts(torch.nn.Module):
    """The trainable pair as one module, so DeepSpeed shards and checkpoints them together."""

    def __init__(self, vlm: torch.nn.Module, transformer: torch.nn.Module) -> None:
        super().__init__()
        self.vlm = vlm
        self.transformer = transformer

    def forward(self, lm: dict[str, torch.Tensor] | None, gen: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Losses of one micro-batch.

        Args:
            lm: tokenised chat batch with ``labels`` (-100 outside assistant turns), or None.
            gen: groups of generation inputs sharing a token layout (with / without image context); each has
                ``hidden`` [b, N(+N_ctx), C], ``sigma`` [b], ``cond`` [b, L, D], ``mask`` [b, L] | None,
                ``img_shapes``, ``target`` [b, N, C] (velocity), ``n_target`` (N), and optionally ``weight``
                [b, N] (per-token loss weights, :func:`edit_token_weights`).
        """
        out: dict[str, torch.Tensor] = {}
        if lm is not None:
            lm = dict(lm)
            live = lm.pop(LIVE, True)
            loss = self.vlm(**lm).loss
            # A stand-in (see rank_paths) runs the same modules as a real batch and contributes nothing.
            out["loss_und" if live else "loss_und_stand_in"] = loss if live else loss * 0.0
        if gen:
            total, count = 0.0, 0.0
            for g in gen:
                pred = mmdit_velocity(self.transformer, g["hidden"], g["sigma"], g["cond"], g["mask"],
                                      g["img_shapes"], g["n_target"])
                se = (pred.float() - g["target"].float()).pow(2).mean(-1)  # [b, N]
                w = g.get("weight")  # per-sample weighted mean over tokens (edit_region_weight)
                per_sample = se.mean(1) if w is None else (se * w).sum(1) / w.sum(1)
                live = g.get(LIVE)  # [b]: 0 for stand-in rows
                total = total + (per_sample if live is None else per_sample * live).sum()
                count = count + (per_sample.shape[0] if live is None else live.sum())
            out["loss_gen"] = total / count
        return out


# -- pure pieces -------------------------------------------------------------------------------------------------

EDIT_TOKEN_THRESHOLD = 0.1  # mean |target - source| over a token's normalised latent channels to count as edited


def edit_token_weights(target: torch.Tensor, source: torch.Tensor, weight: float) -> torch.Tensor:
    """Per-token loss weights [B, N] of packed latents ``target`` / ``source`` [B, N, C] (same layout): ``1 +
    weight`` on the tokens the edit changes (mean absolute latent difference above :data:`EDIT_TOKEN_THRESHOLD`), 1
    elsewhere. With the tiny VAE at 32 px (16 tokens), an add touches about a quarter of the tokens, a remove or a
    replace about 3/8, and VAE noise leaves untouched tokens below 0.02 (measured on the synthetic test split)."""
    if target.shape != source.shape:
        raise ValueError(f"edit weights need source latents in the target's layout, got {tuple(source.shape)} for "
                         f"{tuple(target.shape)}; train with data.source_area=0")
    changed = (target.float() - source.float()).abs().mean(-1) > EDIT_TOKEN_THRESHOLD
    return 1.0 + weight * changed.float()


def sample_sigmas(n: int, cfg: SFTConfig, gen: torch.Generator, shift: float) -> torch.Tensor:
    """Training noise levels sigma in (0, 1) [n]: logit-normal or uniform, then the shift ``shift`` (> 0)."""
    if cfg.timestep_sampling == "logit_normal":
        sigma = torch.sigmoid(cfg.logit_mean + cfg.logit_std * torch.randn(n, generator=gen))
    else:
        sigma = torch.rand(n, generator=gen)
    sigma = shift * sigma / (1 + (shift - 1) * sigma)
    return sigma.clamp(1e-4, 1 - 1e-4)


def draw_dropout_cases(n: int, cfg: SFTConfig, gen: torch.Generator) -> list[str]:
    """One CFG-dropout case per sample: "none", "text", "image" or "both", with the configured probabilities."""
    u = torch.rand(n, generator=gen).tolist()
    p = cfg.cfg_dropout
    edges = [p.text, p.text + p.image, p.text + p.image + p.both]
    return ["text" if x < edges[0] else "image" if x < edges[1] else "both" if x < edges[2] else "none" for x in u]


LIVE = "live"  # key of the lm batch (bool) and of each generation group ([b] 0/1) marking stand-ins


def micro_paths(n_chats: int, cases: list[str]) -> set[str]:
    """The model calls of one micro-batch: the LM pass ("lm"), the condition encoder's vision tower together with the
    MMDiT on samples that keep the source image ("ctx"), the MMDiT on samples without it ("no_ctx")."""
    paths = {"lm"} if n_chats else set()
    if any(not DROP_FLAGS[c][1] for c in cases):
        paths.add("ctx")
    if any(DROP_FLAGS[c][1] for c in cases):
        paths.add("no_ctx")
    return paths


def rank_paths(state: SFTState, step: int, micro: int, n_und: int) -> set[str]:
    """The union of :func:`micro_paths` over every rank's micro-batch ``micro`` of ``step``.

    Why: ZeRO-3 gathers a module's parameters with a collective whenever a rank enters it, so every rank must run
    the same modules in the same order. CFG dropout is drawn per rank (its stream is the global micro-batch index), so
    one rank may have no sample without the source image, or no chat for the LM loss, while another has; the first
    would skip a call the second makes, and the collectives mismatch (gloo aborts: "Received data size doesn't match
    expected size"). Each rank redraws every rank's dropout cases here (the first draw of their streams, no
    communication), and :func:`build_inputs` adds a zero-weight stand-in for a path that only other ranks take.
    """
    cfg, world, accum = state.cfg, state.accelerator.num_processes, state.grad_accum
    union: set[str] = set()
    for r in range(world):
        n = cfg.micro_batch_size
        und = len(range(r, n_und, world)[micro::accum])
        chats = (0 if cfg.no_cot else n) + und if _lm_loss(cfg) else 0
        cases = draw_dropout_cases(n, cfg, step_generator(cfg.train.seed, step, stream=micro + r * accum)) \
            if _gen_loss(cfg) else []
        union |= micro_paths(chats, cases)
    return union


# -- orchestration ---------------------------------------------------------------------------------------------------

@dataclass
class SFTState:
    cfg: SFTConfig
    run: Run
    accelerator: Any
    experts: Any  # the prepared (DeepSpeed) module
    optimizer: Any
    scheduler: Any
    base: EditingModel  # frozen parts (vae, processor, scheduler) + facts
    data: SFTDataset
    device: torch.device
    grad_accum: int
    sigma_shift: float  # the resolved cfg.timestep_shift (0 = the sampler's shift at the training resolution)
    step: int = 0

    @property
    def source_size(self) -> tuple[int, int]:
        """``(height, width)`` of the source latents: the output size, or ``data.source_area``'s."""
        res = self.cfg.data.resolution
        return source_shape(self.base, res, res, self.cfg.data.source_area)


def setup(cfg: SFTConfig, *, lock: RunLock | None = None, checked: CheckedSFTData | None = None) -> SFTState:
    """Load models and data (validated before any step), wrap with LoRA / freezing, build DeepSpeed, resume.

    ``lock`` and ``checked`` come from :func:`train`, which takes the run folder's lock and checks the data before
    any model loads; without them (benchmarks, tests) the run takes the lock and setup checks the data itself.
    """
    seed_everything(cfg.train.seed)  # adapter initialisation draws from the global RNG
    device = cfg.train.resolved_device()
    dtype = torch.bfloat16 if cfg.train.resolved_precision() == "bf16" else torch.float32
    base = load_editing_model(cfg.model, device=device, dtype=dtype)
    source_resolution = source_shape(base, cfg.data.resolution, cfg.data.resolution, cfg.data.source_area)[0]
    if checked is not None:
        data = decode_sft_dataset(checked, resolution=cfg.data.resolution, source_resolution=source_resolution)
    else:
        data = load_sft_dataset(cfg.data.train, resolution=cfg.data.resolution, source_resolution=source_resolution,
                                **data_options(cfg, base.processor))
    world = int(__import__("os").environ.get("WORLD_SIZE", "1"))
    if cfg.batch_size % (cfg.micro_batch_size * world):
        raise ValueError(
            f"batch_size={cfg.batch_size} is not divisible by micro_batch_size x processes = "
            f"{cfg.micro_batch_size} x {world}; choose batch_size as a multiple of {cfg.micro_batch_size * world}")
    grad_accum = cfg.batch_size // (cfg.micro_batch_size * world)
    vlm = prepare_expert(base.vlm, cfg.understanding, cfg.understanding.lora.target_modules)
    transformer = prepare_expert(base.transformer, cfg.generation, cfg.generation.lora.target_modules)
    if cfg.understanding.gradient_checkpointing and cfg.understanding.trainable:
        vlm.gradient_checkpointing_enable()
    speed = apply_speed_options(transformer, cfg.generation)
    base.vae.requires_grad_(False)
    experts = Experts(vlm, transformer)
    groups = [{"params": trainable_parameters(m), "lr": c.lr, "weight_decay": c.weight_decay}
              for m, c in ((vlm, cfg.understanding), (transformer, cfg.generation)) if c.trainable]
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(cfg.train.warmup_steps, cfg.train.max_steps, cfg.train.lr_schedule))
    accelerator = build_accelerator(cfg.train, micro_batch=cfg.micro_batch_size, grad_accum=grad_accum)
    experts, optimizer, scheduler = accelerator.prepare(experts, optimizer, scheduler)
    run = Run(cfg.output_dir, cfg, resume=cfg.train.resume, writer=accelerator.is_main_process, lock=lock)
    shift = cfg.timestep_shift or sampler_shift(base, image_seq_len(base, cfg.data.resolution, cfg.data.resolution))
    state = SFTState(cfg, run, accelerator, experts, optimizer, scheduler, base, data, device, grad_accum, shift)
    latest = run.latest_checkpoint() if cfg.train.resume else None
    if latest is not None:
        state.step = int(load_training_state(accelerator, latest)["step"])
        accelerator.print(f"resumed from {latest} at step {state.step}")
    if cfg.train.wandb_mode != "disabled" and accelerator.is_main_process:
        run.init_wandb(cfg.train.wandb_project, mode=cfg.train.wandb_mode)
    if data.skipped_overlong:
        run.log(state.step, skipped_overlong=len(data.skipped_overlong))
    if accelerator.is_main_process and speed:
        (run.root / "speed.json").write_text(json.dumps(speed, indent=2))
    if device.type == "cuda":
        # Sequence lengths change every step (CoT and condition lengths vary); cuDNN's attention builds an execution
        # plan per new shape, measured at 50-150 ms of host time per step with the tiny models at batch 64 (more
        # than the GPU work). The flash / memory-efficient kernels need no plan.
        torch.backends.cuda.enable_cudnn_sdp(False)
    if cfg.data.preprocess:
        t0 = time.perf_counter()
        size = prepare_dataset(data, base, source_size=state.source_size, lm=_lm_loss(cfg), gen=_gen_loss(cfg),
                               no_cot=cfg.no_cot)
        accelerator.print(f"preprocessed {len(data.edits)} edits + {len(data.understanding)} understanding samples "
                          f"in {time.perf_counter() - t0:.1f}s ({size / 2**20:.0f} MiB cached)")
    return state


def _lm_loss(cfg: SFTConfig) -> bool:
    return cfg.understanding.trainable and cfg.und_loss_weight > 0


def _gen_loss(cfg: SFTConfig) -> bool:
    """Whether the flow-matching loss runs: something it trains is trainable, and its weight is not 0."""
    return (cfg.generation.trainable or (cfg.understanding.trainable and cfg.train_vlm_through_conditions)) \
        and cfg.gen_loss_weight != 0


def _unwrapped(state: SFTState) -> Experts:
    return state.accelerator.unwrap_model(state.experts)


def build_inputs(state: SFTState, edits: list[EditSample], und: list[UnderstandingSample], step: int,
                 micro: int, paths: set[str] | None = None,
                 ) -> tuple[dict[str, Any] | None, list[dict[str, Any]], dict[str, int]]:
    """Tokenise, encode latents and conditions, draw noise / sigma / dropout for one micro-batch.

    With ``data.preprocess`` the tokens, image patches and latents come from each sample's ``prepared`` cache
    (``metacot.sft.prepare``) and are only collated here; the batch is the same either way. ``paths``
    (:func:`rank_paths`, several ranks): model calls some rank makes for this micro-batch; one this rank would not
    make gets a zero-weight stand-in (a copy of its first sample), so every rank runs the same modules.
    """
    cfg, base, dev = state.cfg, state.base, state.device
    experts = _unwrapped(state)
    cached = cfg.data.preprocess
    tok = base.processor.tokenizer if cached else None  # uncached: the benchmarks stub the processor
    lm = None
    if _lm_loss(cfg):
        chats = [s for s in edits if not cfg.no_cot] + list(und)
        live = bool(chats)
        if not chats and paths is not None and "lm" in paths:  # only without CoT: then edits bring no chats
            chats = state.data.understanding[:1]
        if chats and cached:
            lm = {k: v.to(dev) for k, v in collate([s.prepared.lm for s in chats], tok.pad_token_id).items()}
        elif chats:
            lm = lm_batch(base.processor, [(s.source, s.instruction, s.cot_text) if isinstance(s, EditSample)
                                           else (s.image, s.question, s.answer) for s in chats], dev)
        if lm is not None and not live:
            lm[LIVE] = False
    stand_ins = int(lm is not None and not lm.get(LIVE, True))
    if not _gen_loss(cfg):
        return lm, [], {"stand_ins": stand_ins}
    gen = step_generator(cfg.train.seed, step, stream=micro)
    n = len(edits)
    cases = draw_dropout_cases(n, cfg, gen)
    sigma = sample_sigmas(n, cfg, gen, state.sigma_shift)
    counts = {f"drop_{c}": sum(1 for x in cases if x == c) for c in DROP_CASES}
    # Stand-ins: sample 0 again, with the image kept ("none") or left out ("image"), at zero loss weight.
    have = micro_paths(0, cases)
    extra = [c for p, c in (("ctx", "none"), ("no_ctx", "image")) if paths and p in paths and p not in have]
    rows, cases = list(range(n)) + [0] * len(extra), cases + extra
    counts["stand_ins"] = stand_ins + len(extra)
    src = state.source_size
    contexts = [edits[i].conditioning_image for i in rows]  # at the source latent size
    inputs = None
    if cached:
        x0 = torch.stack([s.prepared.target for s in edits]).to(dev)
        ctx = torch.stack([s.prepared.context for s in edits]).to(dev)
        inputs = collate([edits[i].prepared.cond[c] for i, c in zip(rows, cases)], tok.pad_token_id,
                         tok.padding_side)
    else:
        with torch.no_grad():
            x0 = encode_latents(base, [s.target for s in edits]).to(dev)
            if any(img.size != (src[1], src[0]) for img in contexts):
                contexts = resize_sources(base, contexts, *src)
            ctx = encode_latents(base, contexts[:n]).to(dev)
    noise = torch.randn(x0.shape, generator=gen).to(dev, x0.dtype)
    sig = sigma.to(dev, x0.dtype).view(-1, 1, 1)
    x_t = (1 - sig) * x0 + sig * noise
    velocity = noise - x0
    weights = edit_token_weights(x0, ctx, cfg.edit_region_weight) if cfg.edit_region_weight > 0 else None
    if extra:
        r = torch.tensor(rows, device=dev)
        x_t, velocity, ctx, sigma = x_t[r], velocity[r], ctx[r], sigma[rows]
        weights = None if weights is None else weights[r]
    live = torch.tensor([1.0] * n + [0.0] * len(extra), device=dev) if extra else None
    prompts = [NEGATIVE_PROMPT if DROP_FLAGS[c][0] else edits[i].condition_prompt for i, c in zip(rows, cases)]
    drop_image = [DROP_FLAGS[c][1] for c in cases]
    encoder = experts.vlm
    grad_ok = cfg.understanding.trainable and cfg.train_vlm_through_conditions and cfg.condition_with_adapter
    adapter_off = cfg.understanding.mode == "lora" and not cfg.condition_with_adapter
    ctx_mgr = encoder.disable_adapter() if adapter_off else contextlib.nullcontext()
    with ctx_mgr, (contextlib.nullcontext() if grad_ok else torch.no_grad()):
        cond, mask = encode_conditions(encoder, base.processor, contexts, prompts, drop_image=drop_image,
                                       inputs=inputs)
    shape = image_shapes(base, cfg.data.resolution, cfg.data.resolution)
    src_shape = image_shapes(base, *src)
    groups = []
    for with_ctx in (True, False):
        idx = [i for i in range(len(rows)) if drop_image[i] != with_ctx]
        if not idx:
            continue
        ix = torch.tensor(idx, device=dev)
        hidden = torch.cat([x_t[ix], ctx[ix]], dim=1) if with_ctx else x_t[ix]
        m = None if mask is None else mask[ix]
        groups.append({"hidden": hidden, "sigma": sigma.to(dev, x0.dtype)[ix], "cond": cond[ix],
                       "mask": None if m is None or bool(m.all()) else m,
                       "img_shapes": [[shape, src_shape] if with_ctx else [shape]] * len(idx),
                       "target": velocity[ix], "n_target": x0.shape[1],
                       "weight": None if weights is None else weights[ix],
                       LIVE: None if live is None else live[ix]})
    return lm, groups, counts


def train_step(state: SFTState) -> dict[str, float]:
    """One optimizer step over ``grad_accum`` micro-batches; returns its metrics."""
    cfg, acc = state.cfg, state.accelerator
    rank, world = acc.process_index, acc.num_processes
    per_rank = cfg.batch_size // world
    edits_all = state.data.edit_batch(state.step, cfg.batch_size, cfg.train.seed)
    edits = edits_all[rank * per_rank: (rank + 1) * per_rank]
    n_und = round(cfg.data.understanding_ratio * cfg.batch_size) if cfg.understanding.trainable else 0
    und_all = state.data.understanding_batch(state.step, n_und, cfg.train.seed)
    und = und_all[rank::world]
    sums: dict[str, float] = {}
    state.experts.train()
    for micro in range(state.grad_accum):
        mb = edits[micro * cfg.micro_batch_size: (micro + 1) * cfg.micro_batch_size]
        ub = und[micro::state.grad_accum]
        paths = rank_paths(state, state.step, micro, len(und_all)) if world > 1 else None
        lm, groups, counts = build_inputs(state, mb, ub, state.step, micro + rank * state.grad_accum, paths)
        # accumulate(): accelerate (and through it DeepSpeed) treats only every grad_accum-th backward as a
        # gradient-accumulation boundary; without it every micro-batch would take an optimizer step.
        with acc.accumulate(state.experts):
            losses = state.experts(lm, groups)
            loss = sum(w * losses[k] for k, w in (("loss_und", cfg.und_loss_weight), ("loss_und_stand_in", 1.0),
                                                  ("loss_gen", cfg.gen_loss_weight)) if k in losses)
            acc.backward(loss)
        losses.pop("loss_und_stand_in", None)
        for k, v in {**{k: float(v.detach()) for k, v in losses.items()}, "loss": float(loss.detach()),
                     **counts}.items():
            sums[k] = sums.get(k, 0.0) + v
    if acc.distributed_type.name != "DEEPSPEED" and cfg.train.grad_clip > 0:
        acc.clip_grad_norm_(state.experts.parameters(), cfg.train.grad_clip)  # DeepSpeed clips from its config
    state.optimizer.step()
    state.scheduler.step()
    state.optimizer.zero_grad(set_to_none=True)
    state.step += 1
    metrics = {k: (v if k in COUNT_METRICS else v / state.grad_accum) for k, v in sums.items()}
    if world > 1:
        metrics = reduce_metrics(acc, metrics, state.device)
    metrics["lr"] = float(state.scheduler.get_last_lr()[-1])
    return metrics


STEP_METRICS = ("loss", "loss_und", "loss_gen", *(f"drop_{c}" for c in DROP_CASES), "stand_ins")
COUNT_METRICS = frozenset(STEP_METRICS[3:])  # summed over micro-batches and ranks; the losses are averaged


def reduce_metrics(acc: Any, metrics: dict[str, float], device: torch.device) -> dict[str, float]:
    """A step's metrics over all ranks (one collective): losses averaged over the ranks that have them, counts
    summed. Without it a multi-rank run would log rank 0's share of the batch only."""
    keys = list(STEP_METRICS)
    local = torch.tensor([[metrics.get(k, 0.0), float(k in metrics)] for k in keys], dtype=torch.float64,
                         device=device)
    total = acc.reduce(local, reduction="sum").tolist()
    return {k: (v if k in COUNT_METRICS else v / n) for k, (v, n) in zip(keys, total) if n}


def maybe_save_checkpoint(state: SFTState, force: bool = False) -> Path | None:
    """Save resumable state every ``save_every`` steps, and when forced (end of run, stop signal)."""
    every = state.cfg.train.save_every
    if not force and not (every and state.step % every == 0):
        return None
    if (state.run.checkpoints_dir / f"step-{state.step}").exists():
        return None  # already saved at this step (e.g. save_every hit the last step)
    return save_checkpoint(state.accelerator, state.run, state.step, {}, state.cfg.train.keep_checkpoints)


def train(cfg: SFTConfig) -> Path:
    """Run Stage 1 to ``train.max_steps`` (resuming if a checkpoint exists); returns the ``final/`` folder.

    The run folder's lock is taken and the data checked (:func:`metacot.sft.data.check_inputs`) before any model
    loads.
    """
    lock = claim_run_folder(cfg.output_dir)
    try:
        state = setup(cfg, lock=lock, checked=check_inputs(cfg))
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    acc = state.accelerator
    bar = progress_bar(cfg.train, acc, state.step, "sft")
    t0, first = time.perf_counter(), state.step
    stop = StopFlag()
    try:
        while state.step < cfg.train.max_steps:
            stop_if_requested(stop, state.run, state.step, lambda: maybe_save_checkpoint(state, force=True),
                              state.device)
            metrics = train_step(state)
            if acc.is_main_process and (state.step % cfg.train.log_every == 0 or state.step == cfg.train.max_steps):
                state.run.log(state.step, **metrics, samples_per_s=(state.step - first) * cfg.batch_size
                              / max(1e-9, time.perf_counter() - t0))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}")
            maybe_save_checkpoint(state)
        maybe_save_checkpoint(state, force=True)
        final = save_final(state)
    except BaseException:  # preempted or failed: free DeepSpeed/accelerate state so the process can run again
        state.run.close()
        release_accelerator(acc)
        raise
    finally:
        if bar is not None:
            bar.close()
    if acc.is_main_process:
        rows = state.run.read_metrics()
        plot_metrics(rows, ["loss", "loss_und", "loss_gen", "lr"], state.run.report_dir / "loss.png", "Stage 1 SFT")
        summary = {k: rows[-1].get(k) for k in ("loss", "loss_und", "loss_gen")} if rows else {}
        acc.print(f"sft done: {state.step} steps, final {json.dumps(summary)} -> {final}")
    state.run.close()
    release_accelerator(acc)
    return final
