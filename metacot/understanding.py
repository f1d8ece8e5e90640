"""The understanding expert writes the Meta-CoT: greedy generation from (source image, instruction).

Used wherever the model reasons before editing: Flow-GRPO rollouts with ``data.cot_source=model``, ``metacot edit``
and evaluation. The chat is the one the expert was trained on in Stage 1 (``metacot.sft.trainer.lm_batch``): a user
turn with the image and the instruction; the assistant turn is the rendered Meta-CoT. Output is parsed leniently:
a model's CoT that misses a section still yields what it has, with the problems listed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from PIL import Image

from metacot.cot import parse_lenient
from metacot.cot.format import LenientResult


@dataclass
class WrittenCoT:
    text: str  # the raw generated text
    parsed: LenientResult  # what parse_lenient recovered (``parsed.cot`` may be None)


def user_chat(processor: Any, instruction: str) -> str:
    """The prompt text of the understanding expert's chat (image + instruction, open assistant turn)."""
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]
    return processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


@torch.no_grad()
def write_cots(vlm: Any, processor: Any, images: Sequence[Image.Image], instructions: Sequence[str], *,
               max_new_tokens: int = 384) -> list[WrittenCoT]:
    """Greedy-decode a Meta-CoT for each (image, instruction); batched with left padding."""
    tok = processor.tokenizer
    side = tok.padding_side
    tok.padding_side = "left"  # generation continues from the right edge of every row
    try:
        inputs = processor(text=[user_chat(processor, i) for i in instructions], images=list(images),
                           padding=True, return_tensors="pt").to(next(vlm.parameters()).device)
    finally:
        tok.padding_side = side
    out = vlm.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                       pad_token_id=tok.pad_token_id, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"))
    texts = tok.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return [WrittenCoT(t.strip(), parse_lenient(t)) for t in texts]
