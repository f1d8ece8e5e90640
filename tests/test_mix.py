"""Mixing recipes: exact allocation by weight and kind, repeats, determinism, statistics, recipe errors."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path

import pytest

from data_recipes.cli import main
from data_recipes.importers import load_dataset_records, write_dataset_records
from data_recipes.mix import RecipeError, allocate, load_recipe, mix
from metacot.cot.schema import EditRecord, UnderstandingRecord, load_records


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """synth/train.jsonl (edits with CoT + understanding) and small/train.jsonl (5 CoT-less edits, one chain)."""
    from data_recipes.synth import generate

    root = tmp_path_factory.mktemp("mix")
    generate(root / "synth", 40, 0, chains=2, chain_length=2)
    edits = [r for r in load_records(root / "synth" / "train.jsonl") if isinstance(r, EditRecord)][:5]
    (root / "small").mkdir()
    write_dataset_records(root / "small" / "train.jsonl", [dataclasses.replace(r, cot=None, meta_tasks=())
                                                           for r in edits])
    return root


def recipe(root: Path, body: str, name: str = "recipe.yaml") -> Path:
    (root / "recipes").mkdir(exist_ok=True)
    path = root / "recipes" / name
    path.write_text(body)
    return path


WEIGHTED = """
seed: 7
total: 60
understanding_fraction: 0.25
sources:
  - {path: ../synth/train.jsonl, weight: 2}
  - {path: ../small/train.jsonl, weight: 1}
"""


def test_allocate_is_exact_and_proportional() -> None:
    assert allocate(10, [1, 1, 1]) == [4, 3, 3]
    assert allocate(7, [2, 1]) == [5, 2]
    assert sum(allocate(1001, [0.3, 0.5, 0.2])) == 1001


def test_weighted_mixture_counts_repeats_and_stats(sources: Path, tmp_path: Path) -> None:
    manifest = mix(recipe(sources, WEIGHTED), tmp_path / "m")
    records = load_dataset_records(tmp_path / "m" / "train.jsonl")  # images resolve from the new folder
    kinds = Counter(type(r).__name__ for r in records)
    assert kinds == {"EditRecord": 45, "UnderstandingRecord": 15}
    by_source = Counter(r.id.split("/")[0] for r in records if isinstance(r, EditRecord))
    assert by_source == {"synth": 30, "small": 15}  # 45 edits split 2:1; the small source has no understanding
    small = [r for r in records if r.id.startswith("small/")]
    assert Counter(r.id.split("#")[0] for r in small) == {f"small/{i}": 3 for i in
                                                            {r.id.split("#")[0][6:] for r in small}}  # 5 x 3
    assert all(r.cot is None for r in small) and len({r.id for r in records}) == 60
    chained = [r for r in records if isinstance(r, EditRecord) and r.chain_id is not None]
    assert all(r.chain_id.startswith(("synth/", "small/")) for r in chained)
    counts = manifest["counts"]
    assert counts["sources"]["small"]["repeated"] == 10 and counts["edits_without_cot"] == 15
    assert counts["meta_tasks"]["(no cot)"] == 15 and sum(counts["understanding_kinds"].values()) == 15
    assert (tmp_path / "m" / "recipe.yaml").read_text() == WEIGHTED


def test_same_seed_same_bytes_other_seed_differs(sources: Path, tmp_path: Path) -> None:
    path = recipe(sources, WEIGHTED)
    mix(path, tmp_path / "a")
    mix(path, tmp_path / "b")
    assert (tmp_path / "a" / "train.jsonl").read_bytes() == (tmp_path / "b" / "train.jsonl").read_bytes()
    mix(recipe(sources, WEIGHTED.replace("seed: 7", "seed: 8"), "r8.yaml"), tmp_path / "c")
    assert (tmp_path / "a" / "train.jsonl").read_bytes() != (tmp_path / "c" / "train.jsonl").read_bytes()


def test_count_mode_and_split_filter(sources: Path, tmp_path: Path) -> None:
    body = """
seed: 0
split: val
sources:
  - {name: s, path: ../synth/val.jsonl, count: 3}
"""
    manifest = mix(recipe(sources, body, "count.yaml"), tmp_path / "v")
    records = load_records(tmp_path / "v" / "val.jsonl")
    available = len(load_records(sources / "synth" / "val.jsonl"))
    assert len(records) == 3 and all(r.split == "val" and r.id.startswith("s/") for r in records)
    assert manifest["counts"]["sources"]["s"]["available"] == Counter(
        "edit" if isinstance(r, EditRecord) else "understanding" for r in load_records(sources / "synth" / "val.jsonl"))
    assert available > 3 and json.loads((tmp_path / "v" / "manifest.json").read_text())["recipe"]["split"] == "val"


@pytest.mark.parametrize("body, message", [
    ("seed: 0\ntotal: 5\nsources:\n  - {path: ../synth/train.jsonl, weight: 1}\n  - {path: ../small/train.jsonl, "
     "count: 2}\n", "not a mix"),
    ("seed: 0\nsources:\n  - {path: ../synth/train.jsonl, weight: 1}\n", "total"),
    ("seed: 0\ntotal: 5\nshuffle: true\nsources:\n  - {path: ../synth/train.jsonl, weight: 1}\n", "unknown key"),
    ("seed: 0\ntotal: 5\nsources:\n  - {path: ../synth/train.jsonl, weight: 0}\n", "weight: give a number > 0"),
    ("seed: 0\ntotal: 5\nsources:\n  - {path: ../synth/train.jsonl, weight: 1}\n  - {path: ../synth/val.jsonl, "
     "weight: 1, name: synth}\n", "names repeat"),
    ("total: 5\nsources:\n  - {path: ../synth/train.jsonl, weight: 1}\n", "seed"),
])
def test_recipe_errors_name_the_key(sources: Path, body: str, message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        load_recipe(recipe(sources, body, "bad.yaml"))


def test_understanding_asked_of_sources_without_any(sources: Path, tmp_path: Path) -> None:
    body = "seed: 0\ntotal: 4\nunderstanding_fraction: 0.5\nsources:\n  - {path: ../small/train.jsonl, weight: 1}\n"
    with pytest.raises(RecipeError, match="no source has understanding records"):
        mix(recipe(sources, body, "u.yaml"), tmp_path / "u")
    assert not (tmp_path / "u").exists()


def test_cli_mix(sources: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["mix", "--recipe", str(recipe(sources, WEIGHTED)), "--out", str(tmp_path / "m")]) == 0
    assert "60 samples" in capsys.readouterr().out
    assert main(["mix", "--recipe", str(recipe(sources, "seed: 0\n", "e.yaml")), "--out", str(tmp_path / "e")]) == 2
    assert "sources" in capsys.readouterr().err
    assert isinstance(load_dataset_records(tmp_path / "m" / "train.jsonl")[0], (EditRecord, UnderstandingRecord))
