"""The model writes its own Meta-CoT: the trained understanding expert is what writes it in Flow-GRPO and eval.

Stage 1 runs three ways (understanding LoRA with conditions encoded adapter-on, LoRA adapter-off, full tuning); in
each, the one loader (``metacot.understanding.load_understanding``) must return the TRAINED weights (for adapter-off
they live in ``final/understanding/``, beside a stock text encoder), Flow-GRPO must write its CoTs with exactly those
weights and condition on their greedy decode, and ``metacot eval`` likewise. A fresh random VLM writes garbage: every
one of its CoTs must be counted as unparsed, never replaced by the dataset's.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

from fixtures_runs import GRPO_FAST, sft_config
from helpers import metrics as rows
from metacot.config import ConfigError, load_config
from metacot.flow_grpo.config import GRPOConfig

VARIANTS = {
    "lora-adapter-on": ["understanding.mode=lora", "condition_with_adapter=true"],
    "lora-adapter-off": ["understanding.mode=lora", "condition_with_adapter=false"],
    "full": ["understanding.mode=full"],
}
# A high understanding LR, so 2 steps move the expert well away from the base VLM.
STAGE1_EXTRA = ["understanding.lr=5e-2", "generation.mode=lora"]
COT_TOKENS = 12
# 2 Stage 1 steps and 12-token CoTs: the written CoTs rarely parse, so the rule judge scores (almost) nothing. These
# tests check WHICH weights wrote the CoTs and what the generator saw, so GRPO runs on regardless (a real run stops:
# judge.min_scored_share; test_unparsable_written_cots_are_counted_not_replaced checks that).
MODEL_COT = [o for o in GRPO_FAST if not o.startswith(("data.cot_source", "train.max_steps"))] + [
    "data.cot_source=model", f"data.max_cot_tokens={COT_TOKENS}", "train.max_steps=1", "train.save_every=0",
    "judge.min_scored_share=0"]


def _vlm_state(folder: Path) -> dict[str, torch.Tensor]:
    """The state dict of the VLM saved in ``folder``, loaded independently of metacot's loaders."""
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).state_dict()


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    assert a.keys() == b.keys()
    return all(torch.equal(a[k], b[k]) for k in a)


def _expert_dir(final: Path) -> Path:
    """Where Stage 1 saved the trained expert: its own folder when conditions were encoded adapter-off."""
    meta = json.loads((final / "metacot.json").read_text())
    return final / meta["understanding"]["path"]


def _independent_decode(final: Path, images: list[Image.Image], instructions: list[str]) -> list[str]:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from metacot.understanding import write_cots

    folder = _expert_dir(final)
    vlm = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(folder if folder.name == "understanding" else final / "processor")
    return [w.text for w in write_cots(vlm, processor, images, instructions, max_new_tokens=COT_TOKENS)]


@pytest.fixture(scope="module", params=list(VARIANTS))
def stage1(request, tiny_models, tiny_dataset: Path, tmp_path_factory) -> tuple[str, Path]:
    from metacot.sft.trainer import train

    run = tmp_path_factory.mktemp(f"sft-{request.param}") / "run"
    return request.param, train(sft_config(Path(tiny_models.pipeline), tiny_dataset, run, *VARIANTS[request.param],
                                           *STAGE1_EXTRA))


@pytest.mark.slow
def test_loader_returns_the_trained_understanding_expert(stage1, tiny_models) -> None:
    from metacot.models.loading import load_editing_model
    from metacot.understanding import load_understanding

    name, final = stage1
    trained = _vlm_state(_expert_dir(final))
    base = _vlm_state(Path(tiny_models.pipeline) / "text_encoder")
    assert not _same(trained, base), "Stage 1 trained the understanding expert"
    pipe = load_editing_model(final)
    vlm, _ = load_understanding(final, text_encoder=(pipe.vlm, pipe.processor))
    assert _same(vlm.state_dict(), trained)
    if name == "lora-adapter-off":
        # The text encoder stays the stock VLM: a loader that took it would write CoTs with untuned weights.
        assert _same(pipe.vlm.state_dict(), base) and vlm is not pipe.vlm
    else:
        assert vlm is pipe.vlm  # the expert IS the text encoder: one copy in memory


@pytest.mark.slow
def test_grpo_conditions_on_the_trained_experts_greedy_cot(stage1, tiny_dataset: Path, tmp_path: Path,
                                                           monkeypatch) -> None:
    import metacot.flow_grpo.trainer as trainer
    from metacot.cot.schema import EditRecord, load_records
    from metacot.models.conditioning import build_prompt

    name, final = stage1
    writers: list[dict[str, torch.Tensor]] = []
    texts: list[str] = []
    real_write, real_encode = trainer.write_cots, trainer.encode_conditions

    def spy_write(vlm, *args, **kwargs):
        writers.append({k: v.detach().clone() for k, v in vlm.state_dict().items()})
        return real_write(vlm, *args, **kwargs)

    def spy_encode(vlm, processor, images, prompts):
        texts.extend(prompts)
        return real_encode(vlm, processor, images, prompts)

    monkeypatch.setattr(trainer, "write_cots", spy_write)
    monkeypatch.setattr(trainer, "encode_conditions", spy_encode)
    run = tmp_path / "grpo"
    trainer.train(load_config(GRPOConfig, "tiny", [
        f"model={final}", f"data.train={tiny_dataset / 'train.jsonl'}", f"data.eval={tiny_dataset / 'val.jsonl'}",
        f"output_dir={run}", *MODEL_COT], stage="grpo"))
    trained = _vlm_state(_expert_dir(final))
    assert writers and all(_same(w, trained) for w in writers), "every CoT was written by the trained expert"
    written = [json.loads(x) for x in (run / "cots.jsonl").read_text().splitlines()]
    assert sorted({(w["split"], w["iteration"]) for w in written}) == [("eval", 0), ("train", 0)]
    records = {}
    for split in ("train", "val"):
        records.update({r.id: r for r in load_records(tiny_dataset / f"{split}.jsonl")
                        if isinstance(r, EditRecord)})
    for split in ("eval", "train"):
        mine = [w for w in written if w["split"] == split]
        assert len(mine) == 2
        recs = [records[w["id"]] for w in mine]
        images = [Image.open(r.source_image).convert("RGB").resize((32, 32), Image.Resampling.BICUBIC)
                  for r in recs]
        assert [w["text"] for w in mine] == _independent_decode(final, images, [r.instruction for r in recs])
        for w, r in zip(mine, recs):  # the generator was conditioned on exactly that text
            expected = build_prompt(r.instruction, w["text"] or None)
            assert expected in texts, (expected, texts[:4])
    logged = rows(run)
    assert "eval_cot_unparsed" in logged[0] and 0 <= logged[0]["eval_cot_unparsed"] <= 2
    it = next(r for r in logged if "reward_mean" in r)
    unparsed = sum(not w["parsed"] for w in written if w["split"] == "train")
    assert it["cot_unparsed"] == unparsed and it["cot_unparsed_share"] == unparsed / 2
    # Stage 2's final/ carries the same expert on (its understanding/ when Stage 1 kept one), and so does an export.
    from metacot.understanding import load_understanding

    assert _same(load_understanding(run / "final")[0].state_dict(), trained)
    if name == "lora-adapter-off":
        from metacot.export.exporter import export_run

        export_run(run, tmp_path / "export", dtype="fp32", say=lambda _: None)
        for folder in (tmp_path / "export", tmp_path / "export" / "pipeline"):
            assert _same(load_understanding(folder)[0].state_dict(), trained), folder


@pytest.mark.slow
def test_eval_conditions_on_the_trained_experts_greedy_cot(stage1, tiny_dataset: Path, tmp_path: Path) -> None:
    from metacot.eval.runner import load_jsonl_suite, run_eval

    _, final = stage1
    samples = load_jsonl_suite(tiny_dataset / "test.jsonl")[:2]
    out = tmp_path / "eval"
    run_eval(final, samples, out, num_steps=1, batch_size=2, method="sft", max_cot_tokens=COT_TOKENS)
    results = run_eval(final, samples, out, num_steps=1, batch_size=2, method="sft", cot_source="oracle")
    got = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    model = [r for r in got if r["method"] == "sft"]
    oracle = [r for r in got if r["method"] == "sft (oracle CoT)"]
    assert [r["cot_source"] for r in model] == ["model"] * 2 and [r["cot_source"] for r in oracle] == ["oracle"] * 2
    assert [r["cot_text"] for r in model] == _independent_decode(final, [s.source for s in samples],
                                                                 [s.instruction for s in samples])
    assert [r["cot_text"] for r in oracle] == [s.cot_text for s in samples]
    assert {"sft", "sft (oracle CoT)"} <= set(results["methods"]) and "sft (oracle CoT)" in \
        (out / "table.md").read_text()
    assert all(r["cot_source"] is None and r["cot_text"] is None for r in got if r["method"] in ("copy", "erase"))


@pytest.mark.slow
def test_unparsable_written_cots_are_counted_not_replaced(tiny_models, tiny_dataset: Path, tmp_path: Path) -> None:
    """A fresh random VLM (the untrained tiny pipeline) writes garbage: every CoT counts as unparsed, and the rule
    judge gives those samples no score instead of judging against the dataset's CoT. A run that scored nothing
    fails (judge.min_scored_share), even when it is shorter than judge.max_unscored_iterations, and writes no final/."""
    from metacot.flow_grpo.trainer import UnscoredError, train

    run = tmp_path / "grpo"
    with pytest.raises(UnscoredError, match="iterations 1-1: the reward scored 0% "):
        train(load_config(GRPOConfig, "tiny", [
            f"model={tiny_models.pipeline}", f"data.train={tiny_dataset / 'train.jsonl'}",
            f"data.eval={tiny_dataset / 'val.jsonl'}", f"output_dir={run}", *MODEL_COT,
            "judge.min_scored_share=0.5"], stage="grpo"))  # the default
    assert not (run / "final").exists()
    logged = rows(run)
    assert logged[0]["eval_cot_unparsed"] == 2 and logged[0]["eval_cot_unparsed_share"] == 1.0
    it = next(r for r in logged if "reward_mean" in r)
    assert it["cot_unparsed"] == 2 and it["cot_unparsed_share"] == 1.0  # prompts_per_iteration=2
    assert it["reward_none"] == 4  # 2 prompts x group of 2: cec_rule has no score for an unparsed CoT
    written = [json.loads(x) for x in (run / "cots.jsonl").read_text().splitlines()]
    assert len(written) == 4 and not any(w["parsed"] for w in written)


@pytest.mark.slow
def test_sampled_cots_are_rewritten_every_iteration(tiny_models, tiny_dataset: Path, tmp_path: Path) -> None:
    from metacot.flow_grpo.trainer import train

    run = tmp_path / "grpo"
    train(load_config(GRPOConfig, "tiny", [
        f"model={tiny_models.pipeline}", f"data.train={tiny_dataset / 'train.jsonl'}",
        f"data.eval={tiny_dataset / 'val.jsonl'}", f"output_dir={run}", *MODEL_COT, "train.max_steps=2",
        "data.cot_sampling=sample", "data.cot_temperature=1.5"], stage="grpo"))
    written = [json.loads(x) for x in (run / "cots.jsonl").read_text().splitlines()]
    train_its = sorted({w["iteration"] for w in written if w["split"] == "train"})
    assert train_its == [0, 1] and sum(w["split"] == "eval" for w in written) == 2


def test_write_cots_samples_reproducibly_and_greedy_is_deterministic(tiny_models) -> None:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from metacot.understanding import write_cots

    vlm = AutoModelForImageTextToText.from_pretrained(tiny_models.vlm, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(tiny_models.vlm)
    img, text = [Image.new("RGB", (32, 32), "red")] * 2, ["Make it blue.", "Remove the square."]
    greedy = [w.text for w in write_cots(vlm, processor, img, text, max_new_tokens=8)]
    assert greedy == [w.text for w in write_cots(vlm, processor, img, text, max_new_tokens=8)]
    state = torch.random.get_rng_state()
    draws = [[w.text for w in write_cots(vlm, processor, img, text, max_new_tokens=8, temperature=2.0, seed=s)]
             for s in (0, 0, 1)]
    assert torch.equal(state, torch.random.get_rng_state()), "sampling leaves the global RNG as it was"
    assert draws[0] == draws[1] and draws[0] != draws[2] and draws[0] != greedy


def test_a_written_cot_over_the_condition_budget_is_cut_to_fit(tiny_models) -> None:
    from transformers import AutoProcessor

    from metacot.models.conditioning import build_prompt, condition_text_token_counts
    from metacot.understanding import fit_to_budget

    processor = AutoProcessor.from_pretrained(Path(tiny_models.pipeline) / "processor")
    short = "### Summary\nMeta-tasks: Replace"
    assert fit_to_budget(processor, "Make it red.", short) == (short, False)
    long = " ".join(["the red circle is kept"] * 200)
    text, cut = fit_to_budget(processor, "Make it red.", long, budget=64)
    assert cut and long.startswith(text) and len(text) < len(long)
    assert condition_text_token_counts(processor, [build_prompt("Make it red.", text)], with_image=True)[0] <= 64
    # ... counted as the encoder counts it (with the image's vision markers): encoding it raises nothing.
    from transformers import AutoModelForImageTextToText

    from metacot.models.conditioning import encode_conditions

    vlm = AutoModelForImageTextToText.from_pretrained(Path(tiny_models.pipeline) / "text_encoder").eval()
    with torch.no_grad():
        encode_conditions(vlm, processor, [Image.new("RGB", (32, 32))], [build_prompt("Make it red.", text)],
                          max_text_tokens=64)
        with pytest.raises(Exception, match="exceed the text budget"):
            encode_conditions(vlm, processor, [Image.new("RGB", (32, 32))], [build_prompt("Make it red.", long)],
                              max_text_tokens=64)


# -- fast checks: config, judge, row fields ----------------------------------------------------------------------------

def test_cot_source_defaults_to_model_and_data_is_oracle() -> None:
    base = ["model=m", "output_dir=o", "data.train=d"]
    cfg = load_config(GRPOConfig, None, base)
    assert cfg.data.cot_source == "model" and cfg.data.cot_sampling == "greedy"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert load_config(GRPOConfig, None, base + ["data.cot_source=data"]).data.cot_source == "oracle"
    assert any("oracle" in str(w.message) for w in caught)
    with pytest.raises(ConfigError, match="data.cot_source"):
        load_config(GRPOConfig, None, base + ["data.cot_source=dataset"])
    with pytest.raises(ConfigError, match="data.cot_sampling"):
        load_config(GRPOConfig, None, base + ["data.cot_sampling=beam"])


def test_rule_judge_gives_no_score_for_an_unparsed_cot() -> None:
    from rewards.contract import RewardBatch
    from rewards.rule_judge import CECRuleJudge

    scene = {"width": 32, "height": 32, "background": "white", "objects": []}
    img = Image.new("RGB", (32, 32), "white")
    judge = CECRuleJudge()
    scores = judge(RewardBatch([img, img], [img, img], ["x", "x"], ["garbage text", None],
                               extras={"scene_before": [scene, scene], "scene_after": [scene, scene]}))
    assert scores[0] is None and scores[1] is not None
    assert judge.stats["none_unparsed_cot"] == 1 and judge.stats["no_cot_used_scenes"] == 1


def test_score_rows_stores_the_cot_texts(tmp_path: Path) -> None:
    from metacot.eval.runner import EvalSample, _score_rows

    img = Image.new("RGB", (16, 16), "white")
    samples = [EvalSample(f"s{i}", img, None, "Make it red.", "oracle", ("color",), "c", None) for i in range(2)]
    got = _score_rows("m", samples, [img, img], None, tmp_path / "images", cots=["written a", "written b"])
    assert [r["cot_text"] for r in got] == ["written a", "written b"]
    assert [r["cot_text"] for r in _score_rows("m", samples, [img, img], None, tmp_path / "images")] == [None, None]


def test_describe_model_folder_finds_the_expert_of_every_kind(tmp_path: Path) -> None:
    from metacot.models.loading import ModelFolderError
    from metacot.understanding import describe_model_folder

    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "model_index.json").write_text("{}")
    assert describe_model_folder(plain).understanding == plain / "text_encoder"
    final = tmp_path / "final"
    final.mkdir()
    (final / "model_index.json").write_text("{}")
    (final / "metacot.json").write_text(json.dumps(
        {"stage": "sft", "understanding": {"is_text_encoder": False, "path": "understanding"}}))
    desc = describe_model_folder(final)
    assert desc.understanding == desc.processor == final / "understanding" and not desc.shares_text_encoder
    export = tmp_path / "export"
    (export / "pipeline").mkdir(parents=True)
    (export / "pipeline" / "model_index.json").write_text("{}")
    (export / "metacot.json").write_text(json.dumps({"format": "metacot-export", "final_meta": {"stage": "sft"}, "layout": {
        "pipeline": "pipeline", "adapters": {}, "understanding": {"path": "understanding", "same_weights_as": None}}}))
    for given in (export, export / "pipeline"):  # the export, or its pipeline/ (what eval used to be given)
        desc = describe_model_folder(given)
        assert desc.kind == "export" and desc.understanding == export / "understanding"
    with pytest.raises(ModelFolderError, match="neither"):
        describe_model_folder(tmp_path)
