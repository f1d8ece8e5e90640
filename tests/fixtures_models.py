"""Session fixture ``tiny_models``: the tiny editing pipeline + tiny VLM, built once and cached across sessions.

The build (tokenizer, random VLM and MMDiT, a VAE trained for 1-3 minutes) is cached under
``${METACOT_CACHE:-~/.cache/metacot}/tiny/<key>``, where the key hashes the builder's source files (and the scene
generator the VAE trains on) and the torch / transformers / diffusers / tokenizers versions: editing any of them
rebuilds. The cache folder is written atomically, so a killed build never looks complete, and a lock file makes a
second session wait for a build in progress instead of repeating it. Tests never depend on the cache being warm: a
cold cache builds.

The folders are shared by every test of every session: treat them as read-only (copy them to change them).
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Everything the built folders depend on; a change to any of these files changes the cache key.
BUILDER_SOURCES = (
    "metacot/models/tiny.py", "metacot/models/tiny_vae.py", "metacot/models/conditioning.py",
    "data_recipes/synth.py", "metacot/scenes.py", "metacot/cot/schema.py",
)
RESOLUTION, SEED = 32, 0


@dataclasses.dataclass(frozen=True)
class TinyModels:
    """Paths of the tiny models (read-only).

    Attributes:
        root: the cache folder holding both.
        pipeline: ``QwenImageEditPipeline`` folder (``load_editing_model`` / ``DiffusionPipeline.from_pretrained``).
        vlm: the same Qwen2.5-VL as ``pipeline/text_encoder`` with its processor, in one folder (vLLM, AutoModel).
        resolution: the scene size the VAE was trained on.
    """

    root: Path
    pipeline: Path
    vlm: Path
    resolution: int = RESOLUTION


def cache_key() -> str:
    """Hash of the builder sources and library versions (first 16 hex digits)."""
    import diffusers
    import tokenizers
    import torch
    import transformers

    digest = hashlib.sha256()
    for rel in BUILDER_SOURCES:
        digest.update(rel.encode() + b"\0" + (REPO / rel).read_bytes() + b"\0")
    for module in (torch, transformers, diffusers, tokenizers):
        digest.update(f"{module.__name__}={module.__version__}\0".encode())
    digest.update(f"resolution={RESOLUTION},seed={SEED}".encode())
    return digest.hexdigest()[:16]


def cache_root() -> Path:
    return Path(os.environ.get("METACOT_CACHE", "~/.cache/metacot")).expanduser() / "tiny"


def build_or_reuse(dest: Path) -> TinyModels:
    """Return the tiny models in ``dest``, building them there first if no complete build exists."""
    from metacot.models.cli import build_tiny
    from metacot.run import atomic_dir, is_complete

    dest.parent.mkdir(parents=True, exist_ok=True)
    # One builder per key: a concurrent session waits for the build in progress instead of repeating it.
    with open(dest.parent / f"{dest.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not is_complete(dest):
            with atomic_dir(dest, overwrite=dest.exists()) as tmp:
                build_tiny(tmp, resolution=RESOLUTION, seed=SEED)
    return TinyModels(root=dest, pipeline=dest / "pipeline", vlm=dest / "vlm")


@pytest.fixture(scope="session")
def tiny_models() -> TinyModels:
    """The tiny editing pipeline and VLM, built once per source version (see the module docstring)."""
    return build_or_reuse(cache_root() / cache_key())
