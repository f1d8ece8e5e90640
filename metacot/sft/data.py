"""Stage 1 data: load and validate the training JSONL once, before any model step, then serve step batches.

Everything that could fail at step 5,000 is checked here at start: schema (via ``metacot.cot.schema``, which
reports ``file:line``), image files, a Meta-CoT on every edit record (unless the run is the no-CoT baseline), an
empty dataset, and the condition-token budget of every sample (error, or a counted skip when asked).
Batches are drawn by :func:`metacot.training.epoch_batch_indices`, a pure function of ``(seed, step)``, so a
resumed run sees exactly the samples an uninterrupted one would.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from PIL import Image

from metacot.cot import render
from metacot.cot.schema import EditRecord, UnderstandingRecord, load_records
from metacot.models.conditioning import build_prompt
from metacot.training import epoch_batch_indices


class SFTDataError(ValueError):
    """The training data cannot be used as configured; the message lists what is wrong and how to fix it."""


@dataclass
class EditSample:
    id: str
    source: Image.Image
    target: Image.Image
    instruction: str
    cot_text: str  # rendered Meta-CoT ("" for the no-CoT baseline)
    condition_prompt: str  # build_prompt(...) as the generator sees it
    # The source at the source latent size (data.source_area) when that differs from the output size: what the
    # condition encoder and the VAE see; ``source`` (output size) is what the understanding expert reads.
    context: Image.Image | None = None
    # Step-invariant model inputs (tokens, image patches, latents): a metacot.sft.prepare.Prepared filled at setup
    # when data.preprocess is on, else None.
    prepared: Any = None

    @property
    def conditioning_image(self) -> Image.Image:
        return self.source if self.context is None else self.context


@dataclass
class UnderstandingSample:
    id: str
    image: Image.Image
    question: str
    answer: str
    kind: str
    prepared: Any = None  # as EditSample.prepared


@dataclass
class SFTDataset:
    edits: list[EditSample]
    understanding: list[UnderstandingSample]
    skipped_overlong: list[str]

    def edit_batch(self, step: int, size: int, seed: int) -> list[EditSample]:
        return [self.edits[i] for i in epoch_batch_indices(len(self.edits), size, step, seed)]

    def understanding_batch(self, step: int, size: int, seed: int) -> list[UnderstandingSample]:
        if size == 0 or not self.understanding:
            return []
        # A different seed stream than the edits, so the two orders are independent.
        idx = epoch_batch_indices(len(self.understanding), size, step, seed + 1_000_003)
        return [self.understanding[i] for i in idx]


def condition_prompt(instruction: str, cot_text: str, *, no_cot: bool, include_instruction: bool) -> str:
    """The generator's text condition for one sample under the run's switches (see ``build_prompt``)."""
    if no_cot:
        return build_prompt(instruction, None)
    return build_prompt(instruction, cot_text, include_instruction=include_instruction)


def _load_image(path: Path, resolution: int) -> Image.Image:
    with Image.open(path) as img:
        img = img.convert("RGB")
        if img.size != (resolution, resolution):
            img = img.resize((resolution, resolution), Image.Resampling.BICUBIC)
        return img


def load_sft_dataset(
    path: str | Path,
    *,
    resolution: int,
    no_cot: bool,
    include_instruction: bool,
    use_understanding: bool,
    text_token_counts: Callable[[list[str]], list[int]] | None = None,
    max_tokens: int = 512,
    on_overlong: str = "error",
    source_resolution: int | None = None,
) -> SFTDataset:
    """Load, validate and decode the training set.

    Args:
        path: training JSONL (``metacot.cot.schema`` records).
        resolution: square size images are resized to.
        no_cot: no-CoT baseline (CoTs are not required and not used).
        include_instruction: whether the generator condition holds the instruction (see ``build_prompt``).
        use_understanding: keep understanding samples (False when the understanding expert is frozen).
        text_token_counts: ``prompts -> text tokens`` of each condition (after the template's dropped prefix),
            for the budget check.
        max_tokens: text-token budget of the condition.
        on_overlong: "error" or "skip".
        source_resolution: square size of each sample's ``context`` image, the source as the condition encoder
            and the VAE see it (None = ``resolution``: no separate copy; larger with the stock pipeline's
            one-megapixel source area, ``metacot.models.sampler.source_shape``).

    Raises:
        SFTDataError: no edit samples, edit records without target image or CoT, over-budget conditions.
        metacot.cot.schema.DataError: schema violations and missing/corrupt images, with file:line.
    """
    path = Path(path)
    records = load_records(path, check_images=True)
    problems: list[str] = []
    edits: list[EditSample] = []
    und: list[UnderstandingSample] = []
    overlong: list[str] = []
    for rec in records:
        if isinstance(rec, EditRecord):
            if rec.target_image is None:
                problems.append(f"{rec.id}: edit record has no target_image (SFT needs the ground-truth edit)")
                continue
            if rec.cot is None and not no_cot:
                problems.append(f"{rec.id}: edit record has no Meta-CoT; annotate it or train with no_cot=true")
                continue
            cot_text = "" if no_cot or rec.cot is None else render(rec.cot)
            prompt = condition_prompt(rec.instruction, cot_text, no_cot=no_cot,
                                      include_instruction=include_instruction)
            source_path = _resolve(path, rec.source_image)
            context = None
            if source_resolution not in (None, resolution):
                context = _load_image(source_path, source_resolution)
            edits.append(EditSample(rec.id, _load_image(source_path, resolution),
                                    _load_image(_resolve(path, rec.target_image), resolution),
                                    rec.instruction, cot_text, prompt, context))
        elif isinstance(rec, UnderstandingRecord) and use_understanding:
            und.append(UnderstandingSample(rec.id, _load_image(_resolve(path, rec.image), resolution),
                                           rec.question, rec.answer, rec.kind))
    if text_token_counts is not None and edits:
        counts = text_token_counts([e.condition_prompt for e in edits])
        overlong = [f"{e.id} ({n} tokens)" for e, n in zip(edits, counts) if n > max_tokens]
        edits = [e for e, n in zip(edits, counts) if n <= max_tokens]
    if problems:
        raise SFTDataError(f"{path}: {len(problems)} unusable records:\n  " + "\n  ".join(problems[:50]))
    if overlong and on_overlong == "error":
        raise SFTDataError(
            f"{path}: {len(overlong)} samples exceed the condition budget of {max_tokens} tokens: "
            f"{', '.join(overlong[:20])}. Shorten their CoTs, raise data.max_condition_tokens (if your encoder "
            f"allows it), or set data.on_overlong=skip to drop them (counted and logged)."
        )
    if not edits:
        raise SFTDataError(f"{path}: no usable edit samples; Stage 1 needs (source, instruction, target) records")
    return SFTDataset(edits, und, overlong)


def _resolve(jsonl: Path, image: Any) -> Path:
    p = Path(str(image))
    return p if p.is_absolute() else jsonl.parent / p
