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
from metacot.models.conditioning import build_prompt, condition_text_token_counts
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


@dataclass
class CheckedSFTData:
    """The training set as :func:`check_sft_data` found it usable, before any image is decoded.

    ``edits`` holds ``(record, rendered CoT, condition prompt)``; ``skipped_overlong`` the records dropped by
    ``on_overlong=skip`` as ``file:line id (n tokens)``.
    """

    path: Path
    edits: list[tuple[EditRecord, str, str]]
    understanding: list[UnderstandingRecord]
    skipped_overlong: list[str]


def check_sft_data(
    path: str | Path,
    *,
    no_cot: bool,
    include_instruction: bool,
    use_understanding: bool,
    text_token_counts: Callable[[list[str]], list[int]] | None = None,
    max_tokens: int = 512,
    on_overlong: str = "error",
) -> CheckedSFTData:
    """Validate the training set without decoding images: what ``metacot sft`` and ``metacot data check --stage
    sft`` run before any model loads. Arguments as :func:`load_sft_dataset`.

    Raises:
        SFTDataError: no edit samples, edit records without target image or CoT, over-budget conditions (each
            named by ``file:line``).
        metacot.cot.schema.DataError: schema violations and missing/corrupt images, with file:line.
    """
    path = Path(path)
    problems: list[str] = []
    edits: list[tuple[EditRecord, str, str]] = []
    lines: list[int] = []
    und: list[UnderstandingRecord] = []
    # load_records refuses blank and unparsable lines, so record i is on line i + 1.
    for line, rec in enumerate(load_records(path, check_images=True), start=1):
        if isinstance(rec, EditRecord):
            if rec.target_image is None:
                problems.append(f"{path}:{line}: {rec.id}: edit record has no target_image (SFT needs the "
                                f"ground-truth edit)")
                continue
            if rec.cot is None and not no_cot:
                problems.append(f"{path}:{line}: {rec.id}: edit record has no Meta-CoT; annotate it or train with "
                                f"no_cot=true")
                continue
            cot_text = "" if no_cot or rec.cot is None else render(rec.cot)
            edits.append((rec, cot_text, condition_prompt(rec.instruction, cot_text, no_cot=no_cot,
                                                          include_instruction=include_instruction)))
            lines.append(line)
        elif isinstance(rec, UnderstandingRecord) and use_understanding:
            und.append(rec)
    overlong: list[str] = []
    if text_token_counts is not None and edits:
        counts = text_token_counts([prompt for _, _, prompt in edits])
        overlong = [f"{path}:{line} {e[0].id} ({n} tokens)" for e, line, n in zip(edits, lines, counts)
                    if n > max_tokens]
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
    return CheckedSFTData(path, edits, und, overlong)


def load_sft_dataset(path: str | Path, *, resolution: int, source_resolution: int | None = None,
                     **checks: Any) -> SFTDataset:
    """Load, validate (:func:`check_sft_data`, given ``checks``) and decode the training set.

    Args:
        path: training JSONL (``metacot.cot.schema`` records).
        resolution: square size images are resized to.
        source_resolution: square size of each sample's ``context`` image, the source as the condition encoder
            and the VAE see it (None = ``resolution``: no separate copy; larger with the stock pipeline's
            one-megapixel source area, ``metacot.models.sampler.source_shape``).
        checks: the options of :func:`check_sft_data`:
            no_cot: no-CoT baseline (CoTs are not required and not used).
            include_instruction: whether the generator condition holds the instruction (see ``build_prompt``).
            use_understanding: keep understanding samples (False when the understanding expert is frozen).
            text_token_counts: ``prompts -> text tokens`` of each condition (after the template's dropped prefix),
                for the budget check.
            max_tokens: text-token budget of the condition.
            on_overlong: "error" or "skip".

    Raises:
        SFTDataError, metacot.cot.schema.DataError: as :func:`check_sft_data`.
    """
    return decode_sft_dataset(check_sft_data(path, **checks), resolution=resolution,
                              source_resolution=source_resolution)


def decode_sft_dataset(checked: CheckedSFTData, *, resolution: int, source_resolution: int | None = None
                       ) -> SFTDataset:
    """Decode the images of a training set :func:`check_sft_data` already checked (arguments as
    :func:`load_sft_dataset`)."""
    edits = []
    for rec, cot_text, prompt in checked.edits:
        source_path = _resolve(checked.path, rec.source_image)
        context = None
        if source_resolution not in (None, resolution):
            context = _load_image(source_path, source_resolution)
        edits.append(EditSample(rec.id, _load_image(source_path, resolution),
                                _load_image(_resolve(checked.path, rec.target_image), resolution),
                                rec.instruction, cot_text, prompt, context))
    und = [UnderstandingSample(rec.id, _load_image(_resolve(checked.path, rec.image), resolution), rec.question,
                               rec.answer, rec.kind) for rec in checked.understanding]
    return SFTDataset(edits, und, checked.skipped_overlong)


def data_options(cfg: Any, processor: Any) -> dict[str, Any]:
    """The :func:`check_sft_data` options of an ``SFTConfig``, counting tokens with the model's ``processor``."""
    return dict(no_cot=cfg.no_cot, include_instruction=cfg.include_instruction,
                use_understanding=cfg.understanding.trainable,
                text_token_counts=lambda prompts: condition_text_token_counts(processor, prompts, with_image=True),
                max_tokens=cfg.data.max_condition_tokens, on_overlong=cfg.data.on_overlong)


def check_inputs(cfg: Any) -> CheckedSFTData:
    """Stage 1's checks before any model loads (``metacot sft`` and ``metacot data check --stage sft``): the model
    folder is complete and the training set usable, token budgets counted with the folder's processor."""
    from metacot.models.loading import load_processor

    return check_sft_data(cfg.data.train, **data_options(cfg, load_processor(cfg.model)))


def _resolve(jsonl: Path, image: Any) -> Path:
    p = Path(str(image))
    return p if p.is_absolute() else jsonl.parent / p
