"""The prompt format and the condition encoder: identical to the stock pipeline's encode_prompt, differentiable."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest
import torch
from PIL import Image

from metacot.scenes import sample_scene_images
from metacot.models.conditioning import (
    COT_HEADER,
    ConditionBudgetError,
    build_prompt,
    check_condition_budget,
    condition_text_token_counts,
    condition_token_count,
    encode_conditions,
)

if TYPE_CHECKING:
    from tests.fixtures_models import TinyModels


@pytest.fixture(scope="module")
def pipe(tiny_models: TinyModels) -> Any:
    from diffusers import QwenImageEditPipeline

    return QwenImageEditPipeline.from_pretrained(tiny_models.pipeline)


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    return sample_scene_images(3, 32, seed=11)


PROMPTS = [
    "Make the red circle blue.",
    build_prompt("Remove the star.", "### Meta-task summary\nMeta-tasks: Remove\nTask: remove"),
    "x",
]


def test_build_prompt_format() -> None:
    assert build_prompt(" Remove the star. ", None) == "Remove the star."
    assert build_prompt("Remove the star.", "### A\nB\n") == f"Remove the star.\n{COT_HEADER}\n### A\nB"
    assert build_prompt("ignored", "### A", include_instruction=False) == f"{COT_HEADER}\n### A"
    with pytest.raises(ValueError, match="cot_text is empty"):
        build_prompt("Remove the star.", "  ")
    with pytest.raises(ValueError, match="needs cot_text"):
        build_prompt("Remove the star.", None, include_instruction=False)
    with pytest.raises(ValueError, match="instruction is empty"):
        build_prompt(" ", "### A")


def test_encode_conditions_equals_the_stock_encode_prompt(pipe: Any, images: list[Image.Image]) -> None:
    with torch.no_grad():
        embeds, mask = encode_conditions(pipe.text_encoder, pipe.processor, images, PROMPTS)
        ref_embeds, ref_mask = pipe.encode_prompt(PROMPTS, image=images, device="cpu")
    assert embeds.shape == ref_embeds.shape
    assert torch.equal(mask, ref_mask)
    assert torch.equal(embeds, ref_embeds)
    assert len(set(mask.sum(1).tolist())) == 3  # the prompts really have different lengths (padding exercised)


def test_batching_does_not_change_a_sample(pipe: Any, images: list[Image.Image]) -> None:
    with torch.no_grad():
        embeds, mask = encode_conditions(pipe.text_encoder, pipe.processor, images, PROMPTS)
        for i in range(3):
            alone, alone_mask = encode_conditions(
                pipe.text_encoder, pipe.processor, images[i : i + 1], PROMPTS[i : i + 1]
            )
            n = int(alone_mask.sum())
            assert int(mask[i].sum()) == n
            assert torch.allclose(embeds[i, :n], alone[0], atol=1e-5)
            assert torch.all(embeds[i, n:] == 0)


def test_drop_image_removes_only_that_samples_image(pipe: Any, images: list[Image.Image]) -> None:
    with torch.no_grad():
        embeds, mask = encode_conditions(pipe.text_encoder, pipe.processor, images[:2], PROMPTS[:2], [True, False])
        kept, kept_mask = encode_conditions(pipe.text_encoder, pipe.processor, images[:2], PROMPTS[:2])
        other_image = encode_conditions(pipe.text_encoder, pipe.processor, images[1:3], PROMPTS[:1] * 2, [True, True])
    image_tokens = condition_token_count(pipe.processor, images[0], PROMPTS[0]) - condition_token_count(
        pipe.processor, None, PROMPTS[0]
    )
    assert image_tokens == 6  # 4 image tokens + <|vision_start|> + <|vision_end|>
    assert int(mask[0].sum()) == int(kept_mask[0].sum()) - image_tokens
    n = int(mask[1].sum())
    assert torch.allclose(embeds[1, :n], kept[1, :n], atol=1e-5)  # the other sample keeps its image
    # Without its image a condition no longer depends on any image.
    assert torch.allclose(other_image[0][0], other_image[0][1], atol=1e-6)
    assert torch.allclose(embeds[0, : int(mask[0].sum())], other_image[0][0, : int(mask[0].sum())], atol=1e-5)


def test_gradients_reach_the_vlm_text_and_vision_weights(pipe: Any, images: list[Image.Image]) -> None:
    vlm = pipe.text_encoder
    vlm.zero_grad(set_to_none=True)
    embeds, mask = encode_conditions(vlm, pipe.processor, images[:2], PROMPTS[:2])
    (embeds * mask[..., None]).pow(2).sum().backward()
    grads = {n: p.grad for n, p in vlm.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any("visual" in n for n in grads) and any("language_model" in n for n in grads)
    vlm.zero_grad(set_to_none=True)


def test_token_counts_and_budget(pipe: Any, images: list[Image.Image]) -> None:
    processor = pipe.processor
    text = condition_text_token_counts(processor, PROMPTS)
    assert text == [condition_token_count(processor, None, p) for p in PROMPTS]
    assert condition_token_count(processor, images[0], PROMPTS[0]) == text[0] + 6
    long_prompt = build_prompt("Remove the star.", " ".join(["the large blue square is kept"] * 120))
    assert check_condition_budget(processor, PROMPTS) == text
    with pytest.raises(ConditionBudgetError, match=r"rec-2: \d+") as err:
        check_condition_budget(processor, [PROMPTS[0], long_prompt], names=["rec-1", "rec-2"])
    assert "rec-1" not in str(err.value)
    with pytest.raises(ConditionBudgetError, match="exceed the text budget of 10 tokens"):
        encode_conditions(pipe.text_encoder, processor, images[:1], PROMPTS[1:2], max_text_tokens=10)


def test_mismatched_lengths_are_refused(pipe: Any, images: list[Image.Image]) -> None:
    with pytest.raises(ValueError, match="one image and one drop flag per prompt"):
        encode_conditions(pipe.text_encoder, pipe.processor, images[:2], PROMPTS[:1])


def test_a_peft_wrapped_vlm_encodes_and_trains_its_adapter(pipe: Any, images: list[Image.Image]) -> None:
    import copy

    from peft import LoraConfig, get_peft_model

    base = copy.deepcopy(pipe.text_encoder)
    peft_vlm = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    embeds, mask = encode_conditions(peft_vlm, pipe.processor, images[:2], PROMPTS[:2])
    with torch.no_grad():
        plain, plain_mask = encode_conditions(base, pipe.processor, images[:2], PROMPTS[:2])
    assert torch.equal(mask, plain_mask)
    assert torch.allclose(embeds, plain, atol=1e-5)  # LoRA B starts at zero: same condition as the base model
    (embeds * mask[..., None]).pow(2).sum().backward()
    lora_grads = [p.grad for n, p in peft_vlm.named_parameters() if "lora_B" in n and p.grad is not None]
    assert lora_grads and any(g.abs().sum() > 0 for g in lora_grads)
