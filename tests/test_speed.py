"""Speed options of the generation expert (metacot.models.speed) compute the same function as the plain model,
and the source-latent area (the stock pipeline's one megapixel) reaches the MMDiT with the right grid."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import require
from metacot.config import ConfigError, load_config
from metacot.models import speed
from metacot.models.loading import load_editing_model
from metacot.models.sampler import STOCK_SOURCE_AREA, encode_latents, predict_velocity, source_shape
from metacot.training import ExpertConfig, LoRAConfig, prepare_expert

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "to_add_out", "img_mlp.net.0.proj", "img_mlp.net.2"]


def _policy(tiny_models, seed: int = 0):
    """The tiny MMDiT (fp32) with LoRA adapters whose B factors are random, so the adapters change the output."""
    model = load_editing_model(tiny_models.pipeline)
    torch.manual_seed(seed)
    policy = prepare_expert(model.transformer, ExpertConfig(mode="lora", lora=LoRAConfig(r=4, alpha=8,
                                                                                         target_modules=TARGETS)), [])
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model, policy


def _inputs(model, batch: int = 2, text: int = 10, grid: int = 8, seed: int = 1) -> dict:
    gen = torch.Generator().manual_seed(seed)
    cfg = model.transformer.config
    x = torch.randn(batch, 2 * grid * grid, cfg.in_channels, generator=gen)
    return {"hidden_states": x, "timestep": torch.full((batch,), 0.7),
            "encoder_hidden_states": torch.randn(batch, text, cfg.joint_attention_dim, generator=gen),
            "encoder_hidden_states_mask": None, "img_shapes": [[(1, grid, grid), (1, grid, grid)]] * batch,
            "return_dict": False}


def _out(policy, inputs: dict) -> torch.Tensor:
    return policy(**inputs)[0]


def test_fused_lora_inference_is_the_same_function(tiny_models) -> None:
    model, policy = _policy(tiny_models)
    inputs = _inputs(model)
    with torch.no_grad():
        peft_out = _out(policy, inputs)
        with policy.disable_adapter():
            base_out = _out(policy, inputs)
    base_weights = {k: v.clone() for k, v in policy.state_dict().items() if "base_layer" in k}
    grad_ref = _out(policy, inputs)
    assert speed.fuse_lora_for_inference(policy) == 2 * len(TARGETS)  # two blocks
    assert speed.fuse_lora_for_inference(policy) == 0, "patching twice changes nothing"
    with torch.no_grad():
        fused = _out(policy, inputs)
        with policy.disable_adapter():
            fused_base = _out(policy, inputs)
    assert not torch.allclose(peft_out, base_out, atol=1e-3), "the adapters matter in this test"
    assert torch.allclose(fused, peft_out, rtol=1e-5, atol=1e-5), (fused - peft_out).abs().max()
    assert torch.equal(fused_base, base_out), "disabled adapters run the base layers alone"
    # With autograd the factored peft path runs: the same graph, the same adapter gradients.
    out = _out(policy, inputs)
    assert torch.equal(out, grad_ref)
    out.square().mean().backward()
    # (Image-stream adapters: the last block's text stream feeds nothing, so its adapters get no gradient.)
    image_stream = [p for n, p in policy.named_parameters() if "lora_A" in n and ".attn.add_" not in n
                    and "to_add_out" not in n]
    assert image_stream and all(p.grad is not None and p.grad.abs().sum() > 0 for p in image_stream)
    for _ in range(3):
        with torch.no_grad():
            _out(policy, inputs)
    assert all(torch.equal(v, policy.state_dict()[k]) for k, v in base_weights.items()), \
        "the merged weight is formed per call; the base weights never change"


def test_fused_lora_in_bf16_with_fp32_adapters_under_autocast(tiny_models) -> None:
    """The GPU path without DeepSpeed: bf16 base weights, peft's fp32 adapters, bf16 autocast. Both paths round to
    bf16; the fused one must stay as close to a float64 reference as peft's own."""
    model, policy = _policy(tiny_models)
    inputs = _inputs(model)
    with torch.no_grad():
        reference = _out(policy.double(), {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v
                                           for k, v in inputs.items()})
    policy.float()
    for name, p in policy.named_parameters():
        if "lora_" not in name:
            p.data = p.data.to(torch.bfloat16)
    assert {p.dtype for n, p in policy.named_parameters() if "lora_" in n} == {torch.float32}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        peft_out = _out(policy, inputs).double()
        speed.fuse_lora_for_inference(policy)
        fused = _out(policy, inputs).double()
    err = lambda out: float((out - reference).norm() / reference.norm())  # noqa: E731
    assert err(peft_out) < 2e-2 and err(fused) < 2e-2, (err(peft_out), err(fused))
    assert err(fused) < 2 * err(peft_out) + 1e-3


def test_fused_path_falls_back_to_peft_with_a_lora_bias(tiny_models) -> None:
    from peft import LoraConfig, get_peft_model

    model = load_editing_model(tiny_models.pipeline)
    policy = get_peft_model(model.transformer.requires_grad_(False),
                            LoraConfig(r=4, lora_alpha=8, target_modules=["to_q"], lora_bias=True))
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    inputs = _inputs(model)
    with torch.no_grad():
        before = _out(policy, inputs)
        speed.fuse_lora_for_inference(policy)
        after = _out(policy, inputs)
    assert torch.equal(before, after), "a bias on B is not part of W + s B A: peft's path must run"


def test_fused_path_falls_back_to_peft_with_active_dropout(tiny_models) -> None:
    model = load_editing_model(tiny_models.pipeline)
    policy = prepare_expert(model.transformer, ExpertConfig(mode="lora", lora=LoRAConfig(
        r=4, alpha=8, dropout=0.5, target_modules=["to_q"])), [])
    speed.fuse_lora_for_inference(policy)
    layer = next(m for m in policy.modules() if hasattr(m, "_metacot_peft_forward"))
    calls = []
    original = layer._metacot_peft_forward
    layer._metacot_peft_forward = lambda *a, **k: calls.append(1) or original(*a, **k)
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        policy.train()
        layer(x)
        assert calls == [1], "dropout in training mode is part of the function: peft's path runs"
        policy.eval()
        layer(x)
        assert calls == [1], "in eval mode dropout is off and the merged matmul runs"


def test_block_checkpointing_recomputes_exactly_the_first_k_blocks(tiny_models) -> None:
    model, policy = _policy(tiny_models)
    inputs = _inputs(model)
    blocks = list(speed.diffusers_transformer(policy).transformer_blocks)
    calls = [0] * len(blocks)
    for i, block in enumerate(blocks):
        block.register_forward_pre_hook(lambda *_a, i=i: calls.__setitem__(i, calls[i] + 1))

    def grads(k: int) -> list[torch.Tensor]:
        policy.zero_grad(set_to_none=True)
        calls[:] = [0] * len(blocks)
        assert speed.set_block_checkpointing(policy, k) == (len(blocks) if k is None else k)
        policy.train()
        _out(policy, inputs).square().mean().backward()
        return [p.grad.clone() for p in policy.parameters() if p.grad is not None]

    plain = grads(0)
    assert calls == [1, 1]
    first = grads(1)
    assert calls == [2, 1], "block 0 ran again in backward, block 1 kept its activations"
    every = grads(None)
    assert calls == [2, 2]
    assert len(plain) == len(first) == len(every) > 0
    for a, b, c in zip(plain, first, every):
        assert torch.allclose(a, b, atol=1e-6) and torch.allclose(a, c, atol=1e-6)
    with pytest.raises(ValueError, match="checkpoint_blocks=3: the model has 2 transformer blocks"):
        speed.set_block_checkpointing(policy, 3)


@pytest.mark.slow
def test_compiled_blocks_match_eager_and_keep_parameter_names(tiny_models) -> None:
    require(shutil.which("g++") is not None, "g++ (torch.compile's CPU code generation)")
    model, policy = _policy(tiny_models)
    inputs = _inputs(model)
    names = list(policy.state_dict())
    eager = _out(policy, inputs)
    eager.square().mean().backward()
    grads = lambda: [torch.zeros_like(p) if p.grad is None else p.grad.clone()  # noqa: E731
                     for p in policy.parameters() if p.requires_grad]
    eager_grads = grads()
    policy.zero_grad(set_to_none=True)
    assert speed.compile_blocks(policy) == 2
    assert list(policy.state_dict()) == names, "checkpoints and exports see the same names"
    compiled = _out(policy, inputs)
    compiled.square().mean().backward()
    assert torch.allclose(compiled, eager, rtol=1e-4, atol=1e-5), (compiled - eager).abs().max()
    compiled_grads = grads()
    assert any(g.abs().sum() > 0 for g in compiled_grads)
    for a, b in zip(eager_grads, compiled_grads):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-6)


def test_attention_backend(tiny_models) -> None:
    model, policy = _policy(tiny_models)
    inputs = _inputs(model)
    with torch.no_grad():
        default = _out(policy, inputs)
        speed.set_attention_backend(policy, "_native_math")
        math_out = _out(policy, inputs)
    backends = {b.attn.processor._attention_backend.value
                for b in speed.diffusers_transformer(policy).transformer_blocks}
    assert backends == {"_native_math"}, backends
    assert torch.allclose(default, math_out, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="'flashy' is not a diffusers attention backend"):
        speed.set_attention_backend(policy, "flashy")


def test_speed_options_are_config_checked() -> None:
    from metacot.flow_grpo.config import GRPOConfig
    from metacot.sft.config import SFTConfig

    with pytest.raises(ConfigError, match="understanding.compile: applies to the generation expert"):
        load_config(SFTConfig, None, ["model=m", "data.train=t", "output_dir=o", "understanding.compile=true"])
    with pytest.raises(ConfigError, match="checkpoint_blocks: is -1"):
        load_config(GRPOConfig, None, ["model=m", "data.train=t", "output_dir=o", "generation.checkpoint_blocks=-1"])
    with pytest.raises(ConfigError, match="checkpoint_blocks: takes effect only with gradient_checkpointing=true"):
        load_config(GRPOConfig, None, ["model=m", "data.train=t", "output_dir=o", "generation.checkpoint_blocks=4",
                                       "generation.gradient_checkpointing=false"])
    with pytest.raises(ConfigError, match="data.source_area"):
        load_config(GRPOConfig, None, ["model=m", "data.train=t", "output_dir=o", "data.source_area=-5"])


# -- source latent area -------------------------------------------------------------------------------------------------

def test_source_shape_is_the_stock_pipelines_for_real_weights(tiny_models) -> None:
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_dimensions

    model = load_editing_model(tiny_models.pipeline)
    assert source_shape(model, 512, 512, 0) == (512, 512)
    for h, w in ((512, 512), (512, 768), (768, 448), (1024, 256)):
        stock_w, stock_h = calculate_dimensions(STOCK_SOURCE_AREA, w / h)[:2]
        assert source_shape(model, h, w, STOCK_SOURCE_AREA) == (stock_h, stock_w)
    assert source_shape(model, 512, 512, STOCK_SOURCE_AREA) == (1024, 1024)  # 4,096 source tokens at 512 px
    with pytest.raises(ValueError, match="source_area=-1"):
        source_shape(model, 512, 512, -1)


def test_velocity_with_a_larger_source_uses_its_own_grid(tiny_models) -> None:
    from metacot.scenes import sample_scene_images

    model = load_editing_model(tiny_models.pipeline)
    out_size, src_size = 32, 64
    sources = sample_scene_images(1, src_size, seed=3)
    latents = encode_latents(model, sources)
    grid = out_size // model.vae_scale_factor // 2
    x = torch.randn(1, grid * grid, latents.shape[2])
    cond = (torch.randn(1, 6, model.transformer.config.joint_attention_dim), torch.ones(1, 6, dtype=torch.bool))
    captured = {}
    hook = model.transformer.register_forward_pre_hook(
        lambda _m, _a, kw: captured.update(shapes=kw["img_shapes"]), with_kwargs=True)
    with torch.no_grad():
        v = predict_velocity(model, x, latents, cond, 0.5, height=out_size, width=out_size,
                             source_size=(src_size, src_size))
    hook.remove()
    assert v.shape == x.shape
    g = src_size // model.vae_scale_factor // 2
    assert captured["shapes"] == [[(1, grid, grid), (1, g, g)]]
    with pytest.raises(ValueError, match="declared source size 32x32 px"):
        predict_velocity(model, x, latents, cond, 0.5, height=out_size, width=out_size)


def test_trained_source_area_of_old_and_new_finals() -> None:
    from metacot.facts import source_area

    assert source_area({"stage": "sft", "no_cot": False}) == 0, "finals from before the option: the output size"
    assert source_area({"stage": "sft", "source_area": STOCK_SOURCE_AREA}) == STOCK_SOURCE_AREA
    assert source_area({"stage": "grpo", "stage1": {"stage": "sft", "source_area": 4096}}) == 4096
    assert source_area({"stage": "grpo", "source_area": 4096, "stage1": {"stage": "sft"}}) == 4096


def test_stage2_refuses_a_source_area_other_than_stage1s(tmp_path: Path) -> None:
    from metacot.flow_grpo.config import GRPOConfig
    from metacot.flow_grpo.trainer import check_source_area

    (tmp_path / "metacot.json").write_text(json.dumps({"stage": "sft", "no_cot": False}))
    with pytest.raises(ValueError, match="trained with source latents of area 0"):  # a final from before the option
        check_source_area(load_config(GRPOConfig, None, [f"model={tmp_path}", "data.train=t", "output_dir=o",
                                                         f"data.source_area={STOCK_SOURCE_AREA}"]))
    (tmp_path / "metacot.json").write_text(json.dumps({"stage": "sft", "source_area": STOCK_SOURCE_AREA}))
    cfg = load_config(GRPOConfig, None, [f"model={tmp_path}", "data.train=t", "output_dir=o"])
    with pytest.raises(ValueError, match=f"trained with source latents of area {STOCK_SOURCE_AREA}; set "
                                         f"data.source_area={STOCK_SOURCE_AREA}"):
        check_source_area(cfg)
    check_source_area(load_config(GRPOConfig, None, [f"model={tmp_path}", "data.train=t", "output_dir=o",
                                                     f"data.source_area={STOCK_SOURCE_AREA}"]))


@pytest.mark.slow
def test_both_stages_train_with_stock_sized_sources_and_selective_checkpointing(tiny_models, tiny_dataset,
                                                                                 tmp_path: Path) -> None:
    """SFT then GRPO through DeepSpeed (ZeRO-2) with the source encoded at 4x the output's area (64 px sources for
    32 px edits), one of two blocks checkpointed, compiled blocks; Stage 2 reads Stage 1's area from
    final/metacot.json."""
    from metacot.flow_grpo.config import GRPOConfig
    from metacot.flow_grpo.trainer import train as grpo_train
    from metacot.sft.config import SFTConfig
    from metacot.sft.trainer import train as sft_train

    require(shutil.which("g++") is not None, "g++ (torch.compile's CPU code generation)")
    common = ["train.wandb_mode=disabled", "train.progress=false", "train.save_every=0", "data.source_area=4096",
              "generation.gradient_checkpointing=true", "generation.checkpoint_blocks=1", "generation.compile=true"]
    sft = load_config(SFTConfig, "tiny", [f"model={tiny_models.pipeline}", f"data.train={tiny_dataset / 'train.jsonl'}",
                                          f"output_dir={tmp_path / 'sft'}", "train.max_steps=1", "batch_size=4",
                                          "micro_batch_size=4", "understanding.mode=frozen", "generation.mode=lora", *common], stage="sft")
    final = sft_train(sft)
    assert json.loads((final / "metacot.json").read_text())["source_area"] == 4096
    applied = json.loads((tmp_path / "sft" / "speed.json").read_text())
    assert applied["checkpoint_blocks"] == 1 and applied["fused_lora_layers"] > 0 and applied["compiled_blocks"] == 2
    small = ["rollout.group_size=4", "rollout.prompts_per_iteration=1", "rollout.batch_size=4", "rollout.num_steps=2",
             "rollout.window_size=1", "rollout.window_max=2", "policy.micro_batch_size=4",
             "policy.updates_per_epoch=1", "eval.every=0", "rewards={brightness: {weight: 1.0}}",
             # The dataset's CoT: a 1-step Stage 1 writes CoTs the preset's rule judge cannot score (no update).
             "data.cot_source=oracle"]
    grpo = load_config(GRPOConfig, "tiny", [f"model={final}", f"data.train={tiny_dataset / 'train.jsonl'}",
                                            f"output_dir={tmp_path / 'grpo'}", "train.max_steps=1", *common, *small],
                       stage="grpo")
    out = grpo_train(grpo)
    rows = [json.loads(x) for x in (tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()]
    it = [r for r in rows if "reward_mean" in r]
    assert len(it) == 1 and it[0]["optimizer_step"] == 1 and it[0]["ratio_mean"] == 1.0
    assert json.loads((out / "metacot.json").read_text())["source_area"] == 4096
    assert _stage2_refuses_another_area(final, tiny_dataset, tmp_path)

    # Inference encodes the source as training did: `metacot eval` and `metacot edit` read the area from
    # metacot.json (a spy records the sizes given to the real VAE encoder).
    import metacot.models.sampler as sampler
    from metacot.scenes import sample_scene_images
    from metacot.eval.runner import EvalSample, run_eval
    from metacot.export.edit import edit_image, load_model

    seen: list[tuple[int, int]] = []
    real = sampler.encode_latents

    def spy(model, images):
        seen.extend(img.size for img in images)
        return real(model, images)

    sampler.encode_latents = spy
    try:
        src, tgt = sample_scene_images(2, 32, seed=5)
        sample = EvalSample(id="e0", source=src, target=tgt, instruction="Make it red.", cot_text=None,
                            meta_tasks=("Replace",), category="recolor", record=None)
        run_eval(out, [sample], tmp_path / "eval", num_steps=1, no_cot=True)
        assert seen == [(64, 64)], seen
        seen.clear()
        edit_image(load_model(out), src, "Make it red.", cot=False, steps=1, cfg=1.0, size=32)
        assert seen == [(64, 64)], seen
    finally:
        sampler.encode_latents = real


def _stage2_refuses_another_area(final: Path, data: Path, tmp_path: Path) -> bool:
    from metacot.flow_grpo.config import GRPOConfig
    from metacot.flow_grpo.trainer import check_source_area

    cfg = load_config(GRPOConfig, "tiny", [f"model={final}", f"data.train={data / 'train.jsonl'}",
                                           f"output_dir={tmp_path / 'other'}"], stage="grpo")
    with pytest.raises(ValueError, match="trained with source latents of area 4096; set data.source_area=4096"):
        check_source_area(cfg)
    return True
