"""``metacot edit``: write the Meta-CoT with the understanding expert, then edit the image conditioned on it.

Examples::

    metacot edit --model exports/grpo --image in.png --instruction "Make the red circle blue." --out out.png
    metacot edit --model runs/sft/final --image in.png --instruction "..." --cot-only   # reasoning only
    metacot edit --model exports/sft --image in.png --instruction "..." --no-cot      # the no-CoT baseline's input

``--model`` is an export (``DIR/pipeline`` + ``DIR/understanding``, adapters applied when kept), a run's ``final/``
or a plain pipeline folder. The understanding expert is loaded by :func:`metacot.understanding.load_understanding`
(the trained one, also where it is not the text encoder); the CoT comes from :func:`metacot.understanding.write_cots`
(greedy, the chat the expert was trained on), the prompt
from :func:`metacot.models.conditioning.build_prompt` with the options the model was trained with, and the edit from
metacot's own sampler (:func:`metacot.models.sampler.edit`) at the source's size: no resize to one megapixel unless the
source is larger than that (or ``--size`` sets the longer side). Runs on the GPU in bf16 when there is one, else on
the CPU in fp32.

Left out: batches of images (call :func:`edit_image` in a loop), sampling of the CoT, masks.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STOCK_AREA = 1024 * 1024  # the stock pipeline's target area; larger sources are scaled down to it by default


class EditError(ValueError):
    """The model folder or the request cannot be used; the message says why and what to pass instead."""


@dataclass
class LoadedModel:
    """An editing model with its understanding expert and the prompt options it was trained with."""

    model: Any  # metacot.models.loading.EditingModel
    und_vlm: Any
    und_processor: Any
    options: dict[str, bool]  # no_cot, include_instruction (metacot.export.card.prompt_options)
    kind: str  # "export", "final" or "pipeline" (metacot.understanding.describe_model_folder)
    source_area: int = 0  # pixel area of the source latents in training (metacot.export.card.source_area)


def load_model(folder: str | Path, device: Any = None, dtype: Any = None) -> LoadedModel:
    """Load an export, a ``final/`` or a plain pipeline folder for editing (kept adapters merged on load).

    The understanding expert comes from :func:`metacot.understanding.load_understanding`, the one loader every
    path shares (also ``final/understanding/`` when the tuned expert is not the text encoder).

    Args:
        folder: the export folder (or its ``pipeline/``), the run's ``final/``, or a pipeline folder.
        device: torch device; default: cuda when available, else cpu.
        dtype: weight dtype; default: bf16 on cuda, fp32 on cpu.

    Raises:
        metacot.models.loading.ModelFolderError: the folder is none of these.
    """
    import torch

    from metacot.facts import prompt_options, source_area
    from metacot.models.loading import load_editing_model
    from metacot.understanding import describe_model_folder, load_understanding, merge_adapters

    desc = describe_model_folder(folder)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    model = load_editing_model(desc.pipeline, device=device, dtype=dtype)
    model.vlm = merge_adapters(model.vlm, desc.root, desc.adapters_on("pipeline/text_encoder")).eval()
    model.transformer = merge_adapters(model.transformer, desc.root, desc.adapters_on("pipeline/transformer")).eval()
    und_vlm, und_processor = load_understanding(folder, device=device, dtype=dtype,
                                                text_encoder=(model.vlm, model.processor))
    return LoadedModel(model, und_vlm, und_processor, prompt_options(desc.meta), desc.kind, source_area(desc.meta))


def edit_size(width: int, height: int, size: int | None, multiple: int) -> tuple[int, int]:
    """Output ``(height, width)``: the source's size (longer side ``size`` if given; at most ~1 MP by default),
    rounded to multiples of ``multiple`` (VAE downsampling x latent packing)."""
    if size is not None and size < multiple:
        raise EditError(f"--size {size} is below this model's minimum side of {multiple} pixels")
    scale = size / max(width, height) if size else min(1.0, math.sqrt(STOCK_AREA / (width * height)))
    return (max(multiple, round(height * scale / multiple) * multiple),
            max(multiple, round(width * scale / multiple) * multiple))


@dataclass
class EditOutcome:
    cot_text: str | None  # what the understanding expert wrote (None with --no-cot)
    cot_problems: list[str]  # sections the lenient parser could not read
    prompt: str | None  # the generator's prompt (None with --cot-only)
    image: Any  # PIL image (None with --cot-only)


def edit_image(loaded: LoadedModel, image: Any, instruction: str, *, cot: bool = True, cot_only: bool = False,
               steps: int = 50, cfg: float = 4.0, seed: int = 0, size: int | None = None,
               max_cot_tokens: int = 384) -> EditOutcome:
    """Meta-CoT (unless ``cot`` is False) then the edit (unless ``cot_only``) of one PIL image.

    Raises:
        EditError: the understanding expert wrote an empty Meta-CoT (no prompt can be built from it).
        metacot.models.conditioning.ConditionBudgetError: the prompt is over the condition encoder's token budget.
    """
    import torch

    from metacot.models.conditioning import build_prompt
    from metacot.models.sampler import edit, resize_sources
    from metacot.understanding import write_cots

    model = loaded.model
    height, width = edit_size(*image.size, size, model.pixel_multiple)
    source = resize_sources(model, [image], height, width)[0]
    cot_text, problems = None, []
    if cot:
        written = write_cots(loaded.und_vlm, loaded.und_processor, [source], [instruction],
                             max_new_tokens=max_cot_tokens)[0]
        cot_text, problems = written.text, list(written.parsed.problems)
    if cot_only:
        return EditOutcome(cot_text, problems, None, None)
    if cot and not cot_text:
        raise EditError("the understanding expert wrote an empty Meta-CoT; edit with --no-cot, or check the model")
    prompt = build_prompt(instruction, cot_text, include_instruction=loaded.options["include_instruction"])
    generator = torch.Generator(device=model.device).manual_seed(seed)
    # The source latents at the area the model trained with (the original image, not the output-size copy).
    result = edit(model, [image.convert("RGB")], [prompt], height=height, width=width, num_steps=steps,
                  cfg_scale=cfg, generator=generator, source_area=loaded.source_area)[0]
    return EditOutcome(cot_text, problems, prompt, result)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metacot edit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="an export folder (metacot export) or a run's final/")
    parser.add_argument("--image", required=True, help="source image")
    parser.add_argument("--instruction", required=True, help="the edit instruction")
    parser.add_argument("--out", default=None, help="edited image path (default: <image>.edited.png beside it)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--cot-only", action="store_true", help="write the Meta-CoT and stop")
    mode.add_argument("--no-cot", action="store_true", help="edit from the instruction alone (no-CoT baseline input)")
    parser.add_argument("--steps", type=int, default=50, help="denoising steps")
    parser.add_argument("--cfg", type=float, default=4.0, help="true CFG scale (1 = off)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial noise")
    parser.add_argument("--size", type=int, default=None, help="longer output side in pixels (default: the source's)")
    parser.add_argument("--max-cot-tokens", type=int, default=384,
                        help="generation budget of the Meta-CoT (as the Flow-GRPO data.max_cot_tokens)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.steps < 1 or args.max_cot_tokens < 1:
        print("metacot edit: --steps and --max-cot-tokens must be >= 1", file=sys.stderr)
        return 2
    image_path = Path(args.image)
    out = Path(args.out) if args.out else image_path.with_name(f"{image_path.stem}.edited.png")
    from PIL import Image, UnidentifiedImageError

    from metacot.models.loading import ModelFolderError

    try:
        with Image.open(image_path) as img:
            image = img.convert("RGB")
        loaded = load_model(args.model)
        if loaded.options["no_cot"] and not args.no_cot and not args.cot_only:
            print("metacot edit: note: this model was trained without Meta-CoT (no_cot); --no-cot gives its "
                  "training-time input", file=sys.stderr)
        outcome = edit_image(loaded, image, args.instruction, cot=not args.no_cot, cot_only=args.cot_only,
                             steps=args.steps, cfg=args.cfg, seed=args.seed, size=args.size,
                             max_cot_tokens=args.max_cot_tokens)
    except (EditError, ModelFolderError, FileNotFoundError, UnidentifiedImageError, ValueError) as exc:
        print(f"metacot edit: {exc}", file=sys.stderr)
        return 1
    if outcome.cot_text is not None:
        print(f"Meta-CoT:\n{outcome.cot_text}")
        for problem in outcome.cot_problems:
            print(f"metacot edit: note: Meta-CoT problem: {problem}", file=sys.stderr)
    if outcome.image is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        outcome.image.save(out)
        print(f"edited image: {out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
