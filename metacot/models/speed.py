"""Speed options of the generation expert (the QwenImage MMDiT), set from ``ExpertConfig``.

Measured on one H100 at full size in ``benchmarks/NOTES.md``; each option keeps the math of the plain model:

* :func:`set_block_checkpointing`: recompute only the first ``k`` MMDiT blocks in backward. Activations of the
  others stay in memory, so ``k`` can be the fewest blocks that make a step fit instead of all 60 (diffusers'
  own switch is all or nothing).
* :func:`fuse_lora_for_inference`: forwards without autograd (rollout sampling, evaluation, the KL reference's
  adapter-disabled pass stays as it is) run each LoRA layer as ONE matmul with ``W + scale * B @ A`` formed on the
  fly, instead of peft's base matmul plus two skinny adapter matmuls and an add over the whole activation. Forwards
  with autograd keep peft's path, so adapter gradients are unchanged.
* :func:`compile_blocks`: ``torch.compile`` each MMDiT block in place (regional compilation: one block's graph,
  reused by all 60; parameter names and checkpoints are unchanged).
* :func:`set_attention_backend`: a diffusers attention backend, e.g. ``_native_cudnn`` (cuDNN's fused attention
  through PyTorch's SDPA) or ``_native_flash``; empty keeps diffusers' default.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F


def diffusers_transformer(module: Any) -> Any:
    """The diffusers MMDiT inside DDP / DeepSpeed / peft wrappers (``module.module``, ``get_base_model()``)."""
    module = getattr(module, "module", module)
    return module.get_base_model() if hasattr(module, "get_base_model") else module


def set_block_checkpointing(module: Any, blocks: int | None) -> int:
    """Recompute the first ``blocks`` transformer blocks in backward (None = all, 0 = none); returns the count.

    Which blocks are recomputed does not change peak memory (every stored activation is alive when backward
    starts), only how many; the first ``k`` are chosen.
    """
    model = diffusers_transformer(module)
    all_blocks = list(model.transformer_blocks)
    k = len(all_blocks) if blocks is None else blocks
    if not 0 <= k <= len(all_blocks):
        raise ValueError(f"checkpoint_blocks={blocks}: the model has {len(all_blocks)} transformer blocks; "
                         f"use 0..{len(all_blocks)} (or leave it unset to checkpoint all)")
    if k == 0:
        model.disable_gradient_checkpointing()
        return 0
    chosen = {id(b) for b in all_blocks[:k]}

    def selective(block: torch.nn.Module, *args: Any) -> Any:
        if id(block) in chosen:
            return torch.utils.checkpoint.checkpoint(block.__call__, *args, use_reentrant=False)
        return block(*args)

    model.enable_gradient_checkpointing(gradient_checkpointing_func=selective)
    return k


def _lora_layers(module: torch.nn.Module) -> list[Any]:
    from peft.tuners.lora import Linear as LoraLinear

    return [m for m in module.modules() if isinstance(m, LoraLinear)]


def _fused_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """peft ``lora.Linear.forward`` with one matmul over ``W + sum(scale * B @ A)`` when nothing needs grads."""
    base = self.base_layer
    weight = base.weight
    active = [name for name in self.active_adapters if name in self.lora_A]
    if (torch.is_grad_enabled() or args or kwargs or self.disable_adapters or self.merged or self.fan_in_fan_out
            or self.lora_variant or any(self.lora_bias.get(n, False) for n in active)
            or weight.numel() == 0 or hasattr(weight, "ds_id")
            or not isinstance(base, torch.nn.Linear)
            or (self.training and not all(isinstance(self.lora_dropout[n], torch.nn.Identity) for n in active))):
        # Autograd needs peft's factored path (adapter gradients); ZeRO-3 partitions weights (ds_id, empty until
        # its hooks gather them); variants (DoRA), a bias on B (lora_bias) and active dropout change the function.
        return self._metacot_peft_forward(x, *args, **kwargs)
    merged = weight
    for name in active:
        b, a = self.lora_B[name].weight, self.lora_A[name].weight
        merged = torch.addmm(merged, b.to(weight.dtype), a.to(weight.dtype), alpha=self.scaling[name])
    return F.linear(x, merged, base.bias)


def fuse_lora_for_inference(module: torch.nn.Module) -> int:
    """Patch every peft LoRA ``Linear`` in ``module`` so that no-grad forwards use the merged weight.

    The merged weight ``W + scale * B @ A`` is formed per call in the base weight's dtype (one ``addmm`` that reads
    and writes the weight once) and never stored: the base weights stay untouched, so nothing drifts over many
    rollouts. Returns the number of layers patched; calling it again patches nothing new.
    """
    n = 0
    for layer in _lora_layers(module):
        if hasattr(layer, "_metacot_peft_forward"):
            continue
        layer._metacot_peft_forward = layer.forward
        layer.forward = types.MethodType(_fused_forward, layer)
        n += 1
    return n


COMPILE_VARIANTS = 64  # recompile limit of the shared block frame (see compile_blocks)


def compile_blocks(module: Any, **options: Any) -> int:
    """``torch.compile`` each transformer block in place; returns the number of blocks compiled.

    In place (``nn.Module.compile``) keeps parameter names, so checkpoints, exports and peft see the same model.
    """
    model = diffusers_transformer(module)
    blocks = list(model.transformer_blocks)
    # All blocks share one compiled frame, so its recompile limit (8 by default) counts every variant the trainers
    # need: grad / no-grad (rollout, eval), checkpointed / not, the rollout and training batch sizes, adapters on /
    # off. Past the limit dynamo silently runs the blocks eagerly; the limit is raised so that does not happen.
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), COMPILE_VARIANTS))
    for block in blocks:
        block.compile(**options)
    return len(blocks)


def set_attention_backend(module: Any, backend: str) -> None:
    """Route the MMDiT's attention through a diffusers backend (see ``diffusers.models.attention_dispatch``)."""
    if not backend:
        return
    from diffusers.models.attention_dispatch import AttentionBackendName

    names = sorted(b.value for b in AttentionBackendName)
    if backend not in names:
        raise ValueError(f"attention_backend={backend!r} is not a diffusers attention backend; use one of {names} "
                         f"(or leave it empty for diffusers' default)")
    diffusers_transformer(module).set_attention_backend(backend)


def apply_speed_options(module: Any, cfg: Any) -> dict[str, Any]:
    """Apply an ``ExpertConfig``'s speed options to the MMDiT (after peft wrapping); returns what was applied."""
    applied: dict[str, Any] = {}
    if cfg.gradient_checkpointing and cfg.trainable:
        applied["checkpoint_blocks"] = set_block_checkpointing(module, cfg.checkpoint_blocks)
    if cfg.fused_lora_inference and cfg.mode == "lora":
        applied["fused_lora_layers"] = fuse_lora_for_inference(module)
    if cfg.attention_backend:
        set_attention_backend(module, cfg.attention_backend)
        applied["attention_backend"] = cfg.attention_backend
    if cfg.compile:
        applied["compiled_blocks"] = compile_blocks(module)
    return applied
