"""Mixing: several record files -> one training JSONL, by a recipe YAML, with the mixture's statistics.

Run::

    metacot data mix --recipe recipes/sft_mix.yaml --out data/sft_mix

A recipe (paths relative to the recipe file)::

    seed: 0
    split: train                  # only records of this split are drawn (default train)
    total: 20000                  # weights mode: size of the mixture
    understanding_fraction: 0.2   # weights mode, optional: share of understanding samples
    sources:
      - {name: synth, path: ../data/synth/train.jsonl, weight: 2}
      - {name: magicbrush, path: ../data/magicbrush_cot/train.jsonl, weight: 1}

Two modes, one per recipe: every source has a ``weight`` (then ``total`` is required), or every source has a
``count`` (exact samples from it; no ``total`` nor ``understanding_fraction``). With weights, each kind's share of
``total`` (edit / understanding, when ``understanding_fraction`` is set; else all records together) is split
across the sources that have records of that kind in proportion to their weights (largest remainder, so counts
add up exactly). A source asked for more samples than it has is repeated: every record ``n // m`` times, plus
``n % m`` drawn without replacement, and each repeat gets an id suffix ``#2``, ``#3``, ...

Output (atomic)::

    OUT/<split>.jsonl     the mixture, shuffled; ids and chain ids prefixed ``<source name>/``, image paths
                          relative to OUT (the images stay where the sources keep them)
    OUT/manifest.json     the resolved recipe, counts per source x kind, per kind, per meta-task, per category,
                          per understanding kind, repeats, and the SHA-256 of the JSONL
    OUT/recipe.yaml       the recipe as given

Same recipe and seed, byte-identical JSONL: every draw uses its own ``random.Random`` seeded by (seed, source,
kind), so adding a source does not change what the others contribute.

Deliberately left out: mixing on the fly inside the trainers, temperature sampling, and deduplication across
sources (the ``name/`` prefix keeps ids apart; the same image in two sources is drawn as two samples).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from data_recipes.importers import load_dataset_records, write_dataset_records
from metacot.cot.schema import SPLITS, EditRecord, Record, UnderstandingRecord
from metacot.run import atomic_dir

KINDS = ("edit", "understanding")
_RECIPE_KEYS = {"seed", "split", "total", "understanding_fraction", "sources"}
_SOURCE_KEYS = {"name", "path", "weight", "count"}


class RecipeError(ValueError):
    """A mixing recipe is invalid; the message names the key and what to change."""


@dataclass(frozen=True)
class Source:
    """One recipe source: ``name`` (id prefix), ``path`` (resolved), and its ``weight`` or ``count``."""

    name: str
    path: Path
    weight: float | None
    count: int | None


@dataclass(frozen=True)
class Recipe:
    """A validated mixing recipe (see the module docstring)."""

    seed: int
    split: str
    total: int | None
    understanding_fraction: float | None
    sources: tuple[Source, ...]


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe YAML.

    Raises:
        RecipeError: a key is unknown, missing or out of range, or the modes are mixed.
        FileNotFoundError: the recipe does not exist.
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a mapping with keys {sorted(_RECIPE_KEYS)}")
    _keys(data, _RECIPE_KEYS, str(path))
    seed, split = data.get("seed"), data.get("split", "train")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise RecipeError(f"{path}: seed: give an integer (same seed, same mixture), got {seed!r}")
    if split not in SPLITS:
        raise RecipeError(f"{path}: split: {split!r} is not one of {', '.join(SPLITS)}")
    raw_sources = data.get("sources")
    if not isinstance(raw_sources, list) or not raw_sources:
        raise RecipeError(f"{path}: sources: give a non-empty list of {{name, path, weight | count}}")
    sources = tuple(_source(s, i, path) for i, s in enumerate(raw_sources))
    names = Counter(s.name for s in sources)
    if any(n > 1 for n in names.values()):
        raise RecipeError(f"{path}: sources: names repeat {[k for k, n in names.items() if n > 1]}; give each a "
                          "unique name (it prefixes its ids)")
    total, fraction = data.get("total"), data.get("understanding_fraction")
    weighted = [s.weight is not None for s in sources]
    if all(weighted):
        if not isinstance(total, int) or isinstance(total, bool) or total < 1:
            raise RecipeError(f"{path}: total: sources have weights, so give the mixture size (integer >= 1)")
        if fraction is not None and not (isinstance(fraction, (int, float)) and 0 <= fraction <= 1):
            raise RecipeError(f"{path}: understanding_fraction: give a number in [0, 1], got {fraction!r}")
    elif not any(weighted):
        if total is not None or fraction is not None:
            raise RecipeError(f"{path}: sources have counts, so total and understanding_fraction do not apply; "
                              "remove them or give every source a weight instead")
    else:
        raise RecipeError(f"{path}: sources: give every source a weight, or every source a count, not a mix")
    return Recipe(seed, split, total, None if fraction is None else float(fraction), sources)


def _keys(data: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise RecipeError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")


def _source(data: Any, index: int, recipe: Path) -> Source:
    where = f"{recipe}: sources[{index}]"
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: give a mapping {{name, path, weight | count}}")
    _keys(data, _SOURCE_KEYS, where)
    if not isinstance(data.get("path"), str):
        raise RecipeError(f"{where}: path: give the JSONL file (relative to the recipe's folder)")
    path = (recipe.parent / data["path"]).resolve()
    name = data.get("name", path.parent.name if path.stem in SPLITS else path.stem)
    if not isinstance(name, str) or not name or "/" in name:
        raise RecipeError(f"{where}: name: give a non-empty name without '/', got {name!r}")
    weight, count = data.get("weight"), data.get("count")
    if (weight is None) == (count is None):
        raise RecipeError(f"{where}: give exactly one of weight or count")
    if weight is not None and not (isinstance(weight, (int, float)) and not isinstance(weight, bool) and weight > 0):
        raise RecipeError(f"{where}: weight: give a number > 0, got {weight!r}")
    if count is not None and not (isinstance(count, int) and not isinstance(count, bool) and count >= 0):
        raise RecipeError(f"{where}: count: give an integer >= 0, got {count!r}")
    return Source(name, path, None if weight is None else float(weight), count)


# ------------------------------------------------------------------------------------------------------ drawing
def allocate(total: int, weights: list[float]) -> list[int]:
    """Split ``total`` into integers proportional to ``weights`` (largest remainder; ties to the earlier one)."""
    exact = [total * w / sum(weights) for w in weights]
    counts = [int(e) for e in exact]
    order = sorted(range(len(weights)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


def draw(records: list[Record], n: int, rng: random.Random) -> list[tuple[Record, int]]:
    """``n`` (record, repeat) pairs: whole passes over ``records`` plus a sample without replacement.

    ``repeat`` is 1 for a record's first copy, 2 for the second, ...
    """
    if n and not records:
        raise ValueError("cannot draw from an empty source")
    passes, rest = divmod(n, len(records)) if records else (0, 0)
    out = [(r, k) for k in range(1, passes + 1) for r in records]
    out += [(r, passes + 1) for r in rng.sample(records, rest)]
    return out


def _kind(record: Record) -> str:
    return "edit" if isinstance(record, EditRecord) else "understanding"


def _plan(recipe: Recipe, pools: dict[str, list[Record]]) -> dict[tuple[str, str | None], int]:
    """Samples per (source, kind); kind None = all of the source's records together."""
    if recipe.total is None:
        return {(s.name, None): s.count or 0 for s in recipe.sources}
    if recipe.understanding_fraction is None:
        counts = allocate(recipe.total, [s.weight or 0.0 for s in recipe.sources])
        return {(s.name, None): c for s, c in zip(recipe.sources, counts, strict=True)}
    wanted = {"understanding": round(recipe.total * recipe.understanding_fraction)}
    wanted["edit"] = recipe.total - wanted["understanding"]
    plan: dict[tuple[str, str | None], int] = {}
    for kind, n in wanted.items():
        having = [s for s in recipe.sources if any(_kind(r) == kind for r in pools[s.name])]
        if n and not having:
            raise RecipeError(f"the recipe asks for {n} {kind} samples but no source has {kind} records in split "
                              f"{recipe.split!r}; lower understanding_fraction or add a source")
        for source, count in zip(having, allocate(n, [s.weight or 0.0 for s in having]) if having else [], strict=True):
            plan[(source.name, kind)] = count
    return plan


def _renamed(record: Record, source: str, repeat: int) -> Record:
    new_id = f"{source}/{record.id}" + (f"#{repeat}" if repeat > 1 else "")
    if isinstance(record, EditRecord) and record.chain_id is not None:
        return dataclasses.replace(record, id=new_id, chain_id=f"{source}/{record.chain_id}")
    return dataclasses.replace(record, id=new_id)


# ------------------------------------------------------------------------------------------------------ mixing
def mix(recipe_path: str | Path, out: str | Path, overwrite: bool = False) -> dict[str, Any]:
    """Build the mixture a recipe describes (see the module docstring) and return its manifest.

    Raises:
        RecipeError: invalid recipe, or it asks for a kind no source has.
        metacot.cot.schema.DataError: a source file has invalid records or missing images.
        metacot.run.RunError: ``out`` exists and ``overwrite`` is False.
    """
    recipe_path = Path(recipe_path)
    recipe = load_recipe(recipe_path)
    pools = {s.name: [r for r in load_dataset_records(s.path) if r.split == recipe.split] for s in recipe.sources}
    plan = _plan(recipe, pools)
    mixture: list[tuple[str, Record, int]] = []
    for (name, kind), n in plan.items():
        pool = [r for r in pools[name] if kind is None or _kind(r) == kind]
        if n and not pool:
            raise RecipeError(f"source {name!r} has no records in split {recipe.split!r} but {n} are asked of it")
        rng = random.Random(f"mix:{recipe.seed}:{name}:{kind}")
        mixture += [(name, r, k) for r, k in draw(pool, n, rng)]
    random.Random(f"mix:{recipe.seed}:shuffle").shuffle(mixture)
    records = [_renamed(r, name, k) for name, r, k in mixture]
    with atomic_dir(Path(out), overwrite=overwrite, meta={"recipe": "mix"}) as tmp:
        jsonl = tmp / f"{recipe.split}.jsonl"
        write_dataset_records(jsonl, records)
        shutil.copyfile(recipe_path, tmp / "recipe.yaml")
        manifest = {"recipe": _recipe_dict(recipe), "counts": _stats(mixture, pools),
                    "jsonl_sha256": hashlib.sha256(jsonl.read_bytes()).hexdigest()}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def _recipe_dict(recipe: Recipe) -> dict[str, Any]:
    data = dataclasses.asdict(recipe)
    data["sources"] = [{**dataclasses.asdict(s), "path": str(s.path)} for s in recipe.sources]
    return data


def _stats(mixture: list[tuple[str, Record, int]], pools: dict[str, list[Record]]) -> dict[str, Any]:
    def tally(items: Any) -> dict[str, int]:
        return dict(sorted(Counter(items).items()))

    edits = [r for _, r, _ in mixture if isinstance(r, EditRecord)]
    return {
        "total": len(mixture),
        "kinds": tally(_kind(r) for _, r, _ in mixture),
        "sources": {name: {"available": tally(_kind(r) for r in pool),
                           "drawn": tally(_kind(r) for n, r, _ in mixture if n == name),
                           "repeated": sum(1 for n, _, k in mixture if n == name and k > 1)}
                    for name, pool in pools.items()},
        "meta_tasks": tally(m.value if r.cot is not None else "(no cot)"
                            for r in edits for m in (dict.fromkeys(r.meta_tasks) or [None])),
        "edits_without_cot": sum(1 for r in edits if r.cot is None),
        "categories": tally(r.category for r in edits),
        "understanding_kinds": tally(r.kind for _, r, _ in mixture if isinstance(r, UnderstandingRecord)),
    }
