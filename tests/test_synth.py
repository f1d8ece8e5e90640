"""Synthetic recipe: exact ground truth, dependencies, splits, determinism, manifest, CLI."""

from __future__ import annotations

import json
import random
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from fixtures_data import tiny_dataset  # noqa: F401  (session fixture; conftest may also register it)
from PIL import Image

from data_recipes import cli
from data_recipes.synth import content_hash, generate, split_of
from data_recipes.synth_chains import COT_WORD_BUDGET, OPERATION_WORDS, make_chain
from data_recipes.synth_edits import CATEGORIES, traversal_ids
from metacot.scenes import box_center, name_of, render_scene, sample_scene_images
from metacot.cot import MetaTask, parse, render
from metacot.cot.schema import BACKGROUNDS, COLORS, INK, SHAPES, EditRecord, UnderstandingRecord, load_records
from metacot.run import COMPLETE_MARKER


def _load_all(folder: Path) -> dict[str, list]:
    return {split: load_records(folder / f"{split}.jsonl") for split in ("train", "val", "test")}


@pytest.fixture(scope="module")
def records(tiny_dataset: Path) -> list:  # noqa: F811
    return [r for split in _load_all(tiny_dataset).values() for r in split]


def _pixels(path: str) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def _boxes_mask(shape: tuple[int, int], boxes: list[list[int]]) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    for x0, y0, x1, y1 in boxes:
        mask[y0:y1, x0:x1] = True
    return mask


def _check_diff(rec: EditRecord, changed: set[str]) -> None:
    """Pixels differ only inside boxes of changed objects (before or after), and inside each of them somewhere."""
    src, tgt = _pixels(rec.source_image), _pixels(rec.target_image)
    diff = (src != tgt).any(axis=-1)
    before = {o["id"]: o for o in rec.scene_before["objects"]}
    after = {o["id"]: o for o in rec.scene_after["objects"]}
    boxes = {i: [o[i]["box"] for o in (before, after) if i in o] for i in changed}
    allowed = _boxes_mask(diff.shape, [b for i in changed for b in boxes[i]])
    assert not (diff & ~allowed).any(), f"{rec.id}: pixels changed outside the changed objects"
    for obj_id in changed:
        assert diff[_boxes_mask(diff.shape, boxes[obj_id])].any(), f"{rec.id}: {obj_id} said changed, no pixel moved"
    for obj_id in set(before) - changed:
        assert before[obj_id] == after.get(obj_id), f"{rec.id}: kept object {obj_id} differs"


def test_images_are_exact_renders_of_their_scenes(records: list) -> None:
    palette = {*COLORS.values(), *BACKGROUNDS.values(), INK}
    edits = [r for r in records if isinstance(r, EditRecord)]
    for rec in edits:
        for path, scene in ((rec.source_image, rec.scene_before), (rec.target_image, rec.scene_after)):
            assert _pixels(path).tobytes() == render_scene(scene).tobytes(), rec.id
    colours = {tuple(c) for rec in edits[:50] for c in _pixels(rec.source_image).reshape(-1, 3)}
    assert colours <= palette  # no anti-aliasing: a colour-segmentation judge sees only palette colours


def test_single_edits_change_exactly_what_the_cot_says(records: list) -> None:
    edits = [r for r in records if isinstance(r, EditRecord) and r.chain_step != 0]
    assert len(edits) == 330 + 24 * 3
    for rec in edits:
        ids = traversal_ids(rec.scene_before, rec.scene_after)
        assert len(ids) == len(rec.cot.traversal), rec.id  # every object is traversed
        objects = {o["id"]: o for o in rec.scene_after["objects"]} | {o["id"]: o for o in rec.scene_before["objects"]}
        assert [e.name for e in rec.cot.traversal] == [name_of(objects[i]) for i in ids]
        changed = {i for i, e in zip(ids, rec.cot.traversal) if e.changed}
        assert changed, rec.id
        _check_diff(rec, changed)
        assert parse(render(rec.cot)) == rec.cot


def test_whole_chain_records_list_net_changes(records: list) -> None:
    steps: dict[str, list[EditRecord]] = defaultdict(list)
    for rec in records:
        if isinstance(rec, EditRecord) and rec.chain_id is not None:
            steps[rec.chain_id].append(rec)
    assert len(steps) == 24
    for chain_id, recs in steps.items():
        recs.sort(key=lambda r: r.chain_step)
        whole, parts = recs[0], recs[1:]
        assert whole.chain_step == 0 and [r.chain_step for r in parts] == [1, 2, 3]
        assert whole.source_image == parts[0].source_image and whole.target_image == parts[-1].target_image
        assert [p.target_image for p in parts[:-1]] == [p.source_image for p in parts[1:]]
        assert whole.meta_tasks == tuple(m for p in parts for m in p.meta_tasks)
        first = {o["id"]: o for o in whole.scene_before["objects"]}
        last = {o["id"]: o for o in whole.scene_after["objects"]}
        added = list(dict.fromkeys(o["id"] for p in parts for o in p.scene_after["objects"] if o["id"] not in first))
        order = list(first) + added
        assert len(whole.cot.traversal) == len(order), chain_id
        changed = {i for i in order if first.get(i) != last.get(i)}
        assert {i for i, e in zip(order, whole.cot.traversal) if e.changed} == changed
        assert [e.name for e in whole.cot.traversal[: len(first)]] == [name_of(o) for o in first.values()]
        _check_diff(whole, changed)


def test_dependent_references_resolve_to_the_right_object() -> None:
    seen = {"operation": 0, "position": 0}
    for seed in range(120):
        chain = make_chain(random.Random(seed), 32, 4, dependent=True)
        assert any(step.reference for step in chain.steps)
        for j, step in enumerate(chain.steps, start=1):
            ref = step.reference
            if ref is None:
                assert step.phrase == step.edit.instruction
                continue
            seen[ref.kind] += 1
            assert ref.words in step.phrase and ref.words in chain.instruction
            assert ref.words not in step.edit.instruction and 1 <= ref.step < j
            earlier = chain.steps[ref.step - 1].edit
            if ref.kind == "operation":
                op = next(op for op, words in OPERATION_WORDS.items() if words == ref.words)
                assert earlier.op == op and earlier.targets == (ref.object_id,)
                ops = {op, "swapped"} if op == "moved" else {op}
                done = {t for s in chain.steps[: j - 1] if s.edit.op in ops for t in s.edit.targets}
                assert done == {ref.object_id}  # the words pick out exactly one object
                assert ref.object_id in step.edit.targets
                assert name_of(next(o for o in step.before["objects"] if o["id"] == ref.object_id)) in \
                    step.edit.instruction
            else:
                left = earlier.vacated[ref.object_id]
                new_ids = {o["id"]: o for o in step.edit.after["objects"]}
                placed = [new_ids[i]["box"] for i in step.edit.targets]
                assert len(placed) == 1 and step.edit.targets != (ref.object_id,)
                assert np.allclose(box_center(placed[0]), box_center(left), atol=0.5)
                assert f'"{ref.words}"' in chain.cot.thinking
    assert seen["operation"] > 50 and seen["position"] > 10, seen


def test_every_cot_fits_the_condition_budget(records: list) -> None:
    edits = [r for r in records if isinstance(r, EditRecord)]
    worst = max(len(render(r.cot).split()) + len(r.instruction.split()) for r in edits)
    assert 60 < worst <= COT_WORD_BUDGET
    with pytest.raises(RuntimeError, match="shorter --chain-length"):
        make_chain(random.Random(0), 32, 10, dependent=False)


def test_independent_chains_have_no_references() -> None:
    chain = make_chain(random.Random(5), 32, 4, dependent=False)
    assert all(s.reference is None for s in chain.steps)
    assert "reference resolution" not in chain.cot.understanding


def test_understanding_answers_are_correct(records: list) -> None:
    scenes = {r.id[1:]: r.scene_before for r in records if isinstance(r, EditRecord) and r.chain_id is None}
    questions = [r for r in records if isinstance(r, UnderstandingRecord)]
    assert {q.kind for q in questions} == {"grounding", "counting", "ocr", "spatial"}
    for q in questions:
        objects = scenes[q.id[1:]]["objects"]
        named = sorted((o for o in objects if name_of(o) in q.question), key=lambda o: q.question.index(name_of(o)))
        if q.kind == "grounding":
            assert q.answer == "[{}, {}, {}, {}]".format(*named[0]["box"])
        elif q.kind == "ocr":
            assert q.answer == named[0]["text"]
        elif q.kind == "counting":
            shape = next((s for s in SHAPES if f"{s}s" in q.question), None)
            assert int(q.answer) == sum(shape in (None, o["shape"]) for o in objects), q
        else:
            a, b = named[0]["box"], named[1]["box"]
            relation = re.search(r"(left|right|above|below)", q.question).group(1)
            truth = {"left": a[2] <= b[0], "right": b[2] <= a[0], "above": a[3] <= b[1], "below": b[3] <= a[1]}
            assert q.answer == ("yes" if truth[relation] else "no"), q


def test_splits_are_disjoint_and_complete(tiny_dataset: Path) -> None:  # noqa: F811
    splits = _load_all(tiny_dataset)
    keys = {}
    for split, recs in splits.items():
        assert all(r.split == split for r in recs)
        scenes = {json.dumps(r.scene_before, sort_keys=True) for r in recs if isinstance(r, EditRecord)}
        images = {p for r in recs
                  for p in ((r.source_image, r.target_image) if isinstance(r, EditRecord) else (r.image,))}
        chains = {r.chain_id for r in recs if isinstance(r, EditRecord) and r.chain_id}
        keys[split] = ({r.id for r in recs}, images, scenes, chains)
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        for index, what in enumerate(("ids", "images", "source scenes", "chains")):
            assert not keys[a][index] & keys[b][index], f"{what} shared by {a} and {b}"
    sizes = [len([r for r in splits[s] if isinstance(r, EditRecord) and not r.chain_id]) for s in splits]
    assert sizes == [298, 16, 16]  # round(330 * 5 %) = 16 each for val and test
    assert [split_of(i, 100) for i in (0, 89, 90, 94, 95, 99)] == ["train", "train", "val", "val", "test", "test"]
    assert [split_of(i, 2) for i in range(2)] == ["train", "train"]


def test_manifest_counts_match_the_records(tiny_dataset: Path, records: list) -> None:  # noqa: F811
    manifest = json.loads((tiny_dataset / "manifest.json").read_text())
    assert manifest["seed"] == 0 and manifest["settings"]["resolution"] == 32
    edits = [r for r in records if isinstance(r, EditRecord) and r.chain_id is None]
    assert manifest["counts"]["edits"]["categories"] == {c: 30 for c in sorted(CATEGORIES)}
    assert set(manifest["counts"]["edits"]["meta_tasks"]) == {m.value for m in MetaTask}
    assert manifest["counts"]["edits"]["meta_tasks"]["Camera Motion"] == 60
    assert manifest["counts"]["chains"]["count"] == 24 and manifest["counts"]["chains"]["dependent"] == 12
    assert sum(manifest["counts"]["understanding"]["kinds"].values()) == len(edits)
    assert manifest["content_sha256"] == content_hash(tiny_dataset)
    assert manifest["files"] == len(list((tiny_dataset / "images").iterdir())) + 3


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != COMPLETE_MARKER}


def test_same_seed_byte_identical_any_worker_count_and_other_seed_differs(tmp_path: Path) -> None:
    a = generate(tmp_path / "a", 40, 3, chains=4, chain_length=2, workers=1)
    b = generate(tmp_path / "b", 40, 3, chains=4, chain_length=2, workers=2)
    c = generate(tmp_path / "c", 40, 4, chains=4, chain_length=2, workers=1)
    files_a, files_b, files_c = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert len(files_a) == 4 + 80 + 4 * 3
    assert files_a == files_b and a == b
    assert a["content_sha256"] != c["content_sha256"]
    assert files_a.keys() == files_c.keys()
    assert sum(files_a[k] != files_c[k] for k in files_a if k.endswith(".png")) > 70


def test_sample_scene_images() -> None:
    images = sample_scene_images(6, 48, seed=1)
    assert [im.size for im in images] == [(48, 48)] * 6 and {im.mode for im in images} == {"RGB"}
    assert [im.tobytes() for im in images] == [im.tobytes() for im in sample_scene_images(6, 48, seed=1)]
    assert len({im.tobytes() for im in images} | {im.tobytes() for im in sample_scene_images(6, 48, seed=2)}) == 12
    with pytest.raises(ValueError, match="resolution"):
        sample_scene_images(2, 8, seed=0)


@pytest.mark.parametrize("shape", SHAPES)
def test_shapes_fill_their_box_tightly(shape: str) -> None:
    for w, h in [(3, 3), (6, 6), (7, 8), (10, 10), (20, 19)]:
        scene = {"width": 32, "height": 32, "background": "white",
                 "objects": [{"id": "o1", "shape": shape, "color": "red", "size": "small",
                              "box": [4, 5, 4 + w, 5 + h]}]}
        ys, xs = np.nonzero((np.asarray(render_scene(scene)) != 255).any(axis=-1))
        assert [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] == [4, 5, 4 + w, 5 + h]


def test_cli_synth_and_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "d"
    assert cli.main(["synth", "--out", str(out), "--n", "12", "--seed", "1", "--chains", "2"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert cli.main(["synth", "--out", str(out), "--n", "12", "--seed", "1"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert cli.main(["synth", "--out", str(tmp_path / "e"), "--n", "3", "--seed", "0", "--resolution", "8"]) == 2
    assert "--resolution must be >= 24" in capsys.readouterr().err
    assert cli.main(["nonsense"]) == 2
    assert "invalid choice" in capsys.readouterr().err
    assert cli.main(["check", str(out / "train.jsonl")]) == 0
    lines = (out / "train.jsonl").read_text().splitlines()
    lines[2] = lines[2].replace('"split":"train"', '"split":"dev"')
    (out / "train.jsonl").write_text("\n".join(lines) + "\n")
    (out / lines[0].split('"source_image":"')[1].split('"')[0]).unlink()
    assert cli.main(["check", str(out / "train.jsonl")]) == 1
    err = capsys.readouterr().err.splitlines()
    assert any(line.startswith(f"{out / 'train.jsonl'}:1: source_image: image file") for line in err), err
    assert any(line.startswith(f"{out / 'train.jsonl'}:3: split: 'dev'") for line in err), err
