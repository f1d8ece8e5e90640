"""How an edit is conditioned: the one prompt format, and the VLM hidden states the MMDiT attends to.

The VLM (Qwen2.5-VL) that writes the Meta-CoT is also the condition encoder, used exactly as the stock diffusers
``QwenImageEditPipeline.encode_prompt`` uses it: the prompt goes into the pipeline's chat template (a fixed system
prompt, then the user turn ``<|vision_start|><|image_pad|><|vision_end|>{prompt}``, then an open assistant turn), the
VLM's last hidden states over the valid (non-padding) tokens are taken, and the first
``prompt_template_encode_start_idx`` tokens (the system prefix, 64) are dropped. The template and the index are read
from the installed diffusers (:func:`stock_template`), so an exported plain diffusers pipeline reproduces the
conditions metacot trained with, given the same prompt string from :func:`build_prompt`.

Differences from the stock code, all deliberate: :func:`encode_conditions` keeps the autograd graph (SFT trains the VLM
through it), can drop the source image from chosen samples (classifier-free-guidance dropout), always returns a mask,
and refuses conditions over a text-token budget instead of passing them on silently.

Left out: generating the Meta-CoT (the SFT / export code calls ``vlm.generate``), and truncation (an over-long
condition is an error, not something to cut silently).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

# The stock pipeline encodes at most this many prompt tokens after the dropped prefix (its `max_sequence_length`
# default). It does not enforce it itself; we do, counting text tokens only (image tokens scale with resolution).
DEFAULT_MAX_TEXT_TOKENS = 512
VISION_BLOCK = "<|vision_start|><|image_pad|><|vision_end|>"
COT_HEADER = "Meta-CoT:"
# The text condition of classifier-free guidance's negative branch, and of SFT's text dropout (so the model learns
# exactly the unconditional input it meets at sampling time). Qwen-Image-Edit users pass " ".
NEGATIVE_PROMPT = " "


class ConditionBudgetError(ValueError):
    """One or more conditions have more text tokens than the budget allows."""


@functools.lru_cache(maxsize=1)
def stock_template() -> tuple[str, int]:
    """The installed diffusers ``QwenImageEditPipeline``'s condition template and dropped-prefix length.

    Read from a component-less pipeline instance so metacot can never drift from the pipeline it exports to.

    Returns:
        ``(template, drop_idx)``: the template has one ``{}`` for the prompt; ``drop_idx`` is 64.
    """
    from diffusers import QwenImageEditPipeline

    pipe = QwenImageEditPipeline(None, None, None, None, None, None)  # type: ignore[arg-type]
    return pipe.prompt_template_encode, pipe.prompt_template_encode_start_idx


def system_prefix_length(tokenizer: Any) -> int:
    """Tokens of the stock template before the user turn's image (what the pipeline should drop: 64 on Qwen)."""
    template, _ = stock_template()
    ids = tokenizer(template.format("x"))["input_ids"]
    return ids.index(tokenizer.convert_tokens_to_ids("<|vision_start|>"))


def build_prompt(instruction: str, cot_text: str | None, *, include_instruction: bool = True) -> str:
    """Join an edit instruction and its Meta-CoT into the prompt string the condition encoder reads.

    THE one place this format is defined: training, sampling, export and ``metacot edit`` all call it, and an exported
    diffusers pipeline must be given exactly this string as ``prompt``. The format is::

        {instruction}                       # when cot_text is None (plain editing, the stock model's input)
        {instruction}\\nMeta-CoT:\\n{cot}     # instruction, a newline, the header line "Meta-CoT:", the rendered CoT
        Meta-CoT:\\n{cot}                    # include_instruction=False (ablation: the CoT alone conditions the edit)

    Leading/trailing whitespace of both parts is stripped; inner text is kept verbatim (the CoT is rendered by
    ``metacot.cot.render`` and must not be altered here).

    Args:
        instruction: the user's edit instruction.
        cot_text: the rendered Meta-CoT, or None for no reasoning.
        include_instruction: put the instruction before the CoT. False requires ``cot_text``.

    Returns:
        The prompt string.

    Raises:
        ValueError: the prompt would be empty (empty instruction without CoT, or ``include_instruction=False`` without
            CoT).
    """
    instruction = instruction.strip()
    cot = None if cot_text is None else cot_text.strip()
    if cot == "":
        raise ValueError("cot_text is empty; pass None for no Meta-CoT, or the rendered Meta-CoT text")
    if not include_instruction:
        if cot is None:
            raise ValueError("include_instruction=False needs cot_text: the prompt would be empty")
        return f"{COT_HEADER}\n{cot}"
    if not instruction:
        raise ValueError("instruction is empty; pass include_instruction=False to condition on the Meta-CoT alone")
    return instruction if cot is None else f"{instruction}\n{COT_HEADER}\n{cot}"


def _condition_texts(prompts: Sequence[str], with_image: Sequence[bool]) -> list[str]:
    template, _ = stock_template()
    no_image = template.replace(VISION_BLOCK, "")
    return [(template if keep else no_image).format(p) for p, keep in zip(prompts, with_image, strict=True)]


def _image_token_id(processor: Any) -> int:
    return processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")


def condition_token_count(processor: Any, image: Image.Image | None, prompt: str) -> int:
    """Number of condition tokens the MMDiT receives for one sample (after the dropped system prefix).

    Args:
        processor: the VLM processor.
        image: the source image (its tokens are counted), or None for the text-only condition.
        prompt: the prompt string (see :func:`build_prompt`).

    Returns:
        Tokens after the prefix: image tokens + prompt tokens + the template's closing tokens.
    """
    _, drop_idx = stock_template()
    inputs = processor(
        text=_condition_texts([prompt], [image is not None]), images=[image] if image is not None else None,
        return_tensors="pt",
    )
    return int(inputs["input_ids"].shape[1]) - drop_idx


def check_condition_budget(
    processor: Any, prompts: Sequence[str], *, max_text_tokens: int = DEFAULT_MAX_TEXT_TOKENS,
    names: Sequence[str] | None = None,
) -> list[int]:
    """Count the text tokens of each prompt's condition and refuse any over ``max_text_tokens``.

    Text tokens = condition tokens after the prefix without the image's tokens (prompt + template closing tokens).

    Args:
        processor: the VLM processor.
        prompts: prompt strings.
        max_text_tokens: the budget.
        names: one label per prompt for the error message (e.g. record ids); default: the index.

    Returns:
        The text-token count of every prompt.

    Raises:
        ConditionBudgetError: listing every prompt over the budget.
    """
    counts = condition_text_token_counts(processor, prompts)
    _raise_if_over(counts, max_text_tokens, names)
    return counts


def condition_text_token_counts(processor: Any, prompts: Sequence[str], *, with_image: bool = False) -> list[int]:
    """Text tokens of each prompt's condition after the system prefix (prompt + template closing tokens).

    The count the budget applies to; image tokens are left out (they scale with resolution, not with the CoT).
    ``with_image``: count as :func:`encode_conditions` does for a sample with its image, whose vision start / end
    markers are text tokens too.
    """
    _, drop_idx = stock_template()
    ids = processor.tokenizer(_condition_texts(prompts, [with_image] * len(prompts)))["input_ids"]
    pad = _image_token_id(processor)
    return [len(x) - x.count(pad) - drop_idx for x in ids]


def _raise_if_over(counts: Sequence[int], budget: int, names: Sequence[str] | None = None) -> None:
    over = [(names[i] if names else f"sample {i}", n) for i, n in enumerate(counts) if n > budget]
    if over:
        listed = ", ".join(f"{name}: {n}" for name, n in over[:10]) + (" ..." if len(over) > 10 else "")
        raise ConditionBudgetError(
            f"{len(over)} condition(s) exceed the text budget of {budget} tokens after the system prefix ({listed}); "
            f"shorten the Meta-CoT (fewer objects per scene, abbreviate kept objects) or raise max_text_tokens "
            f"(the stock pipeline's max_sequence_length is 512; going above it is untested on the real model)"
        )


def condition_inputs(
    processor: Any, images: Sequence[Image.Image], prompts: Sequence[str], drop_image: Sequence[bool],
) -> dict[str, torch.Tensor]:
    """The processor's batch for :func:`encode_conditions` (template, tokens, image patches), on the host.

    SFT calls it once per sample and CFG-dropout case at setup and collates the pieces per step
    (``metacot.sft.prepare``); padding follows the tokenizer's ``padding_side``.
    """
    kept = [img for img, d in zip(images, drop_image, strict=True) if not d]
    return dict(processor(text=_condition_texts(prompts, [not d for d in drop_image]), images=kept or None,
                          padding=True, return_tensors="pt"))


def encode_conditions(
    vlm: Any, processor: Any, images: Sequence[Image.Image], prompts: Sequence[str],
    drop_image: Sequence[bool] | None = None, *, max_text_tokens: int | None = DEFAULT_MAX_TEXT_TOKENS,
    inputs: dict[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode source images + prompts into the MMDiT condition, as the stock pipeline's ``encode_prompt`` does.

    Differentiable: gradients flow into ``vlm`` (full or LoRA) unless the caller wraps this in ``torch.no_grad()``.

    Args:
        vlm: the Qwen2.5-VL model (``...ForConditionalGeneration``, possibly PEFT-wrapped).
        processor: its processor (the pipeline's ``processor``).
        images: one source image per prompt (PIL RGB), at the size the edit runs at.
        prompts: prompt strings from :func:`build_prompt`.
        drop_image: per sample, True removes the image from the condition (the vision block is left out of the
            template; the system prefix is unchanged) for classifier-free-guidance dropout. Default: keep all.
        max_text_tokens: refuse samples with more text tokens after the prefix (None: no limit).
        inputs: :func:`condition_inputs` of exactly these images, prompts and drop flags, computed earlier (SFT's
            per-sample cache); the processor is then not run again.

    Returns:
        ``(embeds [B, L, D], mask [B, L])``: the VLM's last hidden states after the prefix, right-padded with zeros to
        the longest sample; ``mask`` is 1 for valid tokens (long). ``embeds`` has the VLM's dtype and device.

    Raises:
        ValueError: the lists have different lengths or are empty.
        ConditionBudgetError: a sample is over ``max_text_tokens``.
    """
    drop = list(drop_image) if drop_image is not None else [False] * len(prompts)
    if not prompts or len(images) != len(prompts) or len(drop) != len(prompts):
        raise ValueError(
            f"encode_conditions needs one image and one drop flag per prompt and at least one prompt; got "
            f"{len(images)} images, {len(prompts)} prompts, {len(drop)} drop flags"
        )
    _, drop_idx = stock_template()
    device = next(vlm.parameters()).device
    if inputs is None:
        inputs = condition_inputs(processor, images, prompts, drop)
    inputs = {k: v.to(device) for k, v in inputs.items()}
    mask = inputs["attention_mask"].bool()
    if max_text_tokens is not None:
        text_counts = (mask & (inputs["input_ids"] != _image_token_id(processor))).sum(1) - drop_idx
        _raise_if_over(text_counts.tolist(), max_text_tokens)
    # logits_to_keep=1: only the hidden states are needed; skips a [B, L, vocab] logits tensor on real models.
    outputs = vlm(
        input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
        pixel_values=inputs.get("pixel_values"), image_grid_thw=inputs.get("image_grid_thw"),
        output_hidden_states=True, logits_to_keep=1,
    )
    hidden = outputs.hidden_states[-1]
    # Each sample's valid tokens after the prefix, moved to the front and zero-padded: one gather for the batch
    # (a per-sample loop cost two device syncs per sample). A stable sort puts the valid positions first, in order.
    valid = mask.sum(1) - drop_idx
    length = int(valid.max())
    order = torch.sort((~mask).to(torch.uint8), dim=1, stable=True).indices[:, drop_idx:drop_idx + length]
    out_mask = (torch.arange(length, device=hidden.device)[None] < valid[:, None]).long()
    gathered = hidden.gather(1, order[..., None].expand(-1, -1, hidden.shape[-1]))
    embeds = torch.where(out_mask[..., None].bool(), gathered, gathered.new_zeros(()))
    return embeds, out_mask
