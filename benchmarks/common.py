"""Shared pieces of the GPU benchmarks ``benchmarks/sft_step.py`` and ``benchmarks/grpo_iteration.py``.

The benchmarks time metacot's own trainer code (``metacot.sft.trainer.setup`` / ``train_step``,
``metacot.flow_grpo.trainer.setup`` / ``iteration_step``) on real-size tensors. What this module adds:

* the Qwen-Image-Edit generation components built in code, on the GPU, in bf16, with random weights (nothing is
  downloaded): the QwenImage MMDiT from its public config (60 layers, 24 heads x 128, text width 3584), the
  QwenImage VAE (used to decode rollouts) and the flow-matching scheduler config;
* stand-ins for what needs real data or a 7B model: the condition encoder returns random ``[B, 256, 3584]`` hidden
  states, the VAE encoder random packed latents, the dataset fixed records; the stand-ins are installed by
  replacing names in the trainer modules (:func:`patch`), so every other line that runs is the library's;
* FLOP counting as the issue defines MFU: forward = 2 x (matmul weights applied per token, per stream) x tokens
  + 4 x S^2 x d x L for joint attention over S tokens (the matmul part is counted exactly with hooks on every
  ``nn.Linear`` during one forward, LoRA factors included); a training step = 3 x forward; recomputation is not
  counted; the peak is the median of 10 timed 8192^3 bf16 matmuls measured in the same process;
* selective gradient checkpointing (recompute only the first ``k`` MMDiT blocks), timing and result files.

Conventions (fixed by the issue): 512 px edits, 1,024 target + 1,024 source latent tokens (the source image is
encoded at the output size, 512 x 512, as ``metacot.models.sampler`` requires), 256 condition tokens of width 3584.
Left out on purpose: the VLM itself, DeepSpeed (one GPU, plain accelerate), several GPUs.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

# Public config of Qwen/Qwen-Image(-Edit)'s transformer (transformer/config.json).
MMDIT_CONFIG = {"patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": 60, "attention_head_dim": 128,
                "num_attention_heads": 24, "joint_attention_dim": 3584, "guidance_embeds": False,
                "axes_dims_rope": (16, 56, 56)}
# Public scheduler config of Qwen/Qwen-Image(-Edit) (scheduler/scheduler_config.json).
SCHEDULER_CONFIG = {"base_image_seq_len": 256, "base_shift": 0.5, "invert_sigmas": False, "max_image_seq_len": 8192,
                    "max_shift": 0.9, "num_train_timesteps": 1000, "shift": 1.0, "shift_terminal": 0.02,
                    "stochastic_sampling": False, "time_shift_type": "exponential", "use_beta_sigmas": False,
                    "use_dynamic_shifting": True, "use_exponential_sigmas": False, "use_karras_sigmas": False}
# A tiny configuration with the same structure, for a CPU smoke run of the scripts (--tiny).
TINY_MMDIT_CONFIG = {**MMDIT_CONFIG, "in_channels": 16, "out_channels": 4, "num_layers": 2, "attention_head_dim": 16,
                     "num_attention_heads": 2, "joint_attention_dim": 64, "axes_dims_rope": (4, 6, 6)}

RESOLUTION = 512  # pixels per side: 512 / 8 (VAE) / 2 (packing) = 32 -> 1,024 tokens per image
TEXT_TOKENS = 256
ATTENTION = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
MLP = ["img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2"]


# -- components ------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_model(layers: int, device: torch.device, *, tiny: bool = False, vae: bool = True) -> Any:
    """An ``EditingModel`` with a random-weight MMDiT of ``layers`` blocks (bf16 on GPU), VAE and scheduler.

    Built directly on ``device`` in bf16: a float32 copy of the 20 B MMDiT would need 82 GB.
    The VLM and processor are None: the condition encoder is replaced by :func:`patch`.
    """
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImageTransformer2DModel,
    )

    from metacot.models.loading import EditingModel

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = {**(TINY_MMDIT_CONFIG if tiny else MMDIT_CONFIG), "num_layers": layers}
    torch.manual_seed(0)
    with torch.device(device), _default_dtype(dtype):
        transformer = QwenImageTransformer2DModel(**config).eval()
        decoder = None
        if vae:
            # The defaults of AutoencoderKLQwenImage are Qwen-Image's VAE (base_dim 96, z_dim 16).
            vae_kwargs = {"base_dim": 24, "z_dim": 4, "dim_mult": [1, 2, 4], "num_res_blocks": 1,
                          "temperal_downsample": [False, True], "latents_mean": [0.0] * 4,
                          "latents_std": [1.0] * 4} if tiny else {}
            decoder = AutoencoderKLQwenImage(**vae_kwargs).eval().requires_grad_(False)
    channels = config["out_channels"]
    return EditingModel(vlm=None, processor=None, transformer=transformer, vae=decoder,
                        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
                        vae_scale_factor=4 if tiny else 8, latent_channels=channels)


def shapes(model: Any, resolution: int) -> SimpleNamespace:
    """Token counts of one edit at ``resolution``: target/source latent tokens, their width, text tokens/width."""
    grid = resolution // model.vae_scale_factor // 2
    cfg = model.transformer.config
    return SimpleNamespace(image=grid * grid, channels=cfg.in_channels, text=TEXT_TOKENS,
                           text_width=cfg.joint_attention_dim, grid=grid)


def base_transformer(module: Any) -> Any:
    """The diffusers MMDiT inside a DDP, ``Experts`` (SFT) or peft wrapper."""
    from metacot.models.speed import diffusers_transformer

    module = getattr(module, "module", module)  # DDP / DeepSpeed engine
    return diffusers_transformer(getattr(module, "transformer", module))  # metacot.sft.trainer.Experts


@contextlib.contextmanager
def peft_lora_forward(module: torch.nn.Module) -> Iterator[None]:
    """Run LoRA layers through peft's own forward for the block (undoes ``fuse_lora_for_inference`` for a
    comparison or for FLOP counting by hooks on the factor matmuls)."""
    patched = [m for m in module.modules() if hasattr(m, "_metacot_peft_forward")]
    saved = [m.forward for m in patched]
    for m in patched:
        m.forward = m._metacot_peft_forward
    try:
        yield
    finally:
        for m, f in zip(patched, saved):
            m.forward = f


@contextlib.contextmanager
def eager_blocks(module: Any) -> Iterator[None]:
    """The MMDiT blocks run eagerly inside the block; on leaving, each block gets back the compiled state it had on
    entering (so blocks compiled inside are eager again afterwards)."""
    blocks = list(base_transformer(module).transformer_blocks)
    saved = [b._compiled_call_impl for b in blocks]  # set by nn.Module.compile
    for b in blocks:
        b._compiled_call_impl = None
    try:
        yield
    finally:
        for b, c in zip(blocks, saved):
            b._compiled_call_impl = c


def fit_checkpointing(transformer: Any, probe: Callable[[], bool], layers: int, device: torch.device,
                      reserve_gib: float) -> tuple[int | None, list[int]]:
    """The fewest checkpointed blocks (0, L/10, 2L/10, ..., L) for which ``probe()`` (one training step) fits while
    ``reserve_gib`` GiB are held back for what a whole step or iteration adds to the probe (rollout and decode
    buffers, allocator fragmentation); returns that count and the counts that ran out of memory."""
    from metacot.models.speed import set_block_checkpointing

    failed = []
    for k in list(range(0, layers, max(1, layers // 10))) + [layers]:
        set_block_checkpointing(transformer, k)
        held = (torch.empty(int(reserve_gib * 2**30), dtype=torch.uint8, device=device)
                if device.type == "cuda" and reserve_gib > 0 else None)
        ok = probe()
        del held
        reset_memory(device)
        if ok:
            return k, failed
        failed.append(k)
    return None, failed


def lora_to_bf16_with_noise(module: torch.nn.Module, bf16: bool) -> None:
    """Give the LoRA B factors small random values (timing on all-zero weights can be faster than on real data)
    and, when ``bf16``, keep all trainable weights in bf16, as DeepSpeed's bf16 mode does (fp32 master copies live
    in its optimizer; here plain AdamW updates the bf16 weights)."""
    gen = torch.Generator(device="cpu").manual_seed(1)
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        if "lora_B" in name:
            with torch.no_grad():
                p.copy_(1e-3 * torch.randn(p.shape, generator=gen).to(p.device, p.dtype))
        if bf16:
            p.data = p.data.to(torch.bfloat16)


# -- stand-ins for data and encoders ----------------------------------------------------------------------------------

class Stubs:
    """Random tensors in place of the VLM condition encoder and the VAE encoder.

    Args:
        model: the editing model (device, dtype and token widths are read from it).
        resolution: image side in pixels.
        negative_valid: valid tokens of the CFG negative condition (``TEXT_TOKENS`` = same length as the positive,
            so the batched CFG forward needs no padding mask; fewer = a shorter negative prompt, padded by
            ``predict_velocity`` and masked in attention, as real conditions are).
    """

    def __init__(self, model: Any, resolution: int, negative_valid: int = TEXT_TOKENS,
                 source_tokens: int | None = None) -> None:
        self.model, self.sh, self.size = model, shapes(model, resolution), resolution
        self.negative_valid = negative_valid
        self.source_tokens = source_tokens or self.sh.image
        self.gen = torch.Generator(device="cpu").manual_seed(2)

    def _randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=self.gen).to(self.model.device, self.model.dtype)

    def encode_conditions(self, vlm: Any, processor: Any, images: Sequence[Any], prompts: Sequence[str],
                          **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        from metacot.models.conditioning import NEGATIVE_PROMPT

        n = len(prompts)
        length = self.negative_valid if all(p == NEGATIVE_PROMPT for p in prompts) else self.sh.text
        mask = torch.ones((n, length), dtype=torch.bool, device=self.model.device)
        return self._randn(n, length, self.sh.text_width), mask

    def encode_latents(self, model: Any, images: Sequence[Any]) -> torch.Tensor:
        return self._randn(len(images), self.source_tokens, self.sh.channels)


# Public config of Qwen/Qwen2.5-VL-7B-Instruct (config.json): the condition encoder of Qwen-Image-Edit.
VLM_7B_TEXT = {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
               "num_key_value_heads": 4, "vocab_size": 152064, "max_position_embeddings": 128000}
VLM_7B_VISION = {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "out_hidden_size": 3584,
                 "fullatt_block_indexes": [7, 15, 23, 31], "window_size": 112}


def build_vlm_7b(processor_dir: str | Path, device: torch.device, *, tiny: bool = False) -> tuple[Any, Any]:
    """A Qwen2.5-VL-7B-size VLM (random bf16 weights, built on ``device``) and a processor.

    The processor (tokenizer, chat template, image processor) and the special-token ids come from a metacot tiny VLM
    folder (``metacot models tiny`` writes one; ``--vlm-dir``): its vocabulary is small, so token counts of a prompt
    differ from the real tokenizer's; the benchmark reports the condition lengths it got. ``tiny`` keeps the tiny
    sizes (CPU smoke test).
    """
    from transformers import AutoConfig, AutoProcessor, Qwen2_5_VLForConditionalGeneration

    config = AutoConfig.from_pretrained(processor_dir)
    if not tiny:
        for key, value in VLM_7B_TEXT.items():
            setattr(config.text_config, key, value)
        config.text_config.rope_parameters = {**config.text_config.rope_parameters, "mrope_section": [16, 24, 24]}
        config.text_config.layer_types = ["full_attention"] * VLM_7B_TEXT["num_hidden_layers"]
        for key, value in VLM_7B_VISION.items():
            setattr(config.vision_config, key, value)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(4)
    with torch.device(device), _default_dtype(dtype):
        vlm = Qwen2_5_VLForConditionalGeneration(config).eval().requires_grad_(False)
    return vlm, AutoProcessor.from_pretrained(processor_dir)


def source_images(n: int, resolution: int) -> list[Any]:
    """Noise PIL images (the stand-in encoders ignore their content; rewards receive them)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(3)
    return [Image.fromarray(rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)) for _ in range(n)]


@contextlib.contextmanager
def patch(module: Any, **names: Any) -> Iterator[None]:
    """Replace module-level names of a trainer module for the duration of the block."""
    old = {k: getattr(module, k) for k in names}
    for k, v in names.items():
        setattr(module, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(module, k, v)


# -- FLOPs, peak, timing -----------------------------------------------------------------------------------------------

def count_forward_flops(transformer: Any, call: Callable[[], Any], seq_tokens: int) -> dict[str, float]:
    """FLOPs of one forward as the issue counts them, per call of ``call`` (which runs the MMDiT once).

    Matmuls: hooks on every ``nn.Linear`` add 2 x rows x in x out (LoRA factors are Linear modules too).
    Attention: 4 x S^2 x d x L per sequence with S = ``seq_tokens``, d = heads x head dim, L = blocks.
    """
    model = base_transformer(transformer)
    total = {"matmul": 0.0, "sequences": 0}

    def hook(mod: torch.nn.Linear, inputs: tuple[torch.Tensor, ...], _out: Any) -> None:
        rows = inputs[0].numel() // mod.in_features
        total["matmul"] += 2.0 * rows * mod.in_features * mod.out_features

    def count_sequences(_mod: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        total["sequences"] += hidden.shape[0]

    handles = [m.register_forward_hook(hook) for m in transformer.modules() if isinstance(m, torch.nn.Linear)]
    handles.append(model.register_forward_pre_hook(count_sequences, with_kwargs=True))
    try:
        # peft's factored path, so every matmul (LoRA factors included) goes through a hooked nn.Linear; the
        # count is the convention whichever path the timed runs take. Eager blocks: the hooks must run,
        # and must stay out of compiled graphs.
        with torch.no_grad(), peft_lora_forward(transformer), eager_blocks(transformer):
            call()
    finally:
        for h in handles:
            h.remove()
    cfg = model.config
    d = cfg.num_attention_heads * cfg.attention_head_dim
    attention = 4.0 * seq_tokens**2 * d * len(model.transformer_blocks) * total["sequences"]
    return {"matmul": total["matmul"], "attention": attention, "forward": total["matmul"] + attention,
            "sequences": total["sequences"]}


def peak_matmul_tflops(device: torch.device, n: int = 8192, reps: int = 10) -> dict[str, Any]:
    """Median TFLOP/s of ``reps`` timed ``n^3`` bf16 matmuls on random data (after 3 warm-ups)."""
    if device.type != "cuda":
        return {"tflops": float("nan"), "samples": []}
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del a, b
    tflops = [2 * n**3 / t / 1e12 for t in times]
    return {"tflops": statistics.median(tflops), "samples": tflops}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """Wall seconds of ``fn()`` with the device synchronised before and after, and its result."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def memory_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def reset_memory(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def environment(device: torch.device) -> dict[str, Any]:
    """What ran the benchmark: GPU, driver-visible memory, library versions."""
    import diffusers
    import peft

    info = {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "peft": peft.__version__, "device": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    multiprocessors=props.multi_processor_count)
    return info


def write_result(out_dir: str | Path, name: str, payload: dict[str, Any]) -> Path:
    """Write ``payload`` as ``OUT/name.json`` (indented, sorted keys) and return the path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")
    return path


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A plain-text table of ``columns`` of ``rows`` (floats with 3 significant decimals)."""
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return "" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def release(state: Any, device: torch.device) -> None:
    """End a variant's trainer state: close its run, free the accelerator and the GPU memory it held."""
    from metacot.training import release_accelerator

    state.run.close()
    release_accelerator(state.accelerator)
    reset_memory(device)


def run_variants(args: Any, benchmark: str, variants: Sequence[str],
                 run_one: Callable[[torch.device, int, str, float], dict[str, Any]],
                 hidden: Sequence[str]) -> tuple[list[dict[str, Any]], dict[str, Any], Path]:
    """Run ``run_one(device, index, spec, peak_tflops)`` per variant in this process and rewrite ``OUT/name.json``
    after each (``complete`` false until the last), so a run stopped by a time limit keeps what finished.

    Returns the rows, the peak measurement and the result path. ``hidden``: row keys left out of the progress line.
    """
    device = pick_device(args.tiny)
    single_process()
    peak = peak_matmul_tflops(device)
    rows: list[dict[str, Any]] = []
    path = Path(args.out) / f"{args.name}.json"
    for i, spec in enumerate(variants):
        row = run_one(device, i, spec, peak["tflops"])
        rows.append(row)
        print({k: v for k, v in row.items() if k not in hidden}, flush=True)
        path = write_result(args.out, args.name, {
            "benchmark": benchmark, "complete": i == len(variants) - 1, "env": environment(device),
            "peak_bf16_matmul": peak, "args": vars(args),
            "conventions": {"resolution": args.resolution, "target_tokens": 1024, "source_tokens": 1024,
                            "text_tokens": TEXT_TOKENS}, "rows": rows})
    print(f"\npeak bf16 matmul {peak['tflops']:.0f} TFLOP/s; wrote {path}")
    return rows, peak, path


def single_process() -> None:
    """Run the trainers as one plain process: RANK/WORLD_SIZE set and no LOCAL_RANK, so accelerate neither starts
    a process group nor wraps the module in DDP. (``metacot.training.ensure_process_group_env`` would set
    LOCAL_RANK, and accelerate then wraps even one process in DDP, which fails on the second step: the last
    MMDiT block's text-stream output projections get LoRA adapters but no gradient; see benchmarks/NOTES.md.)"""
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")


def pick_device(tiny: bool) -> torch.device:
    """cuda when visible; the CPU only for a --tiny smoke run."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if not tiny:
        raise SystemExit("no CUDA GPU visible: run on the GPU machine, or pass --tiny for a CPU smoke run")
    return torch.device("cpu")


def out_dir_default() -> str:
    """$OUT on the device machine, else benchmarks/results."""
    return os.environ.get("OUT") or str(Path(__file__).resolve().parent / "results")
