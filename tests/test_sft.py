"""Stage 1 SFT on tiny models through real DeepSpeed (ZeRO-2, world size 1, in-process)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import changed_keys, preempt_at, weights
from metacot.config import ConfigError, load_config
from metacot.cot.schema import DataError
from metacot.models.conditioning import build_prompt
from metacot.sft.config import SFTConfig
from metacot.sft.data import SFTDataError, load_sft_dataset

FAST = ["train.max_steps=2", "batch_size=4", "micro_batch_size=2", "train.wandb_mode=disabled",
        "train.progress=false", "train.warmup_steps=0", "train.save_every=0", "data.understanding_ratio=0.5",
        "train.log_every=1"]


def sft_cfg(models, data: Path, out: Path, *extra: str) -> SFTConfig:
    return load_config(SFTConfig, "tiny", [f"model={models.pipeline}", f"data.train={data}", f"output_dir={out}",
                                           *FAST, *extra], stage="sft")


@pytest.mark.slow
@pytest.mark.parametrize("und,gen", [("lora", "full"), ("frozen", "lora"), ("full", "frozen")])
def test_two_steps_train_exactly_the_trainable_experts(tiny_models, tiny_dataset, tmp_path, und, gen) -> None:
    from metacot.sft.trainer import train

    cfg = sft_cfg(tiny_models, tiny_dataset / "train.jsonl", tmp_path / "run", f"understanding.mode={und}",
                  f"generation.mode={gen}")
    final = train(cfg)
    base = Path(tiny_models.pipeline)
    te = changed_keys(weights(base / "text_encoder"), weights(final / "text_encoder"))
    tr = changed_keys(weights(base / "transformer"), weights(final / "transformer"))
    assert not changed_keys(weights(base / "vae"), weights(final / "vae")), "the VAE is never trained"
    if und == "frozen":
        assert not te
    elif und == "lora":
        assert te and all(any(t in k for t in ("q_proj", "k_proj", "v_proj", "o_proj")) for k in te), sorted(te)[:5]
        assert "visual" not in " ".join(te), "LoRA targets the language model only"
    else:
        assert len(te) > 20
    if gen == "frozen":
        assert not tr
    elif gen == "lora":
        assert tr and all(any(t in k for t in ("to_q", "to_k", "to_v", "to_out", "add_", "to_add_out")) for k in tr)
    else:
        assert len(tr) > 20
    meta = json.loads((final / "metacot.json").read_text())
    assert meta["stage"] == "sft" and meta["step"] == 2
    assert set(meta["adapters"]) == {n for n, m in (("understanding", und), ("generation", gen)) if m == "lora"}
    for name in meta["adapters"]:
        assert (final / "adapters" / name / "adapter_model.safetensors").is_file()
    ckpt = tmp_path / "run" / "checkpoints" / "step-2"
    assert (ckpt / "metacot_complete.json").is_file() and (ckpt / "pytorch_model").is_dir()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert ("loss_und" in rows[0]) == (und != "frozen")
    # Every edit sample of a step draws one CFG-dropout case (the flow loss runs in all three set-ups).
    assert sum(rows[0][f"drop_{c}"] for c in ("none", "text", "image", "both")) == 4
    assert (tmp_path / "run" / "report" / "loss.png").is_file()


@pytest.mark.slow
def test_exact_resume_is_bit_identical(tiny_models, tiny_dataset, tmp_path, monkeypatch) -> None:
    import metacot.sft.trainer as trainer
    from metacot.training import Preempted

    data = tiny_dataset / "train.jsonl"
    cfg = lambda run: sft_cfg(tiny_models, data, tmp_path / run, "train.max_steps=4")  # noqa: E731
    full = trainer.train(cfg("a"))
    with monkeypatch.context() as mp:
        preempt_at(mp, trainer, "train_step", 2)
        with pytest.raises(Preempted) as stopped:
            trainer.train(cfg("b"))
    assert stopped.value.step == 2 and (tmp_path / "b" / "checkpoints" / "step-2" / "metacot_complete.json").is_file()
    resumed = trainer.train(cfg("b"))
    for part in ("transformer", "text_encoder"):
        a, b = weights(full / part), weights(resumed / part)
        assert not changed_keys(a, b), f"{part} differs after resume"
    logged = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "loss" in r] == [1, 2, 3, 4]
    assert any(r.get("stopped_by") == "SIGUSR1" for r in logged)


def test_dropout_rates_are_honoured() -> None:
    from metacot.sft.trainer import draw_dropout_cases
    from metacot.training import step_generator

    cfg = load_config(SFTConfig, None, ["model=x", "output_dir=y", "data.train=z", "cfg_dropout.text=0.2",
                                        "cfg_dropout.image=0.1", "cfg_dropout.both=0.05"])
    cases = draw_dropout_cases(40_000, cfg, step_generator(0, 0))
    share = {c: cases.count(c) / len(cases) for c in ("text", "image", "both", "none")}
    assert share["text"] == pytest.approx(0.2, abs=0.01)
    assert share["image"] == pytest.approx(0.1, abs=0.01)
    assert share["both"] == pytest.approx(0.05, abs=0.01)
    assert share["none"] == pytest.approx(0.65, abs=0.01)


def test_edit_region_weight_counts_the_changed_tokens_more(monkeypatch) -> None:
    """The weights mark exactly the tokens whose latents the edit changed; the weighted loss of a prediction that
    is wrong only there grows with the weight, and with all weights equal it is the plain mean squared error."""
    import torch

    import metacot.sft.trainer as T

    source = torch.zeros(2, 4, 3)
    target = source.clone()
    target[0, 1] = 1.0  # sample 0: token 1 edited
    target[1, 2] = T.EDIT_TOKEN_THRESHOLD / 2  # sample 1: below the threshold, VAE noise
    w = T.edit_token_weights(target, source, 4.0)
    assert w.tolist() == [[1, 5, 1, 1], [1, 1, 1, 1]]
    with pytest.raises(ValueError, match="source_area=0"):
        T.edit_token_weights(target, source[:, :2], 4.0)

    # The MMDiT call is replaced by "the velocity is the hidden input", so the loss is set by hand exactly.
    monkeypatch.setattr(T, "mmdit_velocity", lambda transformer, hidden, *args, **kwargs: hidden)
    experts = T.Experts(torch.nn.Identity(), torch.nn.Identity())
    miss = torch.zeros(2, 4, 3)
    miss[0, 1] = 1.0  # the prediction (zeros) misses only the edited token of sample 0
    group = {"hidden": torch.zeros(2, 4, 3), "sigma": torch.ones(2), "cond": torch.zeros(2, 1, 3), "mask": None,
             "img_shapes": [[(1, 2, 2)]] * 2, "target": miss, "n_target": 4}
    plain = float(experts(None, [group])["loss_gen"])
    ones = float(experts(None, [group | {"weight": torch.ones(2, 4)}])["loss_gen"])
    heavy = float(experts(None, [group | {"weight": w}])["loss_gen"])
    assert plain == pytest.approx(1 / 8) and ones == pytest.approx(plain)  # one of 4 tokens, mean of 2 samples
    assert heavy == pytest.approx((5 / 8 + 0) / 2)  # sample 0: weight 5 of 8 on its miss; sample 1: no miss
    with pytest.raises(ConfigError, match="source_area=0"):
        load_config(SFTConfig, None, ["model=x", "output_dir=y", "data.train=z", "edit_region_weight=2",
                                      "data.source_area=4096"])


def test_no_cot_removes_the_cot_from_the_condition(tiny_dataset) -> None:
    with_cot = load_sft_dataset(tiny_dataset / "train.jsonl", resolution=32, no_cot=False, include_instruction=True,
                                use_understanding=False)
    no_cot = load_sft_dataset(tiny_dataset / "train.jsonl", resolution=32, no_cot=True, include_instruction=True,
                              use_understanding=False)
    only_cot = load_sft_dataset(tiny_dataset / "train.jsonl", resolution=32, no_cot=False, include_instruction=False,
                                use_understanding=False)
    for a, b, c in zip(with_cot.edits[:20], no_cot.edits[:20], only_cot.edits[:20]):
        assert a.cot_text and a.cot_text in a.condition_prompt and a.instruction in a.condition_prompt
        assert b.condition_prompt == build_prompt(b.instruction, None) and b.cot_text == ""
        assert a.cot_text not in b.condition_prompt
        assert a.cot_text in c.condition_prompt and not c.condition_prompt.startswith(a.instruction)


@pytest.mark.slow
def test_no_cot_run_never_encodes_a_cot(tiny_models, tiny_dataset, tmp_path, monkeypatch) -> None:
    """Spy on the real condition encoder during a no-CoT run: no prompt it receives holds a CoT marker."""
    import metacot.sft.trainer as trainer

    seen: list[str] = []
    real = trainer.encode_conditions

    def spy(vlm, processor, images, prompts, **kw):
        seen.extend(prompts)
        return real(vlm, processor, images, prompts, **kw)

    monkeypatch.setattr(trainer, "encode_conditions", spy)
    trainer.train(sft_cfg(tiny_models, tiny_dataset / "train.jsonl", tmp_path / "run", "no_cot=true",
                          "train.max_steps=1"))
    assert seen and not any("Meta-CoT" in p or "<task_summary>" in p for p in seen)


def _subset(tiny_dataset: Path, folder: Path, name: str, rows: list[dict]) -> Path:
    """Write ``rows`` as a JSONL in ``folder`` beside a link to the shared dataset's images (record paths are
    relative; the shared dataset folder itself is never written to)."""
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "images").exists():
        (folder / "images").symlink_to(tiny_dataset / "images")
    path = folder / f"{name}.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def _bad(name: str, tiny_dataset: Path, folder: Path, mutate) -> Path:
    rows = [json.loads(x) for x in (tiny_dataset / "train.jsonl").read_text().splitlines()][:6]
    mutate(rows)
    return _subset(tiny_dataset, folder, f"bad_{name}", rows)


def test_bad_data_fails_before_training(tiny_dataset, tmp_path) -> None:
    load = lambda p, **kw: load_sft_dataset(p, resolution=32, no_cot=False, include_instruction=True,  # noqa: E731
                                            use_understanding=True, **kw)
    missing = _bad("missing", tiny_dataset, tmp_path, lambda rs: rs[0].update(source_image="images/nope.png"))
    with pytest.raises(DataError, match=r"bad_missing.jsonl:1:.*nope.png"):
        load(missing)
    torn_cot = _bad("cot", tiny_dataset, tmp_path, lambda rs: rs[0]["cot"].pop("thinking"))
    with pytest.raises(DataError, match=r"bad_cot.jsonl:1"):
        load(torn_cot)
    only_und = _bad("und", tiny_dataset, tmp_path, lambda rs: rs.__setitem__(
        slice(None), [r for r in rs if r["type"] != "edit"]))
    with pytest.raises(SFTDataError, match="no usable edit samples"):
        load(only_und)
    with pytest.raises(SFTDataError, match="exceed the condition budget"):
        load(tiny_dataset / "train.jsonl", text_token_counts=lambda ps: [len(p) for p in ps], max_tokens=20)


def test_batch_that_does_not_divide_is_refused() -> None:
    with pytest.raises(ConfigError, match="multiple of micro_batch_size"):
        load_config(SFTConfig, None, ["model=x", "output_dir=y", "data.train=z", "batch_size=6",
                                      "micro_batch_size=4"])
    with pytest.raises(ConfigError, match="sum to at most 1"):
        load_config(SFTConfig, None, ["model=x", "output_dir=y", "data.train=z", "cfg_dropout.text=0.9",
                                      "cfg_dropout.image=0.2"])


def test_the_data_check_counts_a_condition_as_the_encoder_does(tiny_models, tiny_dataset, tmp_path) -> None:
    """A condition one token over the budget only with its image's start / end markers: the check before training
    refuses it (file:line), as encode_conditions would in step 1 (before, the check counted without the markers)."""
    from PIL import Image

    from metacot.models.conditioning import ConditionBudgetError, condition_text_token_counts, encode_conditions
    from metacot.models.loading import load_editing_model
    from metacot.sft.data import check_inputs, check_sft_data, data_options

    cfg = sft_cfg(tiny_models, tiny_dataset / "train.jsonl", tmp_path / "run")
    model = load_editing_model(tiny_models.pipeline)
    checked = check_sft_data(cfg.data.train, **data_options(cfg, model.processor))
    # What the encoder counts for a sample with its image (the most any CFG-dropout case of it has).
    counts = condition_text_token_counts(model.processor, [p for _, _, p in checked.edits], with_image=True)
    longest = max(range(len(counts)), key=counts.__getitem__)
    budget = counts[longest] - 1
    with pytest.raises(SFTDataError, match=r"train.jsonl:\d+ .*\(%d tokens\)" % counts[longest]):
        check_inputs(sft_cfg(tiny_models, tiny_dataset / "train.jsonl", tmp_path / "run",
                             f"data.max_condition_tokens={budget}"))
    with pytest.raises(ConditionBudgetError):
        encode_conditions(model.vlm, model.processor, [Image.new("RGB", (32, 32))], [checked.edits[longest][2]],
                          max_text_tokens=budget)
