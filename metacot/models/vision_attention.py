"""One attention call per layer for the Qwen2-VL / Qwen2.5-VL vision tower, instead of one per image window.

The vision tower packs every image of a batch into one sequence and attends within each image (full-attention
layers) or each window of an image (Qwen2.5-VL's window layers), given as ``cu_seqlens``. Without the flash-attn
package transformers runs that as a Python loop: ``torch.split`` along the boundaries, then one SDPA call per piece
(``Qwen2_5_VLVisionAttention.forward``). The work is tiny per piece and the host cost is per piece, so small-scale
training, where a step carries hundreds of small images, spends its time launching kernels: the mini preset at batch
256 ran at 1.17 s a step with the H200 22 % busy (benchmarks/NOTES.md), and a CPU operator count per step grows by
about 1,400 operators per sample.

:func:`use_grouped_vision_attention` registers :func:`grouped_varlen_attention` with transformers'
``AttentionInterface`` and selects it for the vision tower only (the language model keeps its own attention). It
takes transformers' variable-length ("flash") calling convention (``cu_seq_lens_q``), groups the pieces by length
and runs ONE batched SDPA call per distinct length (usually one or two: all windows of same-sized images are equal).
The math is the same attention as the per-piece loop (tested against it, values and gradients); the registered name
has to contain ``flash`` because that is how transformers decides to pass ``cu_seqlens`` instead of looping.

Nothing of this is saved: the choice lives in ``config._attn_implementation`` of the loaded vision config, which
``save_pretrained`` leaves out of ``config.json`` (tested), so exported folders load anywhere.

The tower also computes, in every forward, each image's rotary position ids and window index in another Python loop
over the images (transformers' ``get_vision_position_ids`` / ``get_vision_window_index``: ~60 operators per image,
the largest per-sample cost left in a small-scale SFT step after the attention). :func:`use_uniform_grid_indices`
wraps the tower's forward: when every image of the call has the same patch grid (one resolution per run, as in SFT
and evaluation), those indices are computed by transformers' own functions for ONE image, tiled over the batch with
the per-image offsets, cached per (grid, count, device) and handed to the forward through the keyword arguments the
tower already accepts precomputed. Calls with mixed grids run the stock code. Tested equal to the stock indices.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F

NAME = "metacot_grouped_flash_varlen"  # must contain "flash": see the module docstring


def grouped_varlen_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None = None, *, scaling: float | None = None,
                             dropout: float = 0.0, cu_seq_lens_q: torch.Tensor | None = None,
                             cu_seq_lens_k: torch.Tensor | None = None, is_causal: bool = False,
                             **_: Any) -> tuple[torch.Tensor, None]:
    """Block-diagonal attention over packed pieces, one SDPA call per distinct piece length.

    Args:
        query, key, value: ``[1, H, T, D]`` (the vision tower's packed layout).
        cu_seq_lens_q / cu_seq_lens_k: ``[n + 1]`` piece boundaries (equal: self-attention within each piece).

    Returns:
        ``([1, T, H, D], None)``, as transformers' attention functions return.
    """
    if attention_mask is not None or is_causal or cu_seq_lens_q is None:
        raise ValueError("grouped_varlen_attention serves the vision tower's unmasked, non-causal packed attention "
                         "(cu_seq_lens_q given, no attention_mask); it was called for something else")
    if cu_seq_lens_k is not None and not torch.equal(cu_seq_lens_k, cu_seq_lens_q):
        raise ValueError("grouped_varlen_attention needs the same pieces for queries and keys")
    _, heads, total, dim = query.shape
    q, k, v = (t[0] for t in (query, key, value))  # [H, T, D]
    bounds = cu_seq_lens_q.tolist()  # one host sync per layer, as the per-piece loop's lengths.tolist()
    starts, lengths = bounds[:-1], [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    out = query.new_empty(heads, total, dim)
    for length in sorted(set(lengths)):
        if length == 0:
            continue
        first = [s for s, n in zip(starts, lengths) if n == length]
        if len(first) * length == total:  # every piece this long: a reshape, no gather
            idx = None
            qg, kg, vg = (t.reshape(heads, len(first), length, dim).transpose(0, 1) for t in (q, k, v))
        else:
            idx = (torch.tensor(first, device=query.device)[:, None]
                   + torch.arange(length, device=query.device)).reshape(-1)
            qg, kg, vg = (t[:, idx].reshape(heads, len(first), length, dim).transpose(0, 1) for t in (q, k, v))
        # dropout: the caller already passes 0 outside training (transformers' attention modules do)
        o = F.scaled_dot_product_attention(qg, kg, vg, dropout_p=dropout, scale=scaling)  # [n, H, L, D]
        o = o.transpose(0, 1).reshape(heads, -1, dim)
        if idx is None:
            out = o
        else:
            out[:, idx] = o
    return out.transpose(0, 1).unsqueeze(0), None


def _vision_configs(vlm: Any) -> list[Any]:
    """The vision tower configs of a (peft-wrapped) Qwen2-VL / Qwen2.5-VL model, [] when it has none."""
    seen, configs = set(), []
    for module in vlm.modules():
        cfg = getattr(module, "config", None)
        if cfg is not None and getattr(cfg, "model_type", "") in ("qwen2_5_vl_vision", "qwen2_vl_vision")\
                and hasattr(module, "blocks") and id(cfg) not in seen:
            seen.add(id(cfg))
            configs.append(cfg)
    return configs


def use_grouped_vision_attention(vlm: Any) -> int:
    """Route the vision tower's attention of ``vlm`` through :func:`grouped_varlen_attention`.

    A tower already on a flash-attention implementation is left alone. Returns the number of vision towers
    switched (0: none found, or all already on flash attention).
    """
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, grouped_varlen_attention)
    switched = 0
    for cfg in _vision_configs(vlm):
        current = getattr(cfg, "_attn_implementation", None) or "sdpa"
        if "flash" in current and current != NAME:
            continue
        cfg._attn_implementation = NAME
        switched += 1
    return switched


# Keys the tower's forward pops from its kwargs when precomputed (transformers.vision_utils / utils.generic).
_INDEX_KEYS = ("position_ids", "cu_seqlens", "max_seqlen", "window_index", "cu_window_seqlens", "max_window_seqlen")


def _tile(cu_one: torch.Tensor, n: int, step: int) -> torch.Tensor:
    """Cumulative boundaries of ``n`` copies of one image (``cu_one`` starts at 0), each ``step`` long."""
    offsets = torch.arange(n, device=cu_one.device, dtype=cu_one.dtype)[:, None] * step
    return torch.cat([cu_one[:1], (cu_one[1:][None] + offsets).reshape(-1)])


@functools.lru_cache(maxsize=64)
def uniform_grid_indices(tower: Any, grid: tuple[int, int, int], n: int, device: torch.device
                         ) -> dict[str, Any]:
    """The tower's per-forward indices for ``n`` images of patch grid ``grid`` (t, h, w), from one image's.

    Returns the kwargs of :data:`_INDEX_KEYS`, equal to what the tower's forward computes for the batch itself.
    """
    from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

    one = torch.tensor([grid], device=device)
    t, h, w = grid
    patches = t * h * w
    merged = patches // tower.spatial_merge_unit
    out: dict[str, Any] = {"position_ids": get_vision_position_ids(one, tower.spatial_merge_size).repeat(n, 1)}
    frames = torch.arange(t + 1, device=device, dtype=torch.int32) * (h * w)  # attention within each frame
    out["cu_seqlens"] = _tile(frames, n, patches)
    out["max_seqlen"] = h * w
    index, cu_window = get_vision_window_index(one, spatial_merge_size=tower.spatial_merge_size,
                                               window_size=tower.window_size, patch_size=tower.patch_size)
    index = index.to(device)
    out["window_index"] = (index[None] + torch.arange(n, device=index.device)[:, None] * merged).reshape(-1)
    out["cu_window_seqlens"] = _tile(cu_window.to(device), n, patches)
    out["max_window_seqlen"] = int((cu_window[1:] - cu_window[:-1]).max())
    return out


def _forward_with_uniform_indices(original: Any, tower: Any) -> Any:
    @functools.wraps(original)
    def forward(hidden_states: torch.Tensor, grid_thw: torch.Tensor, **kwargs: Any) -> Any:
        if not any(k in kwargs for k in _INDEX_KEYS):
            grids = grid_thw.tolist()  # one host sync per call (the stock loops make one per image)
            if grids and all(g == grids[0] for g in grids):
                kwargs.update(uniform_grid_indices(tower, tuple(int(x) for x in grids[0]), len(grids),
                                                   grid_thw.device))
        return original(hidden_states, grid_thw, **kwargs)

    forward.metacot_uniform_indices = True  # type: ignore[attr-defined]
    return forward


def use_uniform_grid_indices(vlm: Any) -> int:
    """Wrap the Qwen2.5-VL vision tower(s) of ``vlm`` so that same-grid batches use :func:`uniform_grid_indices`.

    Only Qwen2.5-VL towers (window attention) are wrapped; returns how many were (a second call wraps none).
    """
    wrapped = 0
    for module in vlm.modules():
        cfg = getattr(module, "config", None)
        if getattr(cfg, "model_type", "") != "qwen2_5_vl_vision" or not hasattr(module, "blocks"):
            continue
        if getattr(module.forward, "metacot_uniform_indices", False):
            continue
        module.forward = _forward_with_uniform_indices(module.forward, module)
        wrapped += 1
    return wrapped
