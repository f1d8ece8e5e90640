"""Benchmark: one Stage 1 generation-expert training step (``metacot.sft.trainer.train_step``) on one GPU.

The state comes from ``metacot.sft.trainer.setup`` itself (LoRA wrapping, optimizer, accelerate), with the model
built in code (``benchmarks.common.build_model``: real-size QwenImage MMDiT, random bf16 weights), a frozen
understanding expert, and the two encoders replaced by random tensors of the real shapes (512 px: 1,024 target +
1,024 source tokens, 256 condition tokens of width 3584). Each step runs the library's ``build_inputs``
(``sample_sigmas``, noising, token layout), ``Experts.forward`` (the rectified-flow loss), backward and AdamW.
CFG dropout is set to 0 so every step has the same token count (dropped-image samples would run as a second,
shorter forward).

A variant is ``RANK,CKPT,MICRO``: LoRA rank (alpha = rank), checkpointed MMDiT blocks (``all``, ``none``, a number
of blocks, or ``fit``: the fewest blocks, in steps of a tenth of the depth, whose step fits in memory) and the
micro-batch (batch / micro = gradient accumulation). Usage, on the GPU machine::

    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True python benchmarks/sft_step.py \
        --layers 60 --variant 32,all,4 --variant 32,none,4 --variant 64,all,4 --variant 64,fit,4

``--tiny`` runs the same code on a tiny model on the CPU (a smoke test of the script, no meaningful numbers).
Prints a table last and writes ``OUT/<name>.json`` (``$OUT`` or benchmarks/results). Left out: the joint
understanding loss (the VLM is not built), DeepSpeed (its bf16 mode is emulated: LoRA weights in bf16).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

# benchmarks/ is a folder of scripts, not a package: make its common.py importable from here.
sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

from metacot.models.speed import set_block_checkpointing


def make_config(args: argparse.Namespace, rank: int, ckpt_all: bool, micro: int, out: str) -> Any:
    from metacot.sft.config import CFGDropout, SFTConfig, SFTData
    from metacot.training import ExpertConfig, LoRAConfig, TrainConfig

    targets = common.ATTENTION + (common.MLP if args.mlp else [])
    precision = "bf16" if args.adapters == "fp32-autocast" else "no"
    return SFTConfig(
        model="in-code", output_dir=out,
        # preprocess=False: the benchmark stubs the processor and the encoders (common.Stubs), so there is nothing
        # to cache; the step's own device work is what it times.
        data=SFTData(train="in-code", resolution=args.resolution, understanding_ratio=0.0, preprocess=False),
        train=TrainConfig(max_steps=10_000, deepspeed="none", device="auto", mixed_precision=precision,
                          wandb_mode="disabled", progress=False, resume=False),
        understanding=ExpertConfig(mode="frozen"),
        generation=ExpertConfig(mode="lora", lr=1e-4, lora=LoRAConfig(r=rank, alpha=rank, target_modules=targets),
                                gradient_checkpointing=ckpt_all, compile=args.compile,
                                attention_backend=args.attn),
        batch_size=args.batch, micro_batch_size=micro, und_loss_weight=0.0,
        cfg_dropout=CFGDropout(text=0.0, image=0.0, both=0.0))


def fake_dataset(n: int, resolution: int) -> Any:
    from metacot.sft.data import EditSample, SFTDataset

    images = common.source_images(2, resolution)
    edits = [EditSample(id=f"e{i}", source=images[0], target=images[1], instruction="make it red",
                        cot_text="(cot)", condition_prompt=f"make it red {i}") for i in range(n)]
    return SFTDataset(edits=edits, understanding=[], skipped_overlong=[])


def build_state(args: argparse.Namespace, device: torch.device, rank: int, ckpt: str, micro: int) -> Any:
    """``setup`` of the real trainer with the in-code model, fake data and stub encoders."""
    import metacot.sft.trainer as sft

    model = common.build_model(args.layers, device, tiny=args.tiny, vae=False)
    model.vlm = torch.nn.Linear(1, 1, device=device)  # frozen understanding expert: never called
    model.vae = torch.nn.Identity()  # the VAE encoder is stubbed; setup only freezes it
    stubs = common.Stubs(model, args.resolution)
    cfg = make_config(args, rank, ckpt == "all", micro, tempfile.mkdtemp(prefix="bench-sft-"))
    with common.patch(sft, load_editing_model=lambda *a, **k: model,
                      load_sft_dataset=lambda *a, **k: fake_dataset(16, args.resolution)):
        state = sft.setup(cfg)
    common.lora_to_bf16_with_noise(sft._unwrapped(state).transformer, bf16=args.adapters == "bf16"
                                   and device.type == "cuda")
    return state, stubs


def forward_flops(state: Any, stubs: common.Stubs) -> dict[str, float]:
    """FLOPs of one optimizer step's forwards (``grad_accum`` micro-batches), counted on one micro-batch."""
    import metacot.sft.trainer as sft

    cfg = state.cfg
    edits = state.data.edit_batch(0, cfg.micro_batch_size, cfg.train.seed)
    with common.patch(sft, encode_latents=stubs.encode_latents, encode_conditions=stubs.encode_conditions):
        _, groups, _ = sft.build_inputs(state, edits, [], 0, 0)
    experts = sft._unwrapped(state)
    seq = stubs.sh.image * 2 + stubs.sh.text
    one = common.count_forward_flops(experts.transformer, lambda: experts(None, groups), seq)
    with torch.no_grad():
        nograd = [common.timed(lambda: experts(None, groups), state.device)[0] for _ in range(3)]
    return {**{k: v * state.grad_accum for k, v in one.items()}, "nograd_micro_s": sorted(nograd)[1]}


def try_step(state: Any, stubs: common.Stubs) -> float | None:
    """Seconds of one ``train_step``, or None when it ran out of GPU memory (state cleaned up)."""
    import metacot.sft.trainer as sft

    try:
        with common.patch(sft, encode_latents=stubs.encode_latents, encode_conditions=stubs.encode_conditions):
            return common.timed(lambda: sft.train_step(state), state.device)[0]
    except torch.OutOfMemoryError:
        pass
    state.optimizer.zero_grad(set_to_none=True)
    common.reset_memory(state.device)
    return None


def run_variant(args: argparse.Namespace, device: torch.device, spec: str, peak: float) -> dict[str, Any]:
    rank_s, ckpt, micro_s = spec.split(",")
    rank, micro = int(rank_s), int(micro_s)
    row: dict[str, Any] = {"variant": spec, "rank": rank, "ckpt": ckpt, "micro": micro, "layers": args.layers,
                           "batch": args.batch, "adapters": args.adapters, "compile": args.compile,
                           "attention": args.attn or "default"}
    common.reset_memory(device)
    t0 = time.perf_counter()
    state, stubs = build_state(args, device, rank, ckpt, micro)
    row["setup_s"] = time.perf_counter() - t0
    try:
        if ckpt not in ("all", "fit"):
            set_block_checkpointing(common.base_transformer(state.experts), 0 if ckpt == "none" else int(ckpt))
        row["flops"] = forward_flops(state, stubs)
        if ckpt == "fit":
            k, failed = common.fit_checkpointing(common.base_transformer(state.experts),
                                                 lambda: try_step(state, stubs) is not None, args.layers, device,
                                                 args.fit_reserve_gib)
            row.update(ckpt_blocks=k, ckpt_oom_at=failed)
            if k is None:
                return {**row, "status": "oom"}
        else:
            row["ckpt_blocks"] = args.layers if ckpt == "all" else 0 if ckpt == "none" else int(ckpt)
        t0 = time.perf_counter()  # with --compile the blocks compile in the first (probe or warm-up) step
        common.reset_memory(device)
        times = []
        for i in range(args.warmup + args.steps):
            t = try_step(state, stubs)
            if t is None:
                return {**row, "status": "oom", "oom_at_step": i, "mem_gib": common.memory_gib(device)}
            times.append(t)
        if args.compile:
            row["compile_and_first_steps_s"] = time.perf_counter() - t0
        timed = times[args.warmup:]
        step_s = sorted(timed)[len(timed) // 2]
        fwd = row["flops"]["forward"]
        row.update(status="ok", step_s=step_s, steps_s=timed, warmup_s=times[:args.warmup],
                   mem_gib=common.memory_gib(device), samples_per_s=args.batch / step_s,
                   mfu=3 * fwd / step_s / (peak * 1e12), nograd_mfu=(fwd / state.grad_accum)
                   / row["flops"]["nograd_micro_s"] / (peak * 1e12))
        return row
    finally:
        common.release(state, device)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=60)
    p.add_argument("--variant", action="append", help="RANK,CKPT,MICRO (repeat); default: r32/64 x all/none, micro 4")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--resolution", type=int, default=common.RESOLUTION)
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant (median reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--adapters", choices=["bf16", "fp32-autocast", "fp32"], default="bf16",
                   help="bf16: LoRA weights in bf16 (DeepSpeed bf16); fp32-autocast: peft's fp32 adapters under "
                        "accelerate's bf16 autocast (train.deepspeed=none on GPU); fp32: fp32 adapters, no autocast")
    p.add_argument("--mlp", action="store_true", help="LoRA on the MLPs too (default: attention projections)")
    p.add_argument("--fit-reserve-gib", type=float, default=1.0, help="ckpt=fit: GiB held back while probing")
    p.add_argument("--compile", action="store_true", help="torch.compile each MMDiT block (generation.compile)")
    p.add_argument("--attn", default="", help="diffusers attention backend (generation.attention_backend), "
                                                "e.g. _native_cudnn; default: diffusers' own")
    p.add_argument("--tiny", action="store_true", help="tiny model on CPU: smoke test of the script only")
    p.add_argument("--name", default="sft_step")
    p.add_argument("--out", default=common.out_dir_default())
    args = p.parse_args(argv)
    if args.tiny:
        args.resolution = 64
    variants = args.variant or ["32,all,4", "32,none,4", "64,all,4", "64,none,4"]
    rows, _, _ = common.run_variants(args, "sft_step", variants,
                                     lambda device, _i, spec, peak: run_variant(args, device, spec, peak),
                                     hidden=("steps_s", "warmup_s"))
    print(common.table(rows, ["variant", "status", "ckpt_blocks", "step_s", "samples_per_s", "mfu", "nograd_mfu",
                              "mem_gib"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
