"""Write an export's weights: ``pipeline/`` (plain diffusers), ``understanding/`` (plain transformers), ``adapters/``.

From a ``final/``-style folder (a run's, or one rebuilt from a checkpoint):

- ``pipeline/``: the ``QwenImageEditPipeline`` folder, re-saved by diffusers itself in the requested dtype, safetensors
  sharded at :data:`MAX_SHARD_SIZE` (the size the Hugging Face libraries and hub use). With ``keep_lora`` the
  components of LoRA-tuned experts hold the BASE weights the adapters apply to (read from the base pipeline the run
  recorded); without it they hold the merged weights ``final/`` has.
- ``understanding/``: the understanding expert as a transformers folder (model + processor). When its weights are the
  pipeline's text encoder's (the usual case), its weight files are hard links to ``pipeline/text_encoder``'s: the
  folder loads on its own with ``AutoModelForImageTextToText`` and costs no disk. Why not a smaller pointer:
  transformers has no config field that loads weights from another folder, and symbolic links break hub uploads, zip
  archives and Windows. Where hard links are impossible (a filesystem without them) the files are copied;
  ``metacot.json`` says which happened.
- ``adapters/<expert>/``: with ``keep_lora``, the peft adapter folders (cast to the requested dtype), and for each the
  folders it applies to.

Left out: quantisation, other pipeline classes, pickle files of any kind.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

MAX_SHARD_SIZE = "5GB"
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json")
_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


@dataclass
class Layout:
    """What an export holds and how its parts relate (recorded in ``metacot.json``).

    Attributes:
        lora: ``"merged"`` or ``"kept"``.
        dtype: ``"bf16"`` or ``"fp32"``.
        understanding_shares: the understanding folder's weight files are those of ``pipeline/text_encoder``.
        understanding_files: ``"hardlink"``, ``"copy"`` (shared weights, copied) or ``"separate"`` (other weights).
        adapters: expert -> ``{"path": ..., "apply_to": [...], "r": ..., "alpha": ...}`` (``keep_lora`` only).
        base_model: the base pipeline folder of the LoRA experts (``keep_lora`` only).
    """

    lora: str
    dtype: str
    understanding_shares: bool
    understanding_files: str
    adapters: dict[str, dict[str, Any]] = field(default_factory=dict)
    base_model: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"pipeline": "pipeline", "lora": self.lora, "dtype": self.dtype, "max_shard_size": MAX_SHARD_SIZE,
                "understanding": {"path": "understanding",
                                  "same_weights_as": "pipeline/text_encoder" if self.understanding_shares else None,
                                  "files": self.understanding_files},
                "adapters": self.adapters, "base_model": self.base_model}


def lora_experts(final_meta: dict[str, Any]) -> list[str]:
    """The experts a ``final/`` folder holds peft adapters for (``understanding``, ``generation``)."""
    return sorted(final_meta.get("adapters", {}))


def adapter_targets(expert: str, final_meta: dict[str, Any]) -> list[str]:
    """Export folders an expert's adapter applies to (the text encoder too when conditions used the adapter)."""
    if expert == "generation":
        return ["pipeline/transformer"]
    return ["understanding"] + (["pipeline/text_encoder"] if final_meta.get("condition_with_adapter") else [])


def understanding_shares_text_encoder(final_meta: dict[str, Any], keep_lora: bool) -> bool:
    """True when the exported understanding expert has the exported text encoder's weight files.

    With merged weights that is ``final/``'s own fact; with kept adapters both hold the base VLM whenever the
    understanding expert was LoRA-tuned (the adapter is then applied on load).
    """
    if final_meta["understanding"]["is_text_encoder"]:
        return True
    return keep_lora and "understanding" in lora_experts(final_meta)


# -- writing ----------------------------------------------------------------------------------------------------------

def write_pipeline(final: Path, final_meta: dict[str, Any], out: Path, dtype: str, base: Path | None) -> None:
    """Re-save ``final`` as a diffusers folder at ``out``; with ``base``, LoRA experts' components come from it."""
    from diffusers import QwenImageEditPipeline, QwenImageTransformer2DModel
    from transformers import AutoModelForImageTextToText

    torch_dtype = DTYPES[dtype]
    overrides: dict[str, Any] = {}
    if base is not None:
        experts = lora_experts(final_meta)
        if "generation" in experts:
            overrides["transformer"] = QwenImageTransformer2DModel.from_pretrained(
                base / "transformer", dtype=torch_dtype)
        if "understanding" in experts:
            overrides["text_encoder"] = AutoModelForImageTextToText.from_pretrained(
                base / "text_encoder", dtype=torch_dtype)
    pipe = QwenImageEditPipeline.from_pretrained(final, dtype=torch_dtype, **overrides)
    pipe.save_pretrained(out, safe_serialization=True, max_shard_size=MAX_SHARD_SIZE)


def link_vlm_folder(text_encoder: Path, processor: Path, out: Path) -> str:
    """Make ``out`` a transformers VLM folder sharing ``text_encoder``'s weight files; returns hardlink or copy."""
    out.mkdir(parents=True)
    how = "hardlink"
    for path in sorted(text_encoder.iterdir()):
        if not path.name.endswith(WEIGHT_SUFFIXES):
            shutil.copy2(path, out / path.name)
            continue
        try:
            os.link(path, out / path.name)
        except OSError:  # a filesystem without hard links: the folder must still load on its own
            shutil.copy2(path, out / path.name)
            how = "copy"
    _copy_processor(processor, out)
    return how


def _copy_processor(processor: Path, out: Path) -> None:
    for path in sorted(processor.iterdir()):
        if (out / path.name).exists():
            raise FileExistsError(f"{processor / path.name} would overwrite {out / path.name}: the processor and the "
                                  f"model folder share a file name, so they cannot live in one transformers folder")
        shutil.copy2(path, out / path.name)


def write_separate_vlm(source: Path, out: Path, dtype: str) -> None:
    """Re-save a VLM folder (model + processor) in ``dtype``, sharded."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(source, dtype=DTYPES[dtype])
    model.save_pretrained(out, safe_serialization=True, max_shard_size=MAX_SHARD_SIZE)
    AutoProcessor.from_pretrained(source).save_pretrained(out)


def write_adapter(source: Path, out: Path, dtype: str) -> dict[str, Any]:
    """Copy a peft adapter folder with its float tensors cast to ``dtype``; returns its rank and alpha."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, out, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    files = sorted(source.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{source}: no adapter_model.safetensors; the run's final/ is damaged, re-run its "
                                f"final save or export from a checkpoint with --step")
    for path in files:
        tensors = load_file(path)
        cast = {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v for k, v in tensors.items()}
        save_file(cast, out / path.name, metadata={"format": "pt"})
    config = json.loads((source / "adapter_config.json").read_text())
    return {"r": config["r"], "alpha": config["lora_alpha"], "target_modules": config["target_modules"]}


def write_weights(final: Path, final_meta: dict[str, Any], tmp: Path, *, keep_lora: bool, dtype: str,
                  base: Path | None) -> Layout:
    """Write ``pipeline/``, ``understanding/`` and (``keep_lora``) ``adapters/`` into ``tmp``; returns the layout."""
    write_pipeline(final, final_meta, tmp / "pipeline", dtype, base if keep_lora else None)
    shares = understanding_shares_text_encoder(final_meta, keep_lora)
    if shares:
        files = link_vlm_folder(tmp / "pipeline" / "text_encoder", tmp / "pipeline" / "processor",
                                tmp / "understanding")
    else:
        write_separate_vlm(final / final_meta["understanding"]["path"], tmp / "understanding", dtype)
        files = "separate"
    layout = Layout("kept" if keep_lora else "merged", dtype, shares, files,
                    base_model=str(base) if keep_lora and base is not None else None)
    if keep_lora:
        for expert in lora_experts(final_meta):
            rel = f"adapters/{expert}"
            facts = write_adapter(final / final_meta["adapters"][expert], tmp / rel, dtype)
            layout.adapters[expert] = {"path": rel, "apply_to": adapter_targets(expert, final_meta), **facts}
    return layout


# -- size estimate -----------------------------------------------------------------------------------------------------

def safetensors_numel(folder: Path) -> int:
    """Elements stored in the ``*.safetensors`` files under ``folder`` (read from their headers only)."""
    total = 0
    for path in folder.rglob("*.safetensors"):
        with open(path, "rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(length))
        for name, info in header.items():
            if name != "__metadata__":
                n = 1
                for d in info["shape"]:
                    n *= d
                total += n
    return total


def model_numel(folder: Path) -> int:
    """Elements of a pipeline folder's weighted components (adapters and extra folders excluded)."""
    return sum(safetensors_numel(folder / c) for c in ("text_encoder", "transformer", "vae") if (folder / c).is_dir())


def check_disk(out: Path, need: int) -> None:
    """Refuse when the filesystem that will hold ``out`` has less than ``need`` bytes free.

    Raises:
        OSError: with both figures and what to do.
    """
    probe = out.resolve()
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < need:
        raise OSError(f"not enough disk space for the export: it needs about {need / 2**30:.2f} GiB on the filesystem "
                      f"of {probe}, which has {free / 2**30:.2f} GiB free; free some space or choose --out on "
                      f"another disk")
