"""Check an export before it is committed: a fresh-process smoke test, and an optional weight comparison with a run.

:func:`smoke_test` starts a NEW Python process that imports only torch, diffusers, transformers (and peft for kept
adapters), never metacot, loads ``pipeline/`` with ``DiffusionPipeline.from_pretrained`` and ``understanding/`` with
``AutoModelForImageTextToText`` / ``AutoProcessor``, runs a 2-step edit and a few generated tokens, and reports
whether the image is finite. The stock pipeline resizes its input to about one megapixel whatever ``height`` /
``width`` say, which makes even a tiny model slow; the script shrinks that target to the smoke-test size through the
module's ``calculate_dimensions`` (the hook the shared notes describe), so the test takes seconds.

:func:`check_against` recomputes what the export's weights must be from a run's files and compares: for a merged
LoRA expert ``W = W_base + (alpha / r) * B @ A`` from the base model and the run's adapter tensors (computed here, not
by peft); everything else must equal the run's ``final/`` weights. With kept adapters the exported components must
equal the base, and the exported adapters the run's. Tolerances follow the saved dtype.

Left out: numerical comparison of the smoke-test image with metacot's sampler (the tests of metacot.models do that).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from metacot.export.layout import DTYPES, adapter_targets, lora_experts
from metacot.facts import read_facts

SMOKE_SIZE = 64  # pixels: small enough for a CPU smoke test, a multiple of every model's 16 / 32 px grid
SMOKE_STEPS = 2
SMOKE_TIMEOUT_S = 1800

SMOKE_SCRIPT = r"""
import json, sys, time
spec = json.loads(sys.argv[1])
import numpy as np
import torch
from PIL import Image
from diffusers import DiffusionPipeline
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit as stock
from transformers import AutoModelForImageTextToText, AutoProcessor

root, size = spec["root"], spec["size"]
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = getattr(torch, spec["dtype"])
t0 = time.perf_counter()

def with_adapters(module, target):
    for adapter in spec["adapters"]:
        if target in adapter["apply_to"]:
            from peft import PeftModel
            module = PeftModel.from_pretrained(module, f"{root}/{adapter['path']}").merge_and_unload()
    return module

pipe = DiffusionPipeline.from_pretrained(f"{root}/pipeline", dtype=dtype)
pipe.text_encoder = with_adapters(pipe.text_encoder, "pipeline/text_encoder")
pipe.transformer = with_adapters(pipe.transformer, "pipeline/transformer")
pipe.to(device)
original = stock.calculate_dimensions
stock.calculate_dimensions = lambda area, ratio: original(size * size, ratio)
source = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8))
image = pipe(image=source, prompt=spec["prompt"], negative_prompt=spec["negative_prompt"],
             true_cfg_scale=spec["cfg"], num_inference_steps=spec["steps"], height=size, width=size,
             output_type="np", generator=torch.Generator(device).manual_seed(0)).images
image = np.asarray(image, dtype=np.float64)

und = with_adapters(AutoModelForImageTextToText.from_pretrained(f"{root}/understanding", dtype=dtype),
                    "understanding").to(device)
processor = AutoProcessor.from_pretrained(f"{root}/understanding")
chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": spec["instruction"]}]}]
text = processor.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
inputs = processor(text=[text], images=[source], return_tensors="pt").to(device)
tokens = und.generate(**inputs, max_new_tokens=4, do_sample=False)
print(json.dumps({
    "pipeline_class": type(pipe).__name__, "image_shape": list(image.shape),
    "finite": bool(np.isfinite(image).all()), "pixel_min": float(image.min()), "pixel_max": float(image.max()),
    "understanding_class": type(und).__name__, "generated_tokens": int(tokens.shape[1] - inputs["input_ids"].shape[1]),
    "imported_metacot": sorted(m for m in sys.modules if m.split(".")[0] in ("metacot", "rewards", "data_recipes")),
    "device": device, "seconds": round(time.perf_counter() - t0, 2)}))
"""


class VerificationError(RuntimeError):
    """The export does not load or edit with the plain libraries, or its weights differ from the run's."""


def smoke_test(root: Path, layout: dict[str, Any], prompt: str, instruction: str, negative_prompt: str
               ) -> dict[str, Any]:
    """Load ``root`` in a fresh process without metacot and run a 2-step edit; returns the process's report.

    Raises:
        VerificationError: the process failed, imported metacot, or the image is not finite / has the wrong shape.
    """
    adapters = [{"path": a["path"], "apply_to": a["apply_to"]} for a in layout["adapters"].values()]
    spec = {"root": str(root), "size": SMOKE_SIZE, "steps": SMOKE_STEPS, "cfg": 4.0, "prompt": prompt,
            "negative_prompt": negative_prompt,
            "instruction": instruction, "adapters": adapters, "dtype": str(DTYPES[layout["dtype"]]).split(".")[-1]}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-c", SMOKE_SCRIPT, json.dumps(spec)], capture_output=True, text=True,
                          env=env, timeout=SMOKE_TIMEOUT_S, check=False)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise VerificationError(f"the export does not load or edit with plain diffusers/transformers in a fresh "
                                f"process (exit {proc.returncode}); nothing was written. Its error:\n{tail}")
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    expected = [1, SMOKE_SIZE, SMOKE_SIZE, 3]
    if report["imported_metacot"] or not report["finite"] or report["image_shape"] != expected:
        raise VerificationError(f"fresh-process smoke test failed: {report} (expected a finite image of shape "
                                f"{expected} without importing metacot)")
    return report


# -- weight comparison ------------------------------------------------------------------------------------------------

def load_state(folder: Path, kind: str) -> dict[str, torch.Tensor]:
    """fp32 state dict of one component folder, loaded by its library (``vlm``, ``transformer`` or ``vae``)."""
    if kind == "vlm":
        from transformers import AutoModelForImageTextToText

        module = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32)
    elif kind == "transformer":
        from diffusers import QwenImageTransformer2DModel

        module = QwenImageTransformer2DModel.from_pretrained(folder, dtype=torch.float32)
    else:
        from diffusers import AutoencoderKLQwenImage

        module = AutoencoderKLQwenImage.from_pretrained(folder, dtype=torch.float32)
    return {k: v.detach().float() for k, v in module.state_dict().items()}


def read_adapter(folder: Path) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float]:
    """``{weight name: (A [r, in], B [out, r])}`` of a peft LoRA folder and its scale ``alpha / r``.

    Raises:
        VerificationError: the adapter uses per-module ranks/alphas or a variant (DoRA, rsLoRA) this check does not
            model.
    """
    from safetensors.torch import load_file

    config = json.loads((folder / "adapter_config.json").read_text())
    if config.get("rank_pattern") or config.get("alpha_pattern") or config.get("use_dora") or config.get("use_rslora"):
        raise VerificationError(f"{folder}: rank/alpha patterns, DoRA and rsLoRA are not modelled by the weight check")
    tensors = load_file(folder / "adapter_model.safetensors")
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key, a in tensors.items():
        if ".lora_A." in key:
            module = key.split(".lora_A.")[0].removeprefix("base_model.model.")
            b = tensors[key.replace(".lora_A.", ".lora_B.")]
            pairs[f"{module}.weight"] = (a.float(), b.float())
    return pairs, config["lora_alpha"] / config["r"]


def merged_reference(base: dict[str, torch.Tensor], pairs: dict[str, tuple[torch.Tensor, torch.Tensor]],
                     scale: float) -> dict[str, torch.Tensor]:
    """``base`` with ``W + scale * B @ A`` for every adapted weight (float64 matmul, returned as fp32)."""
    out = dict(base)
    for name, (a, b) in pairs.items():
        if name not in base:
            raise VerificationError(f"adapter weight {name} has no counterpart in the base model: wrong base recorded?")
        out[name] = (base[name].double() + scale * (b.double() @ a.double())).float()
    return out


def _compare(name: str, got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], dtype: str) -> dict[str, Any]:
    if set(got) != set(want):
        diff = sorted(set(got) ^ set(want))[:5]
        raise VerificationError(f"{name}: the exported and the reference weights have different tensors ({diff})")
    # fp32: exact up to summation order; bf16: the reference rounded to bf16 may differ by one unit in the last place.
    rtol, atol = (1e-5, 1e-6) if dtype == "fp32" else (8e-3, 1e-5)
    worst, worst_key, largest = 0.0, "", 0.0
    for key in sorted(want):
        ref = want[key].to(DTYPES[dtype]).float()
        if not ref.numel():
            continue
        diff = (got[key] - ref).abs()
        err = (diff - rtol * ref.abs()).max().item()
        largest = max(largest, diff.max().item())
        if err > worst:
            worst, worst_key = err, key
    if worst > atol:
        raise VerificationError(f"{name}: tensor {worst_key} differs from the reference by {worst:.3g} beyond "
                                f"rtol={rtol} (allowed {atol}); the export does not hold the run's weights")
    return {"tensors": len(want), "max_abs_diff": largest, "rtol": rtol, "atol": atol}


def _flat(pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {f"{name}.{part}": t for name, ab in pairs.items() for part, t in zip("AB", ab, strict=True)}


def _slots(ref_meta: dict[str, Any]) -> dict[str, tuple[str, str, str | None]]:
    """Export folder -> (component kind, reference component folder in final/, adapter expert or None)."""
    adapters = set(lora_experts(ref_meta))
    slots: dict[str, tuple[str, str, str | None]] = {
        "pipeline/transformer": ("transformer", "transformer", "generation" if "generation" in adapters else None),
        "pipeline/vae": ("vae", "vae", None),
    }
    und = "understanding" if "understanding" in adapters else None
    te_adapter = und if und and "pipeline/text_encoder" in adapter_targets("understanding", ref_meta) else None
    slots["pipeline/text_encoder"] = ("vlm", "text_encoder", te_adapter)
    slots["understanding"] = ("vlm", ref_meta["understanding"]["path"], und)
    return slots


def check_against(root: Path, layout: dict[str, Any], reference: Path) -> dict[str, Any]:
    """Compare the export at ``root`` with the ``final/``-style folder ``reference`` (see module docstring).

    Args:
        root: the export (possibly still in its temporary folder).
        layout: the export's layout facts (``Layout.to_dict()``).
        reference: the run's ``final/`` (or the folder rebuilt from the same checkpoint).

    Returns:
        Per export folder: compared tensors, merged LoRA weights and the largest deviation beyond tolerance.

    Raises:
        VerificationError: any tensor outside tolerance, or the base needed for a LoRA expert is missing.
    """
    ref_meta = read_facts(reference)
    base = Path(ref_meta["base_model"])
    kept, dtype, report = layout["lora"] == "kept", layout["dtype"], {}
    for slot, (kind, ref_dir, expert) in _slots(ref_meta).items():
        if expert is None:
            want = load_state(reference / ref_dir, kind)
            lora = 0
        else:
            base_dir = base / ("transformer" if kind == "transformer" else "text_encoder")
            if not base_dir.is_dir():
                raise VerificationError(f"cannot check {slot}: the run's base {base_dir} is gone (needed for "
                                        f"W_base + (alpha/r) B A)")
            pairs, scale = read_adapter(reference / ref_meta["adapters"][expert])
            want = load_state(base_dir, kind)
            if not kept:
                want = merged_reference(want, pairs, scale)
            lora = len(pairs)
        got = load_state(root / slot, kind)
        report[slot] = {**_compare(slot, got, want, dtype), "lora_merged": 0 if kept else lora}
    if kept:
        for expert, facts in layout["adapters"].items():
            got, _ = read_adapter(root / facts["path"])
            want, _ = read_adapter(reference / ref_meta["adapters"][expert])
            report[facts["path"]] = _compare(facts["path"], _flat(got), _flat(want), dtype)
    return report
