"""Stage 1 SFT configuration (``metacot sft --config FILE key=value ...``).

Every field is documented where it is declared; ``__post_init__`` refuses inconsistent combinations and says why.
Presets: ``metacot/configs/sft_tiny.yaml`` (CPU, tiny models) and ``sft_qwen_image_edit.yaml`` (real scale).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING

from metacot.config import check
from metacot.training import ExpertConfig, LoRAConfig, TrainConfig

# Attention projections of Qwen2.5-VL's language model (the vision tower uses other names, so it stays untouched).
VLM_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
# Image- and text-stream attention projections of the QwenImage MMDiT.
MMDIT_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


@dataclass
class SFTData:
    train: str = MISSING  # JSONL of edit + understanding records (metacot.cot.schema)
    resolution: int = 32  # images are resized to resolution x resolution (must be a multiple of 16)
    # Pixel area at which source images are VAE-encoded as the edit context: 0 = the output size (resolution^2);
    # 1048576 = the stock QwenImageEditPipeline (about one megapixel whatever the output size; the real-weights
    # presets use it). Stage 2 must use Stage 1's value (recorded in final/metacot.json).
    source_area: int = 0
    # Understanding samples per edit sample in each step (0 = no understanding data in the mix).
    understanding_ratio: float = 0.25
    # What to do with a sample whose condition (instruction + Meta-CoT) exceeds the encoder's token budget:
    # "error" stops before training with the list of offending ids; "skip" drops them, counted and logged.
    on_overlong: str = "error"
    max_condition_tokens: int = 512  # the stock QwenImageEditPipeline encodes at most 512 prompt tokens
    # Tokenise, process and VAE-encode every sample once at setup instead of in every step (metacot/sft/prepare.py;
    # 10x faster steps with tiny models). About 100 kB per sample at 64 px; at real scale (512 px, 1 MP sources,
    # 10^5+ samples) it cannot fit: set false there, as sft_qwen_image_edit.yaml does.
    preprocess: bool = True


@dataclass
class CFGDropout:
    """Condition dropout for classifier-free guidance; each sample draws at most one of the three."""

    text: float = 0.1  # instruction and CoT replaced by the empty prompt; source image kept
    image: float = 0.05  # source-image context latents and the VLM's image removed; text kept
    both: float = 0.05  # unconditional: no text, no image

    def __post_init__(self) -> None:
        probs = (self.text, self.image, self.both)
        check(all(0 <= p <= 1 for p in probs) and sum(probs) <= 1, "cfg_dropout",
              f"probabilities must be in [0, 1] and sum to at most 1 (got {probs}): each sample draws one case")


@dataclass
class SFTConfig:
    model: str = MISSING  # pipeline folder: tiny (metacot models tiny) or Qwen-Image-Edit, or a run's final/
    output_dir: str = MISSING  # the run folder
    data: SFTData = field(default_factory=SFTData)
    train: TrainConfig = field(default_factory=TrainConfig)
    understanding: ExpertConfig = field(default_factory=lambda: ExpertConfig(
        mode="lora", lr=1e-4, lora=LoRAConfig(r=8, alpha=16, target_modules=list(VLM_LORA_TARGETS))))
    generation: ExpertConfig = field(default_factory=lambda: ExpertConfig(
        mode="lora", lr=1e-4, lora=LoRAConfig(r=8, alpha=16, target_modules=list(MMDIT_LORA_TARGETS))))
    # With a LoRA-tuned VLM: encode the generation conditions with the adapter on (the tuned VLM conditions the
    # MMDiT, as in the method) or off (the stock encoder stays exact, without a second copy of the VLM).
    condition_with_adapter: bool = True
    # Let the flow-matching loss back-propagate into the VLM through the conditions (joint training).
    train_vlm_through_conditions: bool = True
    batch_size: int = 8  # edit samples per optimizer step, over all processes
    micro_batch_size: int = 8  # edit samples per process per forward; batch_size / (micro x world) = accumulation
    und_loss_weight: float = 1.0  # weight of the understanding expert's next-token loss
    gen_loss_weight: float = 1.0  # weight of the generation expert's flow-matching loss
    no_cot: bool = False  # the no-CoT baseline: instruction only in the condition, no CoT loss (same data/params)
    include_instruction: bool = True  # False: the generator sees only the CoT, not the (complex) instruction
    cfg_dropout: CFGDropout = field(default_factory=CFGDropout)
    timestep_sampling: str = "logit_normal"  # "logit_normal" (SD3-style) or "uniform" over sigma in (0, 1)
    logit_mean: float = 0.0
    logit_std: float = 1.0
    # sigma -> shift*sigma / (1 + (shift-1)*sigma); >1 favours noisier steps. 0 = the sampler's own shift at the
    # training resolution (metacot.models.sampler.sampler_shift), so training sees the noise levels sampling starts
    # from: without it, logit-normal draws put ~1.4% of samples above sigma 0.9 while every edit starts at sigma 1,
    # and the velocity error there was the largest (shared/notes/learning-investigation.md).
    timestep_shift: float = 0.0
    # Extra weight of the flow-matching loss on the latent tokens the edit changes (where the target's latent differs
    # from the source's by more than EDIT_TOKEN_THRESHOLD): weight 1 + edit_region_weight there, 1 elsewhere, and
    # the loss is the weighted mean per sample. At 32 px (16 tokens) an add changes about a quarter of the tokens, a
    # remove or replace about 3/8; the rest is learnt by copying the source, which the plain loss rewards as much as
    # the edit itself (README, "Stage 1 SFT"). 0 = the plain loss.
    # Needs the source latents at the output size (data.source_area=0).
    edit_region_weight: float = 0.0

    def __post_init__(self) -> None:
        check(self.batch_size > 0 and self.micro_batch_size > 0, "batch_size", "must be positive")
        check(self.batch_size % self.micro_batch_size == 0, "batch_size",
              f"({self.batch_size}) must be a multiple of micro_batch_size ({self.micro_batch_size}); the remainder "
              f"would be silently dropped from every step")
        check(self.understanding.trainable or self.generation.trainable, "understanding.mode / generation.mode",
              "both experts are frozen: nothing would train")
        self.understanding.check_mmdit_only("understanding")
        check(self.data.resolution % 16 == 0, "data.resolution", "must be a multiple of 16 (VAE x packing)")
        check(self.data.understanding_ratio >= 0, "data.understanding_ratio", "must be >= 0")
        check(self.data.source_area >= 0, "data.source_area", "must be 0 (the output size) or a pixel area")
        check(self.data.on_overlong in {"error", "skip"}, "data.on_overlong", "use error or skip")
        check(self.timestep_sampling in {"logit_normal", "uniform"}, "timestep_sampling",
              "use logit_normal or uniform")
        check(self.timestep_shift >= 0, "timestep_shift", "must be > 0, or 0 for the sampler's own shift")
        check(not (self.no_cot and not self.include_instruction), "include_instruction",
              "cannot be false together with no_cot=true: the condition would hold neither instruction nor CoT")
        check(self.edit_region_weight >= 0, "edit_region_weight", "must be >= 0 (0 = the plain loss)")
        check(self.edit_region_weight == 0 or self.data.source_area == 0, "edit_region_weight",
              "needs the source latents at the output size to find the changed tokens: set data.source_area=0 or "
              "edit_region_weight=0")
        check(self.und_loss_weight >= 0 and self.gen_loss_weight >= 0, "und_loss_weight / gen_loss_weight",
              "must be >= 0")
