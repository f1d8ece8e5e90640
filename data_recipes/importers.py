"""Importers: public editing and understanding datasets -> metacot JSONL records (edits without a Meta-CoT yet).

Run::

    metacot data import --format magicbrush --in magicbrush/ --out data/magicbrush
    metacot data import --format edit --in pairs.parquet --out data/pairs --map before=source_image \\
        --map after=target_image --map prompt=instruction
    metacot data import --format grounding --in refs.jsonl --out data/refs --map bbox=box_xywh --map ref=phrase

Inputs: a parquet file, a JSONL file, or a folder written by ``datasets``' ``save_to_disk`` (a ``Dataset`` or a
``DatasetDict``, whose split names ``train``, ``validation``/``val``/``dev`` and ``test`` become metacot splits).
Image cells may be bytes, PIL-like dicts (``{"bytes": ..., "path": ...}``, how parquet and ``datasets`` store
images), ``PIL.Image`` objects or paths (relative to the input file's folder). Every image is converted to RGB and
written once as ``OUT/images/<sha256 prefix>.png`` (content-addressed: the image shared by consecutive turns of a
chain is stored once).

What it writes (atomically: the folder appears complete or not at all)::

    OUT/{train,val,test}.jsonl   records of metacot.cot.schema (only the splits present)
    OUT/images/*.png
    OUT/manifest.json            format, input, column mapping, counts per split

Column mapping: ``--map COLUMN=FIELD`` names the record field a column fills; a format's preset (:data:`PRESETS`)
gives the defaults and ``--map`` adds to or overrides them. Fields of edit records: ``source_image``,
``target_image``, ``instruction`` (required), ``id``, ``category``, ``split``, ``chain_id`` + ``chain_step``.
Multi-turn data (MagicBrush's ``img_id`` / ``turn_index``) become chain steps: the turns of one chain must be
consecutive integers; 0-based turns are shifted to start at 1 (``chain_step`` 0 is the whole chain in metacot,
which importers do not invent). Understanding formats (``grounding``, ``counting``, ``ocr``, ``spatial``) fill
``image``, ``question`` and ``answer``; grounding builds the question from ``phrase`` and the answer from ``box``
(``[x0, y0, x1, y1]`` pixels) or ``box_xywh`` (COCO's ``[x, y, w, h]``), rounded to whole pixels and written as
the synthetic recipe writes boxes. VQA-style answer lists give their most frequent answer (first on ties).

Imported edit records have no Meta-CoT (``"cot": null, "meta_tasks": []``) until ``metacot data annotate`` writes
one. :func:`load_dataset_records` and :func:`record_json` read and write such records; they are thin adapters over
:mod:`metacot.cot.schema`, whose ``EditRecord.cot`` is still required there (see the module's end).

Deliberately left out: downloading (point ``--in`` at local files), streaming from the hub, masks and captions
of editing datasets, and any repair of bad rows: a row that cannot be imported stops the import with its row
number, column and the fix.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from metacot.cot.schema import (
    SPLITS,
    DataError,
    EditRecord,
    Record,
    UnderstandingRecord,
    load_records,
    record_from_json,
    record_to_json,
)
from metacot.run import atomic_dir

UNCATEGORISED = "uncategorised"  # category of imported edits whose data has none (the schema needs a non-empty one)
EDIT_FIELDS = ("id", "source_image", "target_image", "instruction", "category", "split", "chain_id", "chain_step")
UNDERSTANDING_FIELDS = ("id", "image", "question", "answer", "split", "phrase", "box", "box_xywh")
UNDERSTANDING_FORMATS = ("grounding", "counting", "ocr", "spatial")
# Column -> field defaults per format; --map adds to or overrides them.
PRESETS: dict[str, dict[str, str]] = {
    "edit": {},
    "magicbrush": {"img_id": "chain_id", "turn_index": "chain_step", "source_img": "source_image",
                   "target_img": "target_image", "instruction": "instruction"},
    "instructpix2pix": {"input_image": "source_image", "edited_image": "target_image", "edit_prompt": "instruction"},
    "grounding": {"image": "image", "phrase": "phrase", "box": "box"},
    "counting": {"image": "image", "question": "question", "answer": "answer"},
    "ocr": {"image": "image", "question": "question", "answer": "answer"},
    "spatial": {"image": "image", "question": "question", "answer": "answer"},
}
FORMATS: tuple[str, ...] = tuple(PRESETS)
SPLIT_NAMES = {"train": "train", "validation": "val", "valid": "val", "val": "val", "dev": "val", "test": "test"}
GROUNDING_QUESTION = "Where is {phrase}? Answer with its box [x0, y0, x1, y1] in pixels."
OCR_QUESTION = "What does the text in the image say?"


class DatasetImportError(ValueError):
    """A row or the input cannot be imported; the message names the input, row and column and says what to fix."""


@dataclass
class Table:
    """One table of the input: its metacot split (None = take ``--split``), columns, rows and image base folder."""

    name: str
    split: str | None
    columns: list[str]
    rows: Iterator[dict[str, Any]]
    base: Path


# ------------------------------------------------------------------------------------------------------ reading
def open_tables(path: str | Path) -> list[Table]:
    """The tables of an input: one for a parquet/JSONL file or a ``Dataset`` folder, one per split of a
    ``DatasetDict`` folder.

    Raises:
        DatasetImportError: the path is none of the supported inputs, or a split name is unknown.
        FileNotFoundError: ``path`` does not exist.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"import input {path} does not exist")
    if path.is_file() and path.suffix == ".parquet":
        import pyarrow.parquet as pq

        parquet = pq.ParquetFile(path)
        rows = (row for batch in parquet.iter_batches(batch_size=64) for row in batch.to_pylist())
        return [Table(str(path), None, list(parquet.schema_arrow.names), rows, path.parent)]
    if path.is_file() and path.suffix == ".jsonl":
        return [_jsonl_table(path)]
    if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        return _datasets_tables(path)
    raise DatasetImportError(f"{path}: not an importable input; give a .parquet file, a .jsonl file or a folder "
                             "written by datasets' save_to_disk (with state.json or dataset_dict.json)")


def _jsonl_table(path: Path) -> Table:
    with open(path, encoding="utf-8") as handle:
        first = handle.readline()
    try:
        columns = list(json.loads(first)) if first.strip() else []
    except json.JSONDecodeError as err:
        raise DatasetImportError(f"{path}:1: not valid JSON ({err.msg}); each line must be one JSON object") from None

    def rows() -> Iterator[dict[str, Any]]:
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DatasetImportError(f"{path}:{number}: not valid JSON ({err.msg})") from None
                if not isinstance(row, dict):
                    raise DatasetImportError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
                yield row

    return Table(str(path), None, columns, rows(), path.parent)


def _datasets_tables(path: Path) -> list[Table]:
    import datasets

    loaded = datasets.load_from_disk(str(path))
    named = loaded.items() if isinstance(loaded, datasets.DatasetDict) else [(None, loaded)]
    tables = []
    for name, dataset in named:
        if name is not None and name not in SPLIT_NAMES:
            raise DatasetImportError(f"{path}: split {name!r} has no metacot counterpart; name splits one of "
                                     f"{', '.join(SPLIT_NAMES)} (metacot splits: {', '.join(SPLITS)})")
        for column, feature in dataset.features.items():  # undecoded images: bytes/path dicts, no PIL round trip
            if isinstance(feature, datasets.Image):
                dataset = dataset.cast_column(column, datasets.Image(decode=False))
        label = f"{path}[{name}]" if name is not None else str(path)
        tables.append(Table(label, SPLIT_NAMES.get(name) if name else None, list(dataset.column_names),
                            iter(dataset), path))
    return tables


def load_image(value: Any, base: Path) -> Image.Image:
    """Decode an image cell (bytes, ``{"bytes", "path"}`` dict, PIL image or path) into an RGB image.

    Raises:
        ValueError: the cell holds no image, or the image cannot be decoded (the message says which).
    """
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            value = value["bytes"]
        elif value.get("path"):
            value = value["path"]
        else:
            raise ValueError(f"image dict has neither bytes nor path (keys: {sorted(value)})")
    if isinstance(value, (bytes, bytearray)):
        source: Any = io.BytesIO(value)
    elif isinstance(value, str) and value:
        source = Path(value) if os.path.isabs(value) else base / value
        if not source.is_file():
            raise ValueError(f"image file {source} does not exist")
    else:
        raise ValueError(f"expected image bytes, an image dict, a PIL image or a path, got {type(value).__name__}")
    try:
        with Image.open(source) as image:
            return image.convert("RGB")
    except Exception as err:  # PIL raises many types for corrupt data; all mean "not an image"
        raise ValueError(f"cannot decode the image ({type(err).__name__}: {err})") from None


# ------------------------------------------------------------------------------------------------------ mapping
def resolve_mapping(fmt: str, overrides: dict[str, str], columns: list[str], where: str) -> dict[str, str]:
    """Field -> column for ``fmt``: the preset plus ``overrides`` (column -> field), checked against ``columns``.

    Raises:
        DatasetImportError: unknown format or field, two columns for one field, a missing column or required field.
    """
    if fmt not in PRESETS:
        raise DatasetImportError(f"unknown import format {fmt!r}; choose one of {', '.join(FORMATS)}")
    kind = "understanding" if fmt in UNDERSTANDING_FORMATS else "edit"
    allowed = UNDERSTANDING_FIELDS if kind == "understanding" else EDIT_FIELDS
    # Preset columns the data lacks are left out (e.g. OCR data without questions); required fields are checked below.
    by_field: dict[str, str] = {field: column for column, field in PRESETS[fmt].items() if column in columns}
    for column, field in overrides.items():
        if field not in allowed:
            raise DatasetImportError(f"--map {column}={field}: {field!r} is not a field of {kind} records; fields: "
                                     f"{', '.join(allowed)}")
        by_field = {f: c for f, c in by_field.items() if c != column}
        by_field[field] = column
    if len(set(by_field.values())) != len(by_field):
        raise DatasetImportError(f"{where}: one column is mapped to two fields: {by_field}")
    missing = [c for c in by_field.values() if c not in columns]
    if missing:
        raise DatasetImportError(f"{where}: column(s) {missing} not found; columns are {columns}; map yours with "
                                 "--map COLUMN=FIELD")
    required = {"edit": ("source_image", "target_image", "instruction")}.get(kind) or _understanding_required(fmt)
    absent = [f for f in required if f not in by_field]
    if ("chain_id" in by_field) != ("chain_step" in by_field):
        absent.append("chain_id and chain_step (both or neither)")
    if fmt == "grounding" and ("box" in by_field) == ("box_xywh" in by_field):
        absent.append("exactly one of box / box_xywh")
    if absent:
        raise DatasetImportError(f"{where}: format {fmt!r} needs field(s) {absent}; columns are {columns}; map them "
                                 "with --map COLUMN=FIELD")
    return by_field


def _understanding_required(fmt: str) -> tuple[str, ...]:
    return {"grounding": ("image", "phrase"), "counting": ("image", "question", "answer"),
            "ocr": ("image", "answer"), "spatial": ("image", "question", "answer")}[fmt]


def parse_maps(items: list[str]) -> dict[str, str]:
    """``["col=field", ...]`` -> ``{col: field}``.

    Raises:
        DatasetImportError: an item is not ``COLUMN=FIELD`` or a column is mapped twice.
    """
    out: dict[str, str] = {}
    for item in items:
        column, sep, field = item.partition("=")
        if not sep or not column or not field:
            raise DatasetImportError(f"--map {item!r}: write COLUMN=FIELD, e.g. --map source_img=source_image")
        if column in out:
            raise DatasetImportError(f"--map: column {column!r} is mapped twice ({out[column]!r} and {field!r})")
        out[column] = field
    return out


# ------------------------------------------------------------------------------------------------------ rows
def _text(value: Any, field: str) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{field} must be non-empty text, got {value!r:.60}")
    return value.strip()


def _answer(value: Any, fmt: str) -> str:
    if isinstance(value, list):  # VQA-style: several annotators' answers
        texts = [_text(v, "answer") for v in value]
        if not texts:
            raise ValueError("answer list is empty")
        counts = Counter(texts)
        value = max(texts, key=lambda t: (counts[t], -texts.index(t)))
    text = _text(value, "answer")
    if fmt == "counting":
        try:
            number = float(text)
        except ValueError:
            raise ValueError(f"a counting answer must be a whole number, got {text!r}") from None
        if number < 0 or number != int(number):
            raise ValueError(f"a counting answer must be a whole number >= 0, got {text!r}")
        text = str(int(number))
    return text


def _box(value: Any, xywh: bool, size: tuple[int, int]) -> list[int]:
    if not (isinstance(value, (list, tuple)) and len(value) == 4
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
        raise ValueError(f"a box must be 4 numbers, got {value!r:.80}")
    x0, y0, a, b = (float(v) for v in value)
    if all(0 <= v <= 1 for v in (x0, y0, a, b)) and any(v != int(v) for v in (x0, y0, a, b)):
        raise ValueError(f"box {list(value)} looks normalised to 0-1; convert it to pixels of the image first")
    x1, y1 = (x0 + a, y0 + b) if xywh else (a, b)
    box = [round(x0), round(y0), round(x1), round(y1)]
    width, height = size
    if not (0 <= box[0] < box[2] <= width and 0 <= box[1] < box[3] <= height):
        form = "[x, y, w, h]" if xywh else "[x0, y0, x1, y1]"
        raise ValueError(f"box {list(value)} ({form}) is empty or outside the {width}x{height} image; if it is "
                         f"normalised to 0-1 or in another form, convert it to pixels first")
    return box


class _ImageStore:
    """Writes each distinct image once as ``images/<sha256 prefix>.png`` and returns its relative path."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "images").mkdir(exist_ok=True)
        self.written = 0

    def put(self, image: Image.Image) -> str:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", compress_level=6)
        data = buffer.getvalue()
        rel = f"images/{hashlib.sha256(data).hexdigest()[:24]}.png"
        if not (self.root / rel).exists():
            (self.root / rel).write_bytes(data)
            self.written += 1
        return rel


def _edit_record(row: dict[str, Any], fields: dict[str, str], table: Table, store: _ImageStore,
                 split: str) -> EditRecord:
    get = {f: row[c] for f, c in fields.items()}
    source = store.put(_field_image(get, "source_image", table.base))
    target = store.put(_field_image(get, "target_image", table.base))
    chain_id = _text(get["chain_id"], "chain_id") if "chain_id" in get else None
    step = _step(get["chain_step"]) if "chain_step" in get else None
    record_id = _text(get["id"], "id") if "id" in get else ""  # "" = numbered by _assign_ids
    return EditRecord(record_id, source, _text(get["instruction"], "instruction"), target, None,  # type: ignore[arg-type]
                      _text(get["category"], "category") if "category" in get else UNCATEGORISED, (),
                      None, None, chain_id, step, _split(get, split))


def _understanding_record(row: dict[str, Any], fields: dict[str, str], fmt: str, table: Table, store: _ImageStore,
                          split: str) -> UnderstandingRecord:
    get = {f: row[c] for f, c in fields.items()}
    image = _field_image(get, "image", table.base)
    if fmt == "grounding":
        box = _box(get["box_xywh"] if "box_xywh" in get else get["box"], "box_xywh" in get, image.size)
        question = (_text(get["question"], "question") if "question" in get
                    else GROUNDING_QUESTION.format(phrase=_text(get["phrase"], "phrase")))
        answer = "[{}, {}, {}, {}]".format(*box)
    else:
        question = _text(get["question"], "question") if "question" in get else OCR_QUESTION
        answer = _answer(get["answer"], fmt)
    record_id = _text(get["id"], "id") if "id" in get else ""  # "" = numbered by _assign_ids
    return UnderstandingRecord(record_id, store.put(image), question, answer, fmt, _split(get, split))


def _field_image(get: dict[str, Any], field: str, base: Path) -> Image.Image:
    try:
        return load_image(get[field], base)
    except ValueError as err:
        raise ValueError(f"{field}: {err}") from None


def _step(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).strip().isdigit():
        raise ValueError(f"chain_step must be a whole number >= 0, got {value!r:.40}")
    return int(value)


def _split(get: dict[str, Any], default: str) -> str:
    if "split" not in get:
        return default
    name = _text(get["split"], "split")
    if name not in SPLIT_NAMES:
        raise ValueError(f"split {name!r} is not one of {', '.join(SPLIT_NAMES)}")
    return SPLIT_NAMES[name]


def _renumber_chains(records: list[Record], where: str) -> int:
    """Check each chain's turns are consecutive from a common start (0 or 1); shift 0-based turns to start at 1.

    Returns:
        The shift applied (0 or 1).
    """
    steps: dict[str, list[int]] = {}
    for r in records:
        if isinstance(r, EditRecord) and r.chain_id is not None:
            steps.setdefault(r.chain_id, []).append(r.chain_step)  # type: ignore[arg-type]
    for chain, found in steps.items():
        ordered = sorted(found)
        if ordered[0] not in (0, 1) or ordered != list(range(ordered[0], ordered[0] + len(ordered))):
            raise DatasetImportError(f"{where}: chain {chain!r} has turns {ordered}; the turns of a chain must be "
                                     "consecutive integers from 0 or from 1, each once")
    starts = {min(s) for s in steps.values()}
    if len(starts) > 1:
        raise DatasetImportError(f"{where}: some chains start at turn 0 and others at turn 1; number all the same way")
    shift = 1 if starts == {0} else 0
    for i, r in enumerate(records):
        if isinstance(r, EditRecord) and r.chain_id is not None and shift:
            records[i] = r = dataclasses.replace(r, chain_step=r.chain_step + shift)  # type: ignore[operator]
    return shift


def _assign_ids(records: list[Record]) -> None:
    """Give records without a mapped id one: ``CHAIN-STEP`` for chain steps, else ``SPLIT-ROW`` (``train-0000012``)."""
    for i, r in enumerate(records):
        if r.id:
            continue
        if isinstance(r, EditRecord) and r.chain_id is not None:
            records[i] = dataclasses.replace(r, id=f"{r.chain_id}-{r.chain_step}")
        else:
            records[i] = dataclasses.replace(r, id=f"{r.split}-{i:07d}")


# ------------------------------------------------------------------------------------------------------ import
def import_dataset(fmt: str, source: str | Path, out: str | Path, maps: dict[str, str] | None = None,
                   split: str = "train", overwrite: bool = False, progress: bool = False) -> dict[str, Any]:
    """Import a dataset into a metacot dataset folder (see the module docstring) and return its manifest.

    Args:
        fmt: one of :data:`FORMATS`.
        source: parquet file, JSONL file or ``save_to_disk`` folder.
        out: output folder; must not exist unless ``overwrite``.
        maps: column -> field overrides of the format's preset.
        split: metacot split of inputs that carry none (files, a single ``Dataset``), unless a column is mapped
            to ``split``.
        overwrite: replace an existing ``out`` once the new one is complete.
        progress: show a tqdm bar of rows on stderr.

    Raises:
        DatasetImportError: bad input, mapping or row (row number, column and fix in the message).
        metacot.run.RunError: ``out`` exists and ``overwrite`` is False.
    """
    if split not in SPLITS:
        raise DatasetImportError(f"--split {split!r} is not one of {', '.join(SPLITS)}")
    kind = "understanding" if fmt in UNDERSTANDING_FORMATS else "edit"
    tables = open_tables(source)
    by_split: dict[str, list[Record]] = {s: [] for s in SPLITS}
    mappings, shifts = {}, {}
    with atomic_dir(Path(out), overwrite=overwrite, meta={"recipe": "import", "format": fmt}) as tmp:
        store = _ImageStore(tmp)
        for table in tables:
            fields = resolve_mapping(fmt, maps or {}, table.columns, table.name)
            mappings[table.name] = fields
            rows = table.rows
            if progress:
                from tqdm import tqdm

                rows = tqdm(rows, desc=f"import {Path(table.name).name}", unit="row")
            records = _import_rows(rows, fields, fmt, kind, table, store, table.split or split)
            shifts[table.name] = _renumber_chains(records, table.name)
            _assign_ids(records)
            for record in records:
                by_split[record.split].append(record)
        _check_unique_ids(by_split)
        for name, records in by_split.items():
            if records:
                write_dataset_records(tmp / f"{name}.jsonl", records)
        manifest = {"recipe": "import", "format": fmt, "input": str(Path(source).resolve()), "mapping": mappings,
                    "chain_step_shift": shifts, "images": store.written,
                    "counts": {s: len(r) for s, r in by_split.items() if r},
                    "chains": len({r.chain_id for rs in by_split.values() for r in rs
                                   if isinstance(r, EditRecord) and r.chain_id is not None})}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def _import_rows(rows: Iterator[dict[str, Any]], fields: dict[str, str], fmt: str, kind: str, table: Table,
                 store: _ImageStore, split: str) -> list[Record]:
    records: list[Record] = []
    for index, row in enumerate(rows):
        try:
            if kind == "edit":
                records.append(_edit_record(row, fields, table, store, split))
            else:
                records.append(_understanding_record(row, fields, fmt, table, store, split))
        except (ValueError, KeyError) as err:
            raise DatasetImportError(f"{table.name}: row {index}: {err}; fix the row or the --map of that column"
                                     ) from None
    return records


def _check_unique_ids(by_split: dict[str, list[Record]]) -> None:
    seen: Counter[str] = Counter(r.id for rs in by_split.values() for r in rs)
    repeated = [i for i, n in seen.items() if n > 1]
    if repeated:
        raise DatasetImportError(f"record ids repeat: {repeated[:10]} ({len(repeated)} in all); map a unique id column "
                                 "with --map COLUMN=id, or map none to number the rows")


# ------------------------------------------------------------------------------- records
# Edit records may come without a Meta-CoT (``"cot": null``, ``"meta_tasks": []``) until annotated; the schema's own
# reader and writer handle them.
record_json = record_to_json
parse_record_line = record_from_json
load_dataset_records = load_records


def record_line(record: Record, base: Path | None = None) -> str:
    """One JSONL line (with newline) of a record, written as :func:`metacot.cot.schema.write_records` writes it."""
    return json.dumps(record_json(record, base), ensure_ascii=False, separators=(",", ":")) + "\n"


def write_dataset_records(path: Path, records: list[Record]) -> None:
    """Write records (Meta-CoT optional) as JSONL through a temporary file renamed into place."""
    base = path.resolve().parent
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.writelines(record_line(r, base) for r in records)
    os.replace(tmp, path)


def read_dataset(path: str | Path, out: str | Path | None = None) -> list[Record]:
    """Records of a JSONL file, or of a dataset folder's ``{train,val,test}.jsonl`` (Meta-CoT optional).

    Images are not opened here: a sample whose image is unreadable fails alone, with the reason. ``out``, when
    given, is the folder a recipe will write: it must not be the input's own folder.

    Raises:
        DataError: a schema problem (every one, as ``file:line: problem``), or an id used twice across files.
        FileNotFoundError: nothing to read at ``path``.
        ValueError: ``out`` is the input's folder.
    """
    path = Path(path)
    if out is not None and Path(out).resolve() == (path if path.is_dir() else path.parent).resolve():
        raise ValueError(f"--out {out} is the input's folder; write to a new folder (outputs are appended there)")
    files = [path] if path.is_file() else [path / f"{s}.jsonl" for s in SPLITS if (path / f"{s}.jsonl").is_file()]
    if not files:
        raise FileNotFoundError(f"{path}: no JSONL file, nor a folder with train/val/test.jsonl")
    records: list[Record] = []
    seen: dict[str, Path] = {}
    for file in files:
        for record in load_dataset_records(file, check_images=False):
            if record.id in seen:
                raise DataError(file, [f"{file}: id {record.id!r} is also used in {seen[record.id]}"])
            seen[record.id] = file
            records.append(record)
    return records
