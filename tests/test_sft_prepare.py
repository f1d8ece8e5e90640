"""Stage 1's per-sample cache (``data.preprocess``): collated batches equal the processor's bit for bit, and a step
with the cache has the losses of a step without it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from metacot.config import load_config
from metacot.models.conditioning import NEGATIVE_PROMPT, condition_inputs
from metacot.sft.config import SFTConfig
from metacot.sft.data import load_sft_dataset
from metacot.sft.prepare import DROP_FLAGS, collate, prepare_dataset


def _small(tiny_dataset: Path, folder: Path, edits: int = 8, und: int = 4) -> Path:
    """The first ``edits`` edit and ``und`` understanding records of the shared dataset, beside a link to its images."""
    rows = [json.loads(x) for x in (tiny_dataset / "train.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["type"] == "edit"][:edits] + [r for r in rows if r["type"] == "understanding"][:und]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "images").symlink_to(tiny_dataset / "images")
    (folder / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return folder / "train.jsonl"


def _assert_same_batch(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for key in want:
        assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key


def test_collated_cache_is_the_processors_batch(tiny_models, tiny_dataset, tmp_path) -> None:
    from metacot.models.loading import load_editing_model
    from metacot.sft.trainer import lm_batch

    base = load_editing_model(tiny_models.pipeline, device=torch.device("cpu"), dtype=torch.float32)
    data = load_sft_dataset(_small(tiny_dataset, tmp_path / "d", edits=6), resolution=32, no_cot=False,
                            include_instruction=True, use_understanding=True)
    prepare_dataset(data, base, source_size=(32, 32), lm=True, gen=True, no_cot=False)
    tok = base.processor.tokenizer
    # A mixed batch: every dropout case, texts of different lengths, images kept and dropped.
    cases = ["none", "text", "image", "both", "text", "none"]
    got = collate([s.prepared.cond[c] for s, c in zip(data.edits, cases)], tok.pad_token_id, tok.padding_side)
    want = condition_inputs(base.processor, [s.source for s in data.edits],
                            [NEGATIVE_PROMPT if DROP_FLAGS[c][0] else s.condition_prompt
                             for s, c in zip(data.edits, cases)], [DROP_FLAGS[c][1] for c in cases])
    _assert_same_batch(got, want)
    only_text = collate([s.prepared.cond["image"] for s in data.edits[:3]], tok.pad_token_id, tok.padding_side)
    assert "pixel_values" not in only_text
    _assert_same_batch(only_text, condition_inputs(base.processor, [s.source for s in data.edits[:3]],
                                                   [s.condition_prompt for s in data.edits[:3]], [True] * 3))
    chats = data.edits + data.understanding
    got = collate([s.prepared.lm for s in chats], tok.pad_token_id)
    pairs = [(s.source, s.instruction, s.cot_text) for s in data.edits]
    pairs += [(s.image, s.question, s.answer) for s in data.understanding]
    want = lm_batch(base.processor, pairs, torch.device("cpu"))
    # The chats also carry their rotary positions: exactly what the model computes from the whole batch.
    positions = got.pop("position_ids")
    _assert_same_batch(got, want)
    expected, _ = base.vlm.model.get_rope_index(want["input_ids"], mm_token_type_ids=want["mm_token_type_ids"],
                                                image_grid_thw=want["image_grid_thw"],
                                                attention_mask=want["attention_mask"])
    assert positions.shape == expected.shape and torch.equal(positions, expected)
    assert len({tuple(s.prepared.lm["input_ids"].shape) for s in chats}) > 1, "the chats have different lengths"
    # The image patches of one image are stored once, whatever the number of cases that show it.
    p = data.edits[0].prepared
    assert p.cond["text"]["pixel_values"] is p.cond["none"]["pixel_values"] is p.lm["pixel_values"]


@pytest.mark.parametrize("extra", [[], ["no_cot=true", "data.source_area=4096", "understanding.mode=full"]])
def test_a_step_with_the_cache_has_the_losses_of_one_without(tiny_models, tiny_dataset, tmp_path, extra) -> None:
    from metacot.sft.trainer import _unwrapped, build_inputs, setup
    from metacot.training import release_accelerator

    train = _small(tiny_dataset, tmp_path / "d")
    losses = {}
    for preprocess in (True, False):
        cfg = load_config(SFTConfig, "tiny", [
            f"model={tiny_models.pipeline}", f"data.train={train}", f"output_dir={tmp_path / str(preprocess)}",
            "train.deepspeed=none", "train.wandb_mode=disabled", "train.progress=false", "batch_size=8",
            "micro_batch_size=8", "data.understanding_ratio=0.5", "cfg_dropout.text=0.25", "cfg_dropout.image=0.25",
            "cfg_dropout.both=0.25", f"data.preprocess={str(preprocess).lower()}", *extra], stage="sft")
        state = setup(cfg)
        try:
            edits = state.data.edit_batch(0, 8, cfg.train.seed)
            und = state.data.understanding_batch(0, 4, cfg.train.seed)
            lm, groups, counts = build_inputs(state, edits, und, 0, 0)
            assert (lm is not None) == (not cfg.no_cot or bool(und))
            assert sum(counts[k] > 0 for k in counts) >= 3, counts  # the batch mixes dropout cases
            torch.manual_seed(0)
            calls = []
            model = _unwrapped(state).vlm.model
            real = type(model).get_rope_index
            model.get_rope_index = lambda *a, **k: (calls.append(1), real(model, *a, **k))[1]
            try:
                with torch.no_grad():
                    losses[preprocess] = {k: float(v) for k, v in _unwrapped(state)(lm, groups).items()}
            finally:
                del model.get_rope_index
            # With the cache the LM batch brings its rotary positions: the forward computes none.
            if lm is not None:
                assert (len(calls) == 0) == preprocess, (preprocess, len(calls))
        finally:
            state.run.close()
            release_accelerator(state.accelerator)
    assert losses[True].keys() == losses[False].keys() == {"loss_und", "loss_gen"}
    for key, value in losses[False].items():
        assert losses[True][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
