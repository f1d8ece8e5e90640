"""``metacot models ...``: build the tiny local models that tests, CPU smoke runs and the quickstart use.

Subcommand:

- ``metacot models tiny --out DIR [--resolution 32] [--seed 0] [--size tiny|mini] [--vae-from PIPELINE] [--overwrite]``
  writes

  - ``DIR/pipeline``: a ``QwenImageEditPipeline`` folder (``DiffusionPipeline.from_pretrained`` /
    ``metacot.models.load_editing_model``). Its ``text_encoder/`` + ``processor/`` are the tiny Qwen2.5-VL and load
    on their own with ``AutoModelForImageTextToText`` / ``AutoProcessor``; ``vae_report.json`` has the VAE's held-out
    reconstruction error.
  - ``DIR/vlm``: the same VLM (same seed, identical weights) with its processor in ONE folder, because vLLM (the
    judge server) and ``from_pretrained`` without a subfolder need model and processor side by side.

  It prints both paths, the build time, the VAE reconstruction error and the token length of the stock pipeline's
  dropped system prefix (64, as on the real tokenizer).

Errors print as one line on stderr and return a non-zero exit code.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metacot models", description="Build tiny local models (no model hub).")
    sub = parser.add_subparsers(dest="command", required=True)
    tiny = sub.add_parser("tiny", help="tiny Qwen-Image-Edit pipeline folder + tiny Qwen2.5-VL folder")
    tiny.add_argument("--out", required=True, type=Path, help="output folder; gets pipeline/ and vlm/")
    tiny.add_argument("--resolution", type=int, default=32, help="scene side the VAE is trained on (default 32)")
    tiny.add_argument("--seed", type=int, default=0, help="seed of every random component (default 0)")
    tiny.add_argument("--overwrite", action="store_true", help="replace existing pipeline/ and vlm/ folders")
    tiny.add_argument("--size", default="tiny", help="widths and depths: tiny (tests, CPU) or mini (GPU learning runs)")
    tiny.add_argument("--vae-from", type=Path, default=None,
                      help="reuse the trained VAE of this pipeline folder (same resolution) instead of training one")
    return parser


def build_tiny(
    out: Path, resolution: int = 32, seed: int = 0, overwrite: bool = False, size: str = "tiny",
    vae_from: Path | None = None,
) -> dict[str, object]:
    """Build ``out/pipeline`` and ``out/vlm``; return the facts the command prints.

    Raises:
        FileExistsError: a target folder exists and ``overwrite`` is False (checked before any work).
    """
    from transformers import AutoTokenizer

    from metacot.models.conditioning import system_prefix_length
    from metacot.models.tiny import build_tiny_editing_model, build_tiny_vlm

    pipeline_dir, vlm_dir = out / "pipeline", out / "vlm"
    for path in (pipeline_dir, vlm_dir):
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} already exists; pass --overwrite to replace it or choose another --out")
    start = time.perf_counter()
    build_tiny_editing_model(pipeline_dir, resolution=resolution, seed=seed, overwrite=overwrite, size=size,
                             vae_from=vae_from)
    build_tiny_vlm(vlm_dir, arch="qwen2_5_vl", seed=seed, overwrite=overwrite, size=size)
    report = json.loads((pipeline_dir / "vae_report.json").read_text())
    return {
        "pipeline": str(pipeline_dir), "vlm": str(vlm_dir), "build_seconds": round(time.perf_counter() - start, 1),
        "vae_heldout_mse": report["heldout_mse"], "vae_heldout_psnr_db": report["heldout_psnr_db"],
        "vae_mean_colour_baseline_mse": report["mean_colour_baseline_mse"],
        "system_prefix_tokens": system_prefix_length(AutoTokenizer.from_pretrained(pipeline_dir / "tokenizer")),
    }


def main(argv: list[str]) -> int:
    """Entry of ``metacot models``; returns the exit code."""
    args = _parser().parse_args(argv)
    try:
        facts = build_tiny(args.out, args.resolution, args.seed, args.overwrite, args.size, args.vae_from)
    except (FileExistsError, ValueError, RuntimeError) as exc:
        print(f"metacot models {args.command}: {exc}", file=sys.stderr)
        return 1
    print(f"pipeline: {facts['pipeline']}")
    print(f"vlm:      {facts['vlm']}")
    print(
        f"built in {facts['build_seconds']} s; VAE held-out reconstruction MSE {facts['vae_heldout_mse']:.5f} "
        f"(PSNR {facts['vae_heldout_psnr_db']} dB; mean-colour baseline MSE "
        f"{facts['vae_mean_colour_baseline_mse']:.5f}); stock system prefix = {facts['system_prefix_tokens']} tokens"
    )
    return 0
