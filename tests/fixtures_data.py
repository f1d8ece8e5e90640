"""Data fixtures: a tiny synthetic dataset generated once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

TINY_N, TINY_CHAINS, TINY_CHAIN_LENGTH, TINY_RESOLUTION, TINY_SEED = 330, 24, 3, 32, 0


@pytest.fixture(scope="session")
def tiny_dataset(session_dir: Path) -> Path:
    """Folder of a synthetic dataset: 330 edit + 330 understanding samples and 24 chains of 3 steps at 32 px.

    Layout: ``manifest.json``, ``{train,val,test}.jsonl`` (load with ``metacot.cot.schema.load_records``),
    ``images/``. Every category appears 30 times; odd chains carry injected dependencies. About 1 s to build.
    """
    from data_recipes.synth import generate

    out = session_dir / "tiny_synth"
    if not out.exists():
        generate(out, TINY_N, TINY_SEED, resolution=TINY_RESOLUTION, chains=TINY_CHAINS,
                 chain_length=TINY_CHAIN_LENGTH, workers=1)
    return out
