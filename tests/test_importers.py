"""Importers: small local fixtures in each layout (parquet, JSONL, datasets folders), no downloads."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from data_recipes.cli import main
from data_recipes.importers import (
    UNCATEGORISED,
    DatasetImportError,
    import_dataset,
    load_dataset_records,
    parse_maps,
    read_dataset,
)
from metacot.cot.schema import EditRecord, UnderstandingRecord, load_records


def png(color: tuple[int, int, int], size: tuple[int, int] = (20, 12)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def pixel(path: str) -> tuple[int, int, int]:
    with Image.open(path) as image:
        return image.convert("RGB").getpixel((0, 0))


def write_parquet(path: Path, columns: dict[str, list]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path)
    return path


@pytest.fixture
def magicbrush_parquet(tmp_path: Path) -> Path:
    """MagicBrush layout: image structs {bytes, path}, chains a (turns 1-2) and b (turn 1), plus a mask column."""
    colors = [(200, 0, 0), (0, 200, 0), (0, 0, 200), (90, 90, 90)]
    img = [{"bytes": png(c), "path": None} for c in colors]
    return write_parquet(tmp_path / "train-00000-of-00001.parquet", {
        "img_id": ["a", "a", "b"], "turn_index": [1, 2, 1],
        "source_img": [img[0], img[1], img[2]], "mask_img": [img[3]] * 3,
        "instruction": ["make it green", "make it blue", "make it grey"],
        "target_img": [img[1], img[2], img[3]],
    })


def test_magicbrush_parquet_chains_and_dedup(magicbrush_parquet: Path, tmp_path: Path) -> None:
    out = tmp_path / "mb"
    manifest = import_dataset("magicbrush", magicbrush_parquet, out)
    records = load_dataset_records(out / "train.jsonl")
    assert [r.id for r in records] == ["a-1", "a-2", "b-1"]
    assert [(r.chain_id, r.chain_step) for r in records] == [("a", 1), ("a", 2), ("b", 1)]
    assert all(isinstance(r, EditRecord) and r.cot is None and r.meta_tasks == () for r in records)
    assert records[1].instruction == "make it blue" and records[1].category == UNCATEGORISED
    # the target of turn 1 is the source of turn 2: one file; 4 distinct images in all (the mask is not imported)
    assert records[0].target_image == records[1].source_image
    assert manifest["images"] == 4 and len(list((out / "images").iterdir())) == 4
    assert pixel(records[1].source_image) == (0, 200, 0) and pixel(records[2].target_image) == (90, 90, 90)
    assert manifest["counts"] == {"train": 3} and manifest["chains"] == 2
    # The schema itself reads CoT-less edit records (cot null, meta_tasks []) until they are annotated.
    assert [r.cot for r in load_records(out / "train.jsonl")] == [None, None, None]


def test_zero_based_turns_are_shifted_and_gaps_refused(tmp_path: Path) -> None:
    img = {"bytes": png((1, 2, 3)), "path": None}
    src = write_parquet(tmp_path / "zero.parquet", {"img_id": ["c", "c"], "turn_index": [0, 1], "source_img": [img] * 2,
                                                    "target_img": [img] * 2, "instruction": ["x", "y"]})
    manifest = import_dataset("magicbrush", src, tmp_path / "z")
    assert [r.chain_step for r in load_dataset_records(tmp_path / "z" / "train.jsonl")] == [1, 2]
    assert manifest["chain_step_shift"] == {str(src): 1}
    gap = write_parquet(tmp_path / "gap.parquet", {"img_id": ["c", "c"], "turn_index": [1, 3], "source_img": [img] * 2,
                                                   "target_img": [img] * 2, "instruction": ["x", "y"]})
    with pytest.raises(DatasetImportError, match=r"chain 'c' has turns \[1, 3\]"):
        import_dataset("magicbrush", gap, tmp_path / "g")
    assert not (tmp_path / "g").exists()  # nothing half-written


def test_instructpix2pix_datasets_dict_folder(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"input_image": datasets.Image(), "edited_image": datasets.Image(),
                                  "edit_prompt": datasets.Value("string"), "kind": datasets.Value("string")})

    def part(n: int, shade: int) -> dict:
        return {"input_image": [Image.new("RGB", (16, 16), (shade + i, 0, 0)) for i in range(n)],
                "edited_image": [Image.new("RGB", (16, 16), (0, shade + i, 0)) for i in range(n)],
                "edit_prompt": [f"turn it green {i}" for i in range(n)], "kind": ["recolour"] * n}

    folder = tmp_path / "ip2p"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(part(3, 10), features=features),
                          "validation": datasets.Dataset.from_dict(part(2, 100), features=features)}
                         ).save_to_disk(str(folder))
    manifest = import_dataset("instructpix2pix", folder, tmp_path / "out", maps=parse_maps(["kind=category"]))
    assert manifest["counts"] == {"train": 3, "val": 2}
    train = load_dataset_records(tmp_path / "out" / "train.jsonl")
    val = load_dataset_records(tmp_path / "out" / "val.jsonl")
    assert [r.id for r in train] == ["train-0000000", "train-0000001", "train-0000002"]
    assert [r.split for r in val] == ["val", "val"] and val[1].instruction == "turn it green 1"
    assert train[2].category == "recolour"
    assert pixel(val[1].source_image) == (101, 0, 0) and pixel(val[1].target_image) == (0, 101, 0)


def test_generic_jsonl_with_paths_and_map(tmp_path: Path) -> None:
    (tmp_path / "imgs").mkdir()
    for name, color in (("a.png", (5, 5, 5)), ("b.png", (250, 250, 250))):
        (tmp_path / "imgs" / name).write_bytes(png(color))
    rows = [{"key": "k1", "before": "imgs/a.png", "after": "imgs/b.png", "prompt": "brighten", "part": "test"}]
    src = tmp_path / "pairs.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    maps = parse_maps(["before=source_image", "after=target_image", "prompt=instruction", "key=id", "part=split"])
    import_dataset("edit", src, tmp_path / "out", maps=maps)
    (record,) = load_dataset_records(tmp_path / "out" / "test.jsonl")
    assert record.id == "k1" and record.split == "test" and pixel(record.target_image) == (250, 250, 250)
    # relative image paths in the output JSONL, as the schema requires
    line = json.loads((tmp_path / "out" / "test.jsonl").read_text())
    assert line["source_image"].startswith("images/") and line["cot"] is None and line["meta_tasks"] == []


def test_missing_column_error_names_columns_and_fix(tmp_path: Path) -> None:
    src = tmp_path / "bad.jsonl"
    src.write_text(json.dumps({"before": "a.png", "after": "b.png"}) + "\n")
    with pytest.raises(DatasetImportError) as err:
        import_dataset("edit", src, tmp_path / "out", maps=parse_maps(["before=source_image", "after=target_image"]))
    assert "instruction" in str(err.value) and "['before', 'after']" in str(err.value) and "--map" in str(err.value)
    with pytest.raises(DatasetImportError, match="not a field of edit records"):
        import_dataset("edit", src, tmp_path / "out", maps=parse_maps(["before=source"]))
    with pytest.raises(DatasetImportError, match="COLUMN=FIELD"):
        parse_maps(["before"])


def test_bad_image_row_is_named(tmp_path: Path) -> None:
    src = write_parquet(tmp_path / "x.parquet", {"input_image": [{"bytes": png((1, 1, 1)), "path": None},
                                                                 {"bytes": b"not a png", "path": None}],
                                                 "edited_image": [{"bytes": png((2, 2, 2)), "path": None}] * 2,
                                                 "edit_prompt": ["a", "b"]})
    with pytest.raises(DatasetImportError, match=r"row 1: source_image: cannot decode the image"):
        import_dataset("instructpix2pix", src, tmp_path / "out")


def test_grounding_jsonl_xywh_boxes(tmp_path: Path) -> None:
    (tmp_path / "scene.png").write_bytes(png((9, 9, 9), size=(40, 30)))
    rows = [{"file": "scene.png", "ref": "the left cup", "bbox": [2.4, 3.6, 10, 5]},
            {"file": "scene.png", "ref": "the plate", "bbox": [0, 0, 40, 30]}]
    src = tmp_path / "refs.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    maps = parse_maps(["file=image", "ref=phrase", "bbox=box_xywh"])
    import_dataset("grounding", src, tmp_path / "out", maps=maps)
    records = load_records(tmp_path / "out" / "train.jsonl")  # understanding records pass the strict schema
    assert all(isinstance(r, UnderstandingRecord) and r.kind == "grounding" for r in records)
    assert records[0].answer == "[2, 4, 12, 9]" and "the left cup" in records[0].question
    assert records[1].answer == "[0, 0, 40, 30]"
    for bad, message in (([30, 20, 20, 20], "outside the 40x30 image"), ([0.1, 0.1, 0.5, 0.5], "normalised")):
        rows[1]["bbox"] = bad
        src.write_text("".join(json.dumps(r) + "\n" for r in rows))
        with pytest.raises(DatasetImportError, match=rf"row 1: .*{message}"):
            import_dataset("grounding", src, tmp_path / "out2", maps=maps)


def test_counting_parquet_answer_lists_and_ocr_default_question(tmp_path: Path) -> None:
    img = {"bytes": png((3, 3, 3)), "path": None}
    counting = write_parquet(tmp_path / "count.parquet", {
        "image": [img, img], "question": ["How many cats?", "How many dogs?"],
        "answer": [["2", "2", "3"], ["4.0", "1", "4"]]})
    import_dataset("counting", counting, tmp_path / "c", split="val")
    records = load_records(tmp_path / "c" / "val.jsonl")
    assert [r.answer for r in records] == ["2", "4"] and {r.kind for r in records} == {"counting"}
    ocr = write_parquet(tmp_path / "ocr.parquet", {"image": [img], "answer": ["STOP"]})
    import_dataset("ocr", ocr, tmp_path / "o")
    (record,) = load_records(tmp_path / "o" / "train.jsonl")
    assert record.answer == "STOP" and record.question == "What does the text in the image say?"
    bad = write_parquet(tmp_path / "bad.parquet", {"image": [img], "question": ["How many?"], "answer": ["many"]})
    with pytest.raises(DatasetImportError, match="whole number"):
        import_dataset("counting", bad, tmp_path / "b")


def test_cli_import_and_check(magicbrush_parquet: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "cli"
    assert main(["import", "--format", "magicbrush", "--in", str(magicbrush_parquet), "--out", str(out)]) == 0
    assert "3 records" in capsys.readouterr().out
    assert main(["check", str(out / "train.jsonl")]) == 0  # check accepts CoT-less records, says how many
    assert "without a Meta-CoT: 3" in capsys.readouterr().out
    assert main(["import", "--format", "nope", "--in", str(magicbrush_parquet), "--out", str(tmp_path / "x")]) == 2
    assert main(["import", "--format", "magicbrush", "--in", str(magicbrush_parquet), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_spatial_single_dataset_folder_and_read_dataset_guard(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"),
                                  "answer": datasets.Value("string")})
    data = {"image": [Image.new("RGB", (10, 10), (7, 7, 7))] * 2, "question": ["Is the cup left of the pot?"] * 2,
            "answer": ["yes", "no"]}
    datasets.Dataset.from_dict(data, features=features).save_to_disk(str(tmp_path / "sp"))
    import_dataset("spatial", tmp_path / "sp", tmp_path / "out", split="test")
    records = read_dataset(tmp_path / "out")  # a dataset folder: its split files
    assert [(r.id, r.kind, r.answer, r.split) for r in records] == [
        ("test-0000000", "spatial", "yes", "test"), ("test-0000001", "spatial", "no", "test")]
    assert pixel(records[1].image) == (7, 7, 7)
    with pytest.raises(ValueError, match="the input's folder"):
        read_dataset(tmp_path / "out" / "test.jsonl", tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="train/val/test.jsonl"):
        read_dataset(tmp_path / "sp")
