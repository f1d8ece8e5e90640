"""Human labels for judge calibration: the samples and labels file formats, and a local labelling web page.

``metacot reward label --samples S.jsonl --out LABELS.jsonl [--annotator NAME] [--port 0]`` serves a page on
127.0.0.1 that shows, one sample at a time, the source image, the edited image, the instruction and the Meta-CoT,
and takes a 0-10 score. Every answer is appended to LABELS.jsonl and fsync'ed before the page moves on, so a
closed browser or a killed server loses nothing; restarting with the same files resumes where the annotator
stopped (samples already labelled by that annotator are skipped). Several annotators label the same samples by
running the page with different ``--annotator`` names into the same or separate label files.

Samples file (JSONL, one object per line; image paths relative to the file's folder)::

    {"id": "s1", "source_image": "img/s1.png", "edited_image": "out/s1.png", "instruction": "...",
     "cot": "<rendered Meta-CoT>" | {MetaCoT as metacot.cot.to_dict} | null, "category": "recolor", ...}

Edit records from ``metacot.cot.schema`` with an added ``edited_image`` column qualify. Other fields are carried
through to the labels unchanged.

Labels file (JSONL; what :func:`load_labels` reads and ``metacot reward calibrate`` consumes): the sample's fields
(image paths rewritten relative to the labels file's folder) plus ``human_score`` and ``annotator``::

    {"id": "s1", ..., "human_score": 7, "annotator": "alice", "labelled_at": "2026-11-23T14:00:00+00:00"}

``human_score`` may also be a list of numbers (several annotators' scores for one sample in one line, e.g. an
imported spreadsheet); ``simulated: true`` marks labels from :mod:`rewards.simulated`.

What this module leaves out: accounts or remote access (the server binds 127.0.0.1 only), editing an answer after
it was saved (the page asks for an explicit "Save" after choosing a score instead; to redo a sample, delete its line
from the labels file and restart), and any judgement of label quality beyond the agreement statistics that
:mod:`rewards.calibration` reports.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import getpass
import json
import math
import mimetypes
import os
import sys
import threading
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from metacot.jsonl import JSONLError, append_rows, read_rows

IMAGE_FIELDS = ("source_image", "edited_image", "target_image")
REQUIRED_SAMPLE_FIELDS = ("id", "source_image", "edited_image", "instruction")
SCORE_RANGE = (0.0, 10.0)
UI_PAGE = Path(__file__).parent / "label_ui" / "index.html"


class LabelError(ValueError):
    """A samples or labels file is malformed; the message lists ``file:line: problem`` for every problem found."""


def _raise_problems(problems: list[str], what: str, fix: str) -> None:
    if problems:
        shown = "\n  ".join(problems[:50])
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        raise LabelError(f"{len(problems)} problem(s) in {what}:\n  {shown}{more}\n{fix}")


def _read_jsonl(path: Path) -> list[tuple[int, Any]]:
    """``(line number, parsed object)`` for every non-empty line; raises LabelError listing unparsable lines."""
    if not path.is_file():
        raise LabelError(f"{path} does not exist or is not a file")
    try:
        return read_rows(path, objects=False)
    except JSONLError as exc:
        _raise_problems(exc.problems, str(path),
                        "Fix or remove those lines (a torn last line after a crash can be deleted).")
        raise


def normalize_id(value: Any) -> str | None:
    """Sample ids are strings; integers are accepted and turned into their decimal string. Anything else: None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str) and value.strip():
        return value
    return None


def load_samples(path: str | Path) -> list[dict[str, Any]]:
    """Read and validate a samples file; image paths come back absolute.

    Raises:
        LabelError: listing every bad line (missing field, wrong type, duplicate id, missing image file).
    """
    path = Path(path)
    samples, problems, seen = [], [], {}
    for lineno, row in _read_jsonl(path):
        where = f"{path}:{lineno}"
        if not isinstance(row, dict):
            problems.append(f"{where}: expected a JSON object, got {type(row).__name__}")
            continue
        missing = [k for k in REQUIRED_SAMPLE_FIELDS if k not in row]
        if missing:
            problems.append(f"{where}: missing field(s) {missing}")
            continue
        sid = normalize_id(row["id"])
        if sid is None:
            problems.append(f"{where}: 'id' must be a non-empty string or an integer, got {row['id']!r}")
            continue
        if sid in seen:
            problems.append(f"{where}: duplicate id {sid!r} (first on line {seen[sid]})")
            continue
        seen[sid] = lineno
        if not isinstance(row["instruction"], str):
            problems.append(f"{where}: 'instruction' must be a string")
        if not isinstance(row.get("cot"), (str, dict, type(None))):
            problems.append(f"{where}: 'cot' must be rendered text, a MetaCoT dict or null")
        sample = dict(row, id=sid)
        for key in IMAGE_FIELDS:
            if key not in row or row[key] is None:
                continue
            if not isinstance(row[key], str):
                problems.append(f"{where}: {key!r} must be a path string")
                continue
            image = (path.parent / row[key]).resolve()
            if not image.is_file():
                problems.append(f"{where}: {key} file {image} does not exist")
            sample[key] = str(image)
        samples.append(sample)
    _raise_problems(problems, f"samples file {path}", "Fix the samples file; no sample was skipped.")
    if not samples:
        raise LabelError(f"samples file {path} holds no samples")
    return samples


def cot_text(cot: str | dict[str, Any] | None) -> str:
    """The Meta-CoT as a person reads it: rendered text as is, a MetaCoT dict rendered by metacot.cot."""
    if cot is None:
        return ""
    if isinstance(cot, str):
        return cot
    from metacot.cot import from_dict, render  # lazy: only samples that carry CoTs as dicts need it

    return render(from_dict(cot))


def check_score(value: Any) -> float | None:
    """A finite number within 0-10 as float, else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    if not math.isfinite(value) or not SCORE_RANGE[0] <= value <= SCORE_RANGE[1]:
        return None
    return value


@dataclass
class LabelledItem:
    """One labelled sample as calibration uses it.

    Attributes:
        id: the sample id.
        scores: annotator name -> score (0-10). Scores given as a list in one line get names ``#1``, ``#2``, ...
        category: the sample's category, if any.
        simulated: any of its labels came from simulated annotators.
        fields: the sample's fields (image paths absolute) from its first line.
    """

    id: str
    scores: dict[str, float]
    category: str | None
    simulated: bool
    fields: dict[str, Any] = field(default_factory=dict)

    @property
    def human_score(self) -> float:
        """Mean over annotators."""
        return sum(self.scores.values()) / len(self.scores)


def _parse_label_scores(row: dict[str, Any], where: str, problems: list[str]) -> dict[str, float] | None:
    raw = row.get("human_score")
    if isinstance(raw, list):
        if "annotator" in row:
            problems.append(f"{where}: a list 'human_score' holds several annotators; drop 'annotator' or give "
                            f"one score per line")
            return None
        values = [check_score(v) for v in raw]
        if not raw or any(v is None for v in values):
            problems.append(f"{where}: 'human_score' list must hold numbers in 0-10, got {raw!r}")
            return None
        return {f"#{k + 1}": v for k, v in enumerate(values)}  # type: ignore[misc]
    value = check_score(raw)
    if value is None:
        problems.append(f"{where}: 'human_score' must be a number in 0-10 (or a list of them), got {raw!r}")
        return None
    annotator = row.get("annotator", "#1")
    if not isinstance(annotator, str) or not annotator:
        problems.append(f"{where}: 'annotator' must be a non-empty string")
        return None
    return {annotator: value}


def load_labels(path: str | Path) -> dict[str, LabelledItem]:
    """Read a labels file, one item per id, scores of several lines (annotators) of the same id combined.

    Several lines may carry the same id only when each names a different ``annotator``.

    Raises:
        LabelError: listing every bad line: missing or non-string id, score missing / not a number / NaN /
            outside 0-10, the same (id, annotator) twice, a list score mixed with other lines of its id,
            conflicting categories.
    """
    path = Path(path)
    items: dict[str, LabelledItem] = {}
    first_line: dict[str, int] = {}
    problems: list[str] = []
    for lineno, row in _read_jsonl(path):
        where = f"{path}:{lineno}"
        if not isinstance(row, dict):
            problems.append(f"{where}: expected a JSON object")
            continue
        sid = normalize_id(row.get("id"))
        if sid is None:
            problems.append(f"{where}: 'id' must be a non-empty string or an integer, got {row.get('id')!r}")
            continue
        scores = _parse_label_scores(row, where, problems)
        if scores is None:
            continue
        category = row.get("category")
        if category is not None and not isinstance(category, str):
            problems.append(f"{where}: 'category' must be a string")
            continue
        if sid not in items:
            fields = {k: v for k, v in row.items() if k not in ("human_score", "annotator", "labelled_at")}
            for key in IMAGE_FIELDS:
                if isinstance(fields.get(key), str):
                    fields[key] = str((path.parent / fields[key]).resolve())
            items[sid] = LabelledItem(sid, scores, category, bool(row.get("simulated", False)), fields)
            first_line[sid] = lineno
            continue
        item = items[sid]
        clash = set(scores) & set(item.scores)
        if clash or any(k.startswith("#") for k in [*scores, *item.scores]):
            problems.append(f"{where}: duplicate label for id {sid!r}"
                            + (f" by annotator {sorted(clash)[0]!r}" if clash else "")
                            + f" (first on line {first_line[sid]}); give each annotator's score once, with "
                            f"distinct 'annotator' names")
            continue
        if category != item.category:
            problems.append(f"{where}: category {category!r} differs from {item.category!r} on line "
                            f"{first_line[sid]}")
            continue
        item.scores.update(scores)
        item.simulated = item.simulated or bool(row.get("simulated", False))
    _raise_problems(problems, f"labels file {path}", "Fix those lines; no label was skipped.")
    if not items:
        raise LabelError(f"labels file {path} holds no labels")
    return items


# -- the labelling session and its web server ---------------------------------------------------------------------
class LabelSession:
    """The state behind the page: samples, who labels, which are done, and the append-only labels file.

    Args:
        samples_path: the samples JSONL.
        out_path: the labels JSONL (created if absent, appended to otherwise).
        annotator: the annotator's name, stored with each label.
    """

    def __init__(self, samples_path: str | Path, out_path: str | Path, annotator: str) -> None:
        if not annotator.strip():
            raise LabelError("the annotator name is empty; pass --annotator NAME")
        self.samples = load_samples(samples_path)
        self.by_id = {s["id"]: s for s in self.samples}
        self.out_path = Path(out_path).resolve()
        self.annotator = annotator
        self.done: set[str] = set()
        self.foreign = 0  # lines of this file for ids outside this samples file (kept, just not ours)
        self._lock = threading.Lock()
        if self.out_path.exists():
            for _, row in _read_jsonl(self.out_path):
                sid = normalize_id(row.get("id")) if isinstance(row, dict) else None
                if sid is None:
                    raise LabelError(f"{self.out_path} has a line without a valid id; fix it before resuming")
                if sid not in self.by_id:
                    self.foreign += 1
                elif row.get("annotator") == annotator:
                    self.done.add(sid)
        self.out_path.parent.mkdir(parents=True, exist_ok=True)

    def next_sample(self) -> dict[str, Any] | None:
        """The first sample (in file order) this annotator has not labelled, or None when all are done."""
        return next((s for s in self.samples if s["id"] not in self.done), None)

    def state(self) -> dict[str, Any]:
        """What the page shows: progress and the next sample (image URLs instead of paths)."""
        sample = self.next_sample()
        shown = None
        if sample is not None:
            index = self.samples.index(sample)
            shown = {
                "id": sample["id"],
                "instruction": sample["instruction"],
                "cot": cot_text(sample.get("cot")),
                "category": sample.get("category"),
                "source_url": f"/image/{index}/source_image",
                "edited_url": f"/image/{index}/edited_image",
            }
        return {"annotator": self.annotator, "total": len(self.samples), "done": len(self.done),
                "labels_file": str(self.out_path), "sample": shown}

    def record(self, sample_id: str, score: Any) -> dict[str, Any]:
        """Append one label (fsync'ed) and return the new state.

        Raises:
            LabelError: unknown id, already labelled by this annotator, or a score that is not an integer 0-10.
        """
        if isinstance(score, bool) or not isinstance(score, int) or not 0 <= score <= 10:
            raise LabelError(f"score must be an integer 0-10, got {score!r}")
        with self._lock:
            sample = self.by_id.get(sample_id)
            if sample is None:
                raise LabelError(f"unknown sample id {sample_id!r}")
            if sample_id in self.done:
                raise LabelError(f"sample {sample_id!r} is already labelled by {self.annotator!r}")
            row = dict(sample)
            for key in IMAGE_FIELDS:
                if isinstance(row.get(key), str):
                    row[key] = os.path.relpath(row[key], self.out_path.parent)
            row.update(human_score=score, annotator=self.annotator,
                       labelled_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
            # One write of a whole line, then flush + fsync: a crash leaves either the full line or a torn one.
            append_rows(self.out_path, [row], ensure_ascii=False)
            self.done.add(sample_id)
        return self.state()

    def image_path(self, index: int, key: str) -> Path | None:
        """The file behind ``/image/<index>/<key>``; only the listed samples' images are ever served."""
        if key not in IMAGE_FIELDS or not 0 <= index < len(self.samples):
            return None
        value = self.samples[index].get(key)
        return Path(value) if isinstance(value, str) else None


def _make_handler(session: LabelSession) -> type[BaseHTTPRequestHandler]:
    page = UI_PAGE.read_bytes()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
            pass  # the terminal shows the progress line instead of one line per request

        def _send(self, status: int, body: bytes, ctype: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, obj: Any) -> None:
            self._send(status, json.dumps(obj).encode(), "application/json")

        def do_GET(self) -> None:  # noqa: N802 - stdlib name
            if self.path in ("/", "/index.html"):
                self._send(HTTPStatus.OK, page, "text/html; charset=utf-8")
            elif self.path == "/api/state":
                self._json(HTTPStatus.OK, session.state())
            elif self.path.startswith("/image/"):
                parts = self.path.split("/")
                image = None
                if len(parts) == 4 and parts[2].isdigit():
                    image = session.image_path(int(parts[2]), parts[3])
                if image is None or not image.is_file():
                    self._json(HTTPStatus.NOT_FOUND, {"error": f"no image at {self.path}"})
                    return
                ctype = mimetypes.guess_type(image.name)[0] or "application/octet-stream"
                self._send(HTTPStatus.OK, image.read_bytes(), ctype)
            else:
                self._json(HTTPStatus.NOT_FOUND, {"error": f"no page at {self.path}"})

        def do_POST(self) -> None:  # noqa: N802 - stdlib name
            if self.path != "/api/label":
                self._json(HTTPStatus.NOT_FOUND, {"error": f"no endpoint at {self.path}"})
                return
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                state = session.record(str(body.get("id")), body.get("score"))
            except (LabelError, json.JSONDecodeError, AttributeError) as exc:
                self._json(HTTPStatus.BAD_REQUEST, {"error": str(exc)})
                return
            sys.stderr.write(f"\rlabelled {state['done']}/{state['total']} ({session.annotator})  ")
            sys.stderr.flush()
            self._json(HTTPStatus.OK, state)

    return Handler


def start_server(session: LabelSession, port: int = 0) -> ThreadingHTTPServer:
    """Bind the page to 127.0.0.1:``port`` (0 = a free port); the caller runs ``serve_forever``."""
    server = ThreadingHTTPServer(("127.0.0.1", port), _make_handler(session))
    server.daemon_threads = True
    return server


def label_main(argv: list[str]) -> int:
    """``metacot reward label``: serve the labelling page until Ctrl-C. Returns the exit code."""
    parser = argparse.ArgumentParser(prog="metacot reward label", description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", required=True, help="samples JSONL (id, source_image, edited_image, ...)")
    parser.add_argument("--out", required=True, help="labels JSONL; appended to, so a restart resumes")
    parser.add_argument("--annotator", default=None, help="your name (default: the login name)")
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0 = any free port)")
    args = parser.parse_args(argv)
    annotator = args.annotator or getpass.getuser()
    try:
        session = LabelSession(args.samples, args.out, annotator)
        server = start_server(session, args.port)
    except (LabelError, OSError) as exc:
        print(f"metacot reward label: {exc}", file=sys.stderr)
        return 2
    host, port = server.server_address[:2]
    print(f"labelling {len(session.samples)} samples as {annotator!r}: {len(session.done)} already done; "
          f"labels go to {session.out_path}")
    if session.foreign:
        print(f"({session.foreign} lines of {session.out_path.name} are for ids outside this samples file; kept)")
    print(f"open http://{host}:{port}/ in a browser; Ctrl-C stops (every answer is already saved)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print(f"\nstopped; {len(session.done)}/{len(session.samples)} labelled by {annotator!r}")
    finally:
        server.server_close()
    return 0
