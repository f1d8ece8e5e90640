"""``metacot edit`` end to end on the tiny export and a run's ``final/``, and its pure helpers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from metacot.export import edit as edit_cli
from metacot.export.edit import EditError, edit_size


def test_edit_size_keeps_the_source_size_and_rounds_to_the_latent_grid() -> None:
    assert edit_size(32, 32, None, 8) == (32, 32)
    assert edit_size(50, 30, None, 8) == (32, 48)  # (height, width), each rounded to a multiple of 8
    assert edit_size(4000, 3000, None, 16) == (880, 1184)  # larger than 1 MP: scaled down to about 1 MP
    assert edit_size(100, 50, 64, 8) == (32, 64)  # --size sets the longer side
    with pytest.raises(EditError, match="below this model's minimum side of 16"):
        edit_size(32, 32, 8, 16)


@pytest.fixture()
def source_png(tiny_dataset: Path, tmp_path: Path) -> tuple[Path, str]:
    records = [json.loads(line) for line in (tiny_dataset / "val.jsonl").read_text().splitlines()]
    record = next(r for r in records if "source_image" in r)  # the first edit record (understanding ones have none)
    path = tmp_path / "in.png"
    Image.open(tiny_dataset / record["source_image"]).convert("RGB").save(path)
    return path, record["instruction"]


@pytest.mark.slow
def test_edit_writes_the_cot_then_the_edit(tiny_sft_export: Path, source_png, tmp_path: Path, capsys) -> None:
    image, instruction = source_png
    out = tmp_path / "out.png"
    rc = edit_cli.main(["--model", str(tiny_sft_export), "--image", str(image), "--instruction", instruction,
                        "--out", str(out), "--steps", "2", "--cfg", "2.0", "--max-cot-tokens", "24"])
    printed = capsys.readouterr().out
    assert rc == 0 and printed.startswith("Meta-CoT:\n") and f"edited image: {out}" in printed
    edited = np.asarray(Image.open(out))
    assert edited.shape == np.asarray(Image.open(image)).shape and np.isfinite(edited).all()

    assert edit_cli.main(["--model", str(tiny_sft_export), "--image", str(image), "--instruction", instruction,
                          "--out", str(tmp_path / "none.png"), "--cot-only", "--max-cot-tokens", "8"]) == 0
    assert capsys.readouterr().out.startswith("Meta-CoT:\n") and not (tmp_path / "none.png").exists()


@pytest.mark.slow
def test_no_cot_edit_equals_metacots_sampler_on_the_instruction(tiny_sft_run: Path, source_png, tmp_path: Path,
                                                                capsys) -> None:
    import torch

    from metacot.models.conditioning import build_prompt
    from metacot.models.loading import load_editing_model
    from metacot.models.sampler import edit

    image, instruction = source_png
    out = tmp_path / "out.png"
    final = tiny_sft_run / "final"
    rc = edit_cli.main(["--model", str(final), "--image", str(image), "--instruction", instruction, "--out", str(out),
                        "--steps", "2", "--cfg", "1.0", "--seed", "3", "--no-cot"])
    assert rc == 0 and "Meta-CoT" not in capsys.readouterr().out
    model = load_editing_model(final)
    source = Image.open(image).convert("RGB")
    want = edit(model, [source], [build_prompt(instruction, None)], height=source.height, width=source.width,
                num_steps=2, cfg_scale=1.0, generator=torch.Generator().manual_seed(3))[0]
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(want))


def test_edit_refuses_a_folder_that_is_no_model(tmp_path: Path, capsys) -> None:
    (tmp_path / "final").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "in.png")
    rc = edit_cli.main(["--model", str(tmp_path), "--image", str(tmp_path / "in.png"), "--instruction", "x"])
    assert rc == 1 and f"pass {tmp_path / 'final'}" in capsys.readouterr().err
