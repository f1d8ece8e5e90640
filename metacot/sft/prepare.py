"""Stage 1's per-sample inputs that never change between steps, computed once at setup (``data.preprocess``).

Without it a step spends most of its time on the host: the processor's chat template, tokenisation and image
processing for the LM batch and again for the conditions, and a VAE encode of every target and source (the VAE is
frozen and ``encode_latents`` takes the latent distribution's mode, so the latents are a fixed function of the image).
Here each sample gets, once: its LM chat (tokens, labels, image patches), the condition-encoder inputs of each
CFG-dropout case (prompt or ``NEGATIVE_PROMPT``, with or without the source image) and the latents of its target and
its source at the source latent size. A step then only pads and concatenates these (:func:`collate`, the same batch
the processor would build, bit for bit; tested) and runs the models.

Memory: latents stay on the device (tiny VAE at 64 px: 2 x 64 tokens x 64 channels per sample); processor outputs on
the host, the image patches shared between the cases of one image (about 90 kB per 64 px sample). At real scale
(512 px, one megapixel sources, 10^5-10^6 samples) that is far too much: :func:`prepare_dataset` refuses a cache
estimated above :data:`CACHE_BUDGET_BYTES` and says to set ``data.preprocess=false`` (the real-scale preset does),
where a step prepares its own batch as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from PIL import Image

from metacot.models.conditioning import NEGATIVE_PROMPT, condition_inputs
from metacot.models.loading import EditingModel
from metacot.models.sampler import encode_latents, resize_sources

# The cache of a run: host processor outputs + device latents. 64 px: ~2 GiB for 10,000 edits + 10,000 understanding
# samples (measured: 330 MiB for 1,844 + 1,844).
CACHE_BUDGET_BYTES = 16 * 2**30
# Keys of a processor batch that are per image rather than per token: concatenated, not padded.
IMAGE_KEYS = ("pixel_values", "image_grid_thw")
# The multimodal rotary positions of an LM chat, [3, 1, L] per sample (:func:`with_position_ids`).
POSITION_KEY = "position_ids"
# Condition inputs of each CFG-dropout case: (prompt replaced by NEGATIVE_PROMPT, image left out).
DROP_FLAGS = {"none": (False, False), "text": (True, False), "image": (False, True), "both": (True, True)}


@dataclass
class Prepared:
    """One edit or understanding sample's step-invariant inputs (every tensor with batch size 1).

    ``lm``: its part of an :func:`lm_batch` (tokens, labels, image patches; None when the LM loss does not read it);
    ``cond``: its :func:`metacot.models.conditioning.condition_inputs` per CFG-dropout case (None for understanding
    samples); ``target`` / ``context``: packed latents ``[N, C]`` / ``[N_ctx, C]`` on the VAE's device (None likewise).
    """

    lm: dict[str, torch.Tensor] | None = None
    cond: dict[str, dict[str, torch.Tensor]] | None = None
    target: torch.Tensor | None = None
    context: torch.Tensor | None = None


def chat_texts(processor: Any, user: str, assistant: str) -> tuple[str, str]:
    """The chat template of an (image, user, assistant) sample: (prompt with the generation prompt, full chat)."""
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": user}]}]
    prompt = processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    msgs = msgs + [{"role": "assistant", "content": [{"type": "text", "text": assistant}]}]
    return prompt, processor.apply_chat_template(msgs, tokenize=False)


def lm_batch(processor: Any, samples: list[tuple[Any, str, str]], device: torch.device) -> dict[str, torch.Tensor]:
    """Tokenise (image, user text, assistant text) chats; labels cover the assistant turn only.

    The prompt part's length is measured by tokenising the same chat without the assistant turn (with the
    generation prompt), so image-token expansion is identical in both.
    """
    full, prompts, images = [], [], []
    for image, user, assistant in samples:
        prompt, chat = chat_texts(processor, user, assistant)
        prompts.append(prompt)
        full.append(chat)
        images.append(image)
    tok = processor.tokenizer
    side = tok.padding_side
    tok.padding_side = "right"
    try:
        enc = processor(text=full, images=images, padding=True, return_tensors="pt")
        pre = processor(text=prompts, images=images, padding=True, return_tensors="pt")
    finally:
        tok.padding_side = side
    labels = enc["input_ids"].clone()
    prompt_lens = pre["attention_mask"].sum(dim=1)
    for i, n in enumerate(prompt_lens.tolist()):
        labels[i, :n] = -100
    labels[enc["attention_mask"] == 0] = -100
    enc["labels"] = labels
    return {k: v.to(device) for k, v in enc.items()}


def with_position_ids(vlm: Any, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``batch`` plus ``position_ids`` ``[3, B, L]``: the multimodal rotary positions the model's forward would
    compute from it (Qwen2-VL's ``get_rope_index``: a Python loop over the samples, ~70 operators per sample and step
    at the mini size), computed once at preprocessing instead. Positions of a sample's tokens do not depend on the
    other samples of the batch (padding is masked out; pads get 0, as ``get_rope_index`` gives them), so they are
    split and collated per sample like the tokens. A batch without images, or a model without ``get_rope_index``,
    is returned as it is (the forward then computes its positions itself).
    """
    owner = next((m for m in vlm.modules() if hasattr(type(m), "get_rope_index")), None)
    if owner is None or "image_grid_thw" not in batch or "mm_token_type_ids" not in batch:
        return batch
    with torch.no_grad():
        positions, _ = owner.get_rope_index(batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"],
                                            image_grid_thw=batch["image_grid_thw"],
                                            attention_mask=batch["attention_mask"])
    return {**batch, "position_ids": positions}


def split(batch: dict[str, torch.Tensor], side: str) -> list[dict[str, torch.Tensor]]:
    """The inverse of :func:`collate`: one processor batch (one image or none per sample) -> single samples."""
    length = batch["input_ids"].shape[1]
    patches = batch["image_grid_thw"].prod(-1).tolist() if "image_grid_thw" in batch else None
    items, offset = [], 0
    for i, n in enumerate(batch["attention_mask"].sum(1).tolist()):
        cols = slice(0, n) if side == "right" else slice(length - n, length)
        item = {k: v[i:i + 1, cols].clone() for k, v in batch.items() if k not in (*IMAGE_KEYS, POSITION_KEY)}
        if POSITION_KEY in batch:
            item[POSITION_KEY] = batch[POSITION_KEY][:, i:i + 1, cols].clone()
        if patches is not None:
            item["pixel_values"] = batch["pixel_values"][offset:offset + patches[i]].clone()
            item["image_grid_thw"] = batch["image_grid_thw"][i:i + 1].clone()
            offset += patches[i]
        items.append(item)
    return items


def collate(items: Sequence[dict[str, torch.Tensor]], pad_id: int, side: str = "right") -> dict[str, torch.Tensor]:
    """Batch single-sample processor outputs as ``processor(..., padding=True)`` batches them.

    Token keys ``[1, L_i]`` are padded to the longest on ``side`` (``input_ids`` with ``pad_id``, ``labels`` with
    -100, the rest with 0); image keys (:data:`IMAGE_KEYS`) are concatenated in sample order, as the processor lays
    out the patches of a batch. A key that no sample has is absent. One padding call per key (``pad_sequence``), not
    a copy per sample: a step at batch 256 collates about 1,000 such pieces.
    """
    from torch.nn.utils.rnn import pad_sequence

    out: dict[str, torch.Tensor] = {}
    for key in dict.fromkeys(k for x in items for k in x):
        parts = [x[key] for x in items if key in x]
        if key in IMAGE_KEYS:
            out[key] = torch.cat(parts)
            continue
        if key == POSITION_KEY:  # [3, 1, L_i] -> [3, B, L], pads 0; only when every sample has its positions
            if len(parts) == len(items):
                padded = pad_sequence([p[:, 0].T for p in parts], batch_first=True, padding_side=side)  # [B, L, 3]
                out[key] = padded.permute(2, 0, 1)
            continue
        fill = pad_id if key == "input_ids" else -100 if key == "labels" else 0
        out[key] = pad_sequence([p[0] for p in parts], batch_first=True, padding_value=fill, padding_side=side)
    return out


def prepare_dataset(data: Any, base: EditingModel, *, source_size: tuple[int, int], lm: bool, gen: bool,
                    no_cot: bool, batch: int = 64) -> int:
    """Fill ``prepared`` of every sample of ``data`` (an ``SFTDataset``); returns the cache's size in bytes.

    The processor and the VAE run on ``batch`` samples at a time (a processor call costs ~20 ms however small), and
    the batches are split back into samples (:func:`split`).

    Args:
        data: the dataset; its samples are changed in place.
        base: the loaded model (processor, VAE on its device).
        source_size: ``(height, width)`` of the source latents (``source_shape`` of the run).
        lm: the LM loss runs (otherwise ``lm`` stays None).
        gen: the generation loss runs (otherwise no condition inputs and latents).
        no_cot: the no-CoT baseline (the LM loss reads understanding samples only).
        batch: samples per processor and VAE call.

    Raises:
        MemoryError: the cache, estimated from the first batch, would exceed :data:`CACHE_BUDGET_BYTES`.
    """
    processor, cpu = base.processor, torch.device("cpu")
    side = processor.tokenizer.padding_side
    both = condition_inputs(processor, [None], [NEGATIVE_PROMPT], [True]) if gen else None  # same for every sample
    seen: set[int] = set()
    size = 0
    for start in range(0, len(data.edits), batch):
        chunk = data.edits[start:start + batch]
        prepared = [Prepared() for _ in chunk]
        if lm and not no_cot:
            chats = split(with_position_ids(base.vlm, lm_batch(
                processor, [(s.source, s.instruction, s.cot_text) for s in chunk], cpu)), "right")
            for p, chat in zip(prepared, chats, strict=True):
                p.lm = chat
        if gen:
            contexts = [_context(base, s.conditioning_image, source_size) for s in chunk]
            cases = {case: split(condition_inputs(
                processor, contexts, [NEGATIVE_PROMPT if no_text else s.condition_prompt for s in chunk],
                [no_image] * len(chunk)), side) for case, (no_text, no_image) in DROP_FLAGS.items() if case != "both"}
            targets, sources = encode_latents(base, [s.target for s in chunk]), encode_latents(base, contexts)
            for j, p in enumerate(prepared):
                p.cond = {**{case: items[j] for case, items in cases.items()}, "both": both}
                p.target, p.context = targets[j], sources[j]
                _share_pixels(p)
            size += targets.nbytes + sources.nbytes
        for s, p in zip(chunk, prepared, strict=True):
            s.prepared = p
            size += _nbytes(p, seen)
        if start == 0:
            _check_budget(size * len(data.edits) / len(chunk), len(data.edits))
    for start in range(0, len(data.understanding), batch):
        chunk = data.understanding[start:start + batch]
        chats = split(with_position_ids(base.vlm, lm_batch(
            processor, [(u.image, u.question, u.answer) for u in chunk], cpu)), "right") if lm else [None] * len(chunk)
        for u, chat in zip(chunk, chats, strict=True):
            u.prepared = Prepared(lm=chat)
            size += _nbytes(u.prepared, seen)
    return size


def _context(base: EditingModel, image: Image.Image, source_size: tuple[int, int]) -> Image.Image:
    """The source as the condition encoder and the VAE see it (as ``build_inputs`` resizes it)."""
    if image.size == (source_size[1], source_size[0]):
        return image
    return resize_sources(base, [image], *source_size)[0]


def _share_pixels(p: Prepared) -> None:
    """One copy of the image patches for the cases that show the same image (and the LM chat, when equal)."""
    ref = p.cond["none"]["pixel_values"]
    for d in (p.cond["text"], p.lm):
        if d is not None and "pixel_values" in d and torch.equal(d["pixel_values"], ref):
            d["pixel_values"] = ref


def _nbytes(p: Prepared, seen: set[int]) -> int:
    tensors = [t for d in (p.lm, *(p.cond or {}).values()) if d for t in d.values()]
    total = 0
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.nbytes
    return total


def _check_budget(estimate: float, n: int) -> None:
    if estimate > CACHE_BUDGET_BYTES:
        raise MemoryError(
            f"data.preprocess: caching the inputs of {n} samples would take about {estimate / 2**30:.1f} GiB of host "
            f"memory (budget {CACHE_BUDGET_BYTES / 2**30:.0f} GiB); set data.preprocess=false, which prepares each "
            f"step's batch on the fly (the real-scale presets do)")
