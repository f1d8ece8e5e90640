"""Load and save the editing model (VLM + MMDiT + VAE + scheduler) as a plain diffusers pipeline folder.

One folder layout for everything: the tiny model from :mod:`metacot.models.tiny`, the real Qwen-Image-Edit, and a
training run's ``final/``. It is the ``QwenImageEditPipeline`` layout (``model_index.json``, ``text_encoder/``,
``tokenizer/``, ``processor/``, ``transformer/``, ``vae/``, ``scheduler/``), so whatever metacot saves loads with
``diffusers.DiffusionPipeline.from_pretrained`` and whatever diffusers saves loads here. Each component is loaded with
``from_pretrained`` on its subfolder; ``text_encoder/`` + ``processor/`` are also a complete transformers VLM.

Left out: LoRA adapters (merge them into the model before :func:`save_editing_model`), quantisation, device maps and
offloading (a 20 B model is placed by the caller, e.g. the trainer's DeepSpeed setup).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from metacot.run import atomic_dir

COMPONENTS = ("text_encoder", "tokenizer", "processor", "transformer", "vae", "scheduler")


class ModelFolderError(FileNotFoundError):
    """A model folder is missing a file or component; the message names it and how to get a complete folder."""


@dataclasses.dataclass
class EditingModel:
    """The parts of a Qwen-Image-Edit style editing model, plus the facts the sampler needs.

    Attributes:
        vlm: Qwen2.5-VL (``...ForConditionalGeneration``): writes the Meta-CoT and encodes the condition.
        processor: the VLM's processor (tokenizer + image processor + chat template).
        transformer: the ``QwenImageTransformer2DModel`` (MMDiT) that predicts the flow velocity.
        vae: ``AutoencoderKLQwenImage``.
        scheduler: ``FlowMatchEulerDiscreteScheduler`` (its config defines the sigma shift; the sampler copies it).
        vae_scale_factor: pixels per latent cell (8 on the real model, 4 on the tiny one).
        latent_channels: VAE latent channels (16 real, 4 tiny); packed latents have 4x as many per token.
    """

    vlm: Any
    processor: Any
    transformer: Any
    vae: Any
    scheduler: Any
    vae_scale_factor: int
    latent_channels: int

    @property
    def tokenizer(self) -> Any:
        """The VLM tokenizer (the processor's)."""
        return self.processor.tokenizer

    @property
    def device(self) -> torch.device:
        """Device of the transformer's weights."""
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the transformer's weights."""
        return next(self.transformer.parameters()).dtype

    @property
    def pixel_multiple(self) -> int:
        """Image sides must be multiples of this: VAE downsampling times the 2x2 latent packing."""
        return self.vae_scale_factor * 2


def check_model_folder(path: str | Path) -> Path:
    """Check that ``path`` is a complete editing-model folder; return it as a Path.

    Raises:
        ModelFolderError: naming the missing ``model_index.json`` or component folder/config.
    """
    path = Path(path)
    fix = (
        "a complete folder comes from `metacot models tiny --out DIR` (DIR/pipeline), a run's final/, or a download "
        "of Qwen/Qwen-Image-Edit"
    )
    if not (path / "model_index.json").is_file():
        raise ModelFolderError(f"{path}: no model_index.json, so this is not a diffusers pipeline folder; {fix}")
    index = json.loads((path / "model_index.json").read_text())
    for name in COMPONENTS:
        if name not in index or not (path / name).is_dir():
            raise ModelFolderError(f"{path}: component '{name}' is missing (no folder {path / name}); {fix}")
    for name, marker in (("text_encoder", "config.json"), ("transformer", "config.json"), ("vae", "config.json"),
                         ("scheduler", "scheduler_config.json")):
        if not (path / name / marker).is_file():
            raise ModelFolderError(f"{path / name}: no {marker}, the component was not saved completely; {fix}")
    return path


def load_editing_model(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> EditingModel:
    """Load an editing model from a pipeline folder (tiny, real Qwen-Image-Edit, or a run's ``final/``).

    Args:
        path: the pipeline folder.
        device: where to put the weights.
        dtype: weight dtype of the VLM, transformer and VAE (bf16 for the real model on GPU).

    Returns:
        The :class:`EditingModel`, all modules in eval mode.

    Raises:
        ModelFolderError: the folder or one of its components is missing.
    """
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImageTransformer2DModel,
    )
    from transformers import AutoModelForImageTextToText

    from metacot.models.vision_attention import use_grouped_vision_attention, use_uniform_grid_indices

    path = check_model_folder(path)
    vlm = AutoModelForImageTextToText.from_pretrained(path / "text_encoder", dtype=dtype).to(device).eval()
    use_grouped_vision_attention(vlm)  # one attention call per layer, not per image window (same math, not saved)
    use_uniform_grid_indices(vlm)  # same-grid batches: the tower's indices computed once, not per image
    transformer = QwenImageTransformer2DModel.from_pretrained(path / "transformer", torch_dtype=dtype).to(device)
    vae = AutoencoderKLQwenImage.from_pretrained(path / "vae", torch_dtype=dtype).to(device)
    return EditingModel(
        vlm=vlm,
        processor=load_processor(path),
        transformer=transformer.eval(),
        vae=vae.eval(),
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(path / "scheduler"),
        # Same derivation as QwenImageEditPipeline.__init__, so sizes agree with the stock pipeline.
        vae_scale_factor=2 ** len(vae.temperal_downsample),
        latent_channels=vae.config.z_dim,
    )


def load_processor(path: str | Path) -> Any:
    """The VLM processor of a model folder alone (tokenizer, image processor, chat template; no weights): what the
    data checks count tokens with before any model loads.

    Raises:
        ModelFolderError: the folder or one of its components is missing.
    """
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(check_model_folder(path) / "processor")


def save_editing_model(model: EditingModel, out_dir: str | Path, *, overwrite: bool = False,
                       atomic: bool = True) -> Path:
    """Save as a ``QwenImageEditPipeline`` folder (safetensors), written atomically.

    Args:
        model: the editing model (plain modules: merge LoRA adapters first).
        out_dir: destination folder.
        overwrite: replace an existing folder (the old one is removed only once the new one is complete).
        atomic: False writes straight into ``out_dir`` (an existing folder), for callers that wrap several writes in
            one :func:`metacot.run.atomic_dir` (the trainers' ``final/``).

    Returns:
        ``out_dir``, loadable by :func:`load_editing_model` and ``DiffusionPipeline.from_pretrained``.

    Raises:
        TypeError: a component still holds PEFT adapter layers.
    """
    from diffusers import QwenImageEditPipeline

    for name in ("vlm", "transformer"):
        if _has_adapters(getattr(model, name)):
            raise TypeError(
                f"EditingModel.{name} holds LoRA/PEFT adapter layers; merge them first (peft: merge_and_unload(); "
                f"diffusers: fuse_lora() then unload_lora()) so the folder holds plain weights diffusers can load"
            )
    pipe = QwenImageEditPipeline(
        scheduler=model.scheduler, vae=model.vae, text_encoder=model.vlm, tokenizer=model.tokenizer,
        processor=model.processor, transformer=model.transformer,
    )
    out_dir = Path(out_dir)
    if not atomic:
        pipe.save_pretrained(out_dir, safe_serialization=True)
        return out_dir
    with atomic_dir(out_dir, overwrite=overwrite, meta={"kind": "editing_model"}) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
    return out_dir


def _has_adapters(module: torch.nn.Module) -> bool:
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # without peft there can be no adapter layers
        return False
    return any(isinstance(m, BaseTunerLayer) for m in module.modules())
