"""The editing backbone: one Qwen2.5-VL that writes the Meta-CoT and conditions a QwenImage MMDiT.

Modules:

- :mod:`~metacot.models.conditioning`: :func:`build_prompt` (THE instruction + Meta-CoT prompt format) and
  :func:`encode_conditions` (VLM hidden states exactly as the stock ``QwenImageEditPipeline`` computes them).
- :mod:`~metacot.models.loading`: :class:`EditingModel`, :func:`load_editing_model`, :func:`save_editing_model`
  (plain diffusers pipeline folders: tiny, the real Qwen-Image-Edit, a run's ``final/``).
- :mod:`~metacot.models.sampler`: metacot's explicit flow-matching edit loop and its pieces (latents, sigmas,
  velocity with batched true CFG), reused by Flow-GRPO.
- :mod:`~metacot.models.tiny` / :mod:`~metacot.models.tiny_vae`: tiny random local models for tests and CPU runs.
- :mod:`~metacot.models.cli`: ``metacot models tiny``.

Left out here: training (``metacot.sft``, ``metacot.flow_grpo``) and Meta-CoT generation/parsing (``metacot.cot``).
"""

from metacot.models.conditioning import (
    ConditionBudgetError,
    build_prompt,
    check_condition_budget,
    condition_token_count,
    encode_conditions,
)
from metacot.models.loading import (
    EditingModel,
    ModelFolderError,
    load_editing_model,
    save_editing_model,
)
from metacot.models.sampler import (
    decode_latents,
    edit,
    encode_latents,
    predict_velocity,
    sigma_schedule,
)

__all__ = [
    "ConditionBudgetError", "EditingModel", "ModelFolderError", "build_prompt", "check_condition_budget",
    "condition_token_count", "decode_latents", "edit", "encode_conditions", "encode_latents", "load_editing_model",
    "predict_velocity", "save_editing_model", "sigma_schedule",
]
