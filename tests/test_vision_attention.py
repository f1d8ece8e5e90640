"""The vision tower's grouped attention (metacot.models.vision_attention) against transformers' own per-piece loop."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from metacot.models.vision_attention import NAME, grouped_varlen_attention, use_grouped_vision_attention


def _load(tiny_models):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    vlm = AutoModelForImageTextToText.from_pretrained(tiny_models.vlm, dtype=torch.float32).eval()
    return vlm, AutoProcessor.from_pretrained(tiny_models.vlm)


def _vision_inputs(processor, sizes):
    images = [Image.new("RGB", size, (40 * i % 255, 90, 200 - 30 * i)) for i, size in enumerate(sizes)]
    for i, img in enumerate(images):  # some structure, so that attention weights are not uniform
        img.paste((255, 255, 0), (i, i, i + 9, i + 7))
    batch = processor.image_processor(images=images, return_tensors="pt")
    return batch["pixel_values"], batch["image_grid_thw"]


def _tower_output(vlm, pixels, grid):
    out = vlm.model.visual(pixels, grid_thw=grid)
    return out.pooler_output if hasattr(out, "pooler_output") else out


def _count_sdpa(monkeypatch) -> list[int]:
    calls = [0]
    real = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    return calls


def test_grouped_attention_is_the_per_piece_loop_with_fewer_calls(tiny_models, monkeypatch) -> None:
    """Images of three sizes (pieces of several lengths, windows cut at image edges): the tower's output and the
    gradients of its parameters equal transformers' per-piece loop; SDPA runs once per distinct piece length."""
    vlm, processor = _load(tiny_models)
    pixels, grid = _vision_inputs(processor, [(56, 56), (56, 56), (112, 84), (28, 56)])
    calls = _count_sdpa(monkeypatch)

    def run():
        vlm.zero_grad(set_to_none=True)
        out = _tower_output(vlm, pixels, grid)
        (out.pow(2).sum() + out.sum()).backward()
        grads = {n: p.grad.clone() for n, p in vlm.model.visual.named_parameters() if p.grad is not None}
        return out.detach(), grads

    calls[0] = 0
    ref, ref_grads = run()
    loop_calls = calls[0]
    assert use_grouped_vision_attention(vlm) == 1
    assert vlm.model.visual.config._attn_implementation == NAME
    assert vlm.config.text_config._attn_implementation != NAME, "the language model keeps its attention"
    calls[0] = 0
    got, got_grads = run()
    assert torch.allclose(got, ref, atol=1e-5, rtol=1e-4), (got - ref).abs().max()
    assert ref_grads.keys() == got_grads.keys() and len(ref_grads) > 5
    for name, g in ref_grads.items():
        assert torch.allclose(got_grads[name], g, atol=1e-5, rtol=1e-4), name
    assert calls[0] < loop_calls / 2, (calls[0], loop_calls)


def test_equal_pieces_take_one_call_and_mixed_pieces_are_gathered() -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 10, 4) for _ in range(3))

    def loop(bounds):
        outs = [F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b]) for a, b in
                zip(bounds[:-1], bounds[1:]) if b > a]
        return torch.cat(outs, dim=2).transpose(1, 2)

    for bounds in ([0, 5, 10], [0, 3, 3, 7, 10, 10], [0, 10], [0, 2, 4, 7, 9, 10]):
        got, none = grouped_varlen_attention(None, q, k, v, cu_seq_lens_q=torch.tensor(bounds),
                                             cu_seq_lens_k=torch.tensor(bounds))
        assert none is None and got.shape == (1, 10, 2, 4)
        assert torch.allclose(got, loop(bounds), atol=1e-6), bounds
    with pytest.raises(ValueError, match="unmasked, non-causal"):
        grouped_varlen_attention(None, q, k, v, attention_mask=torch.ones(1, 1, 10, 10, dtype=torch.bool),
                                 cu_seq_lens_q=torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="same pieces"):
        grouped_varlen_attention(None, q, k, v, cu_seq_lens_q=torch.tensor([0, 10]),
                                 cu_seq_lens_k=torch.tensor([0, 5, 10]))


def test_a_saved_model_does_not_carry_the_choice(tiny_models, tmp_path) -> None:
    """save_pretrained after switching writes no custom attention name: the folder loads in a plain process."""
    from transformers import AutoModelForImageTextToText

    vlm, _ = _load(tiny_models)
    use_grouped_vision_attention(vlm)
    vlm.save_pretrained(tmp_path / "vlm")
    assert NAME not in (tmp_path / "vlm" / "config.json").read_text()
    json.loads((tmp_path / "vlm" / "config.json").read_text())
    again = AutoModelForImageTextToText.from_pretrained(tmp_path / "vlm")
    assert again.model.visual.config._attn_implementation != NAME


def test_uniform_grid_indices_equal_the_stock_per_image_loop(tiny_models) -> None:
    """Same-grid batches: the tiled indices equal transformers' own (position ids, window index, both boundary
    lists), the tower's output and gradients are unchanged, and a mixed-grid batch runs the stock code."""
    from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids, get_vision_window_index

    from metacot.models.vision_attention import uniform_grid_indices, use_uniform_grid_indices

    vlm, processor = _load(tiny_models)
    use_grouped_vision_attention(vlm)
    tower = vlm.model.visual
    for sizes in ([(56, 56)] * 3, [(112, 112)] * 5, [(112, 84)] * 2):
        pixels, grid = _vision_inputs(processor, sizes)
        got = uniform_grid_indices(tower, tuple(grid[0].tolist()), len(sizes), grid.device)
        index, cu_window = get_vision_window_index(grid, tower.spatial_merge_size, tower.window_size,
                                                   tower.patch_size)
        assert torch.equal(got["position_ids"], get_vision_position_ids(grid, tower.spatial_merge_size))
        assert torch.equal(got["cu_seqlens"], get_vision_cu_seqlens(grid))
        assert torch.equal(got["window_index"], index)
        assert torch.equal(got["cu_window_seqlens"], cu_window)
        assert got["max_window_seqlen"] == int((cu_window[1:] - cu_window[:-1]).max())

    def run(pixels, grid):
        vlm.zero_grad(set_to_none=True)
        out = _tower_output(vlm, pixels, grid)
        out.pow(2).sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in tower.named_parameters() if p.grad is not None}

    same = _vision_inputs(processor, [(112, 112)] * 4)
    mixed = _vision_inputs(processor, [(56, 56), (112, 84)])
    ref_same, ref_mixed = run(*same), run(*mixed)
    assert use_uniform_grid_indices(vlm) == 1 and use_uniform_grid_indices(vlm) == 0
    for ref, inputs, tiled in ((ref_same, same, True), (ref_mixed, mixed, False)):
        calls = uniform_grid_indices.cache_info()
        out, grads = run(*inputs)
        after = uniform_grid_indices.cache_info()
        assert (after.hits + after.misses > calls.hits + calls.misses) == tiled
        assert torch.allclose(out, ref[0], atol=1e-6), (out - ref[0]).abs().max()
        assert grads.keys() == ref[1].keys()
        assert all(torch.allclose(grads[n], g, atol=1e-6) for n, g in ref[1].items())
