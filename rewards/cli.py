"""``metacot reward ...``: serve the CEC judge, and score edit records with it.

Subcommands:

- ``serve --model DIR [--host 127.0.0.1] [--port 8000] [--api-key-env VAR] [--max-model-len 1024]
  [--served-model-name N] [--python VLLM_PYTHON] [--work-dir DIR]``: start vLLM (see :mod:`rewards.serve`), print
  its URL once healthy, run until Ctrl-C / SIGTERM, then stop its whole process group. ``--api-key-env VAR``
  requires the key held in ``$VAR`` from clients (it reaches vLLM through the environment, never a command line);
  ``--api-key K`` still works but puts the key where ``ps`` shows it to every user of the machine, and warns.
- ``score --server URL --in SAMPLES.jsonl --out SCORES.jsonl [--prompt cec_v1] [--mode choice] [--model N]
  [--concurrency 8] [--api-key-env VAR]``: score edit records with :class:`rewards.cec.CECJudge`.

Input lines are JSON objects with ``id``, ``source_image``, ``edited_image`` (paths relative to the JSONL's folder),
``instruction`` and optionally ``cot`` (the :func:`metacot.cot.to_dict` form, rendered text, or null); other keys
are ignored. Each output line is ``{"id", "score", "prompt", "prompt_sha", "raw"}`` (``score`` null = the judge gave
no score). Output is append-safe: each line is written whole with one ``write`` on an ``O_APPEND`` file as soon as
its sample is judged, and a rerun skips the (id, prompt) pairs already in the file, so an interrupted run resumes
without losing or duplicating a sample.

``label`` and ``calibrate`` live in :mod:`rewards.labeling` and :mod:`rewards.calibration`; they are dispatched
from :data:`SUBCOMMANDS` below.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable

from metacot.jsonl import JSONLError, read_rows

from rewards.client import JudgeError

# Subcommands implemented in other modules: name -> "module:function" taking argv (after the name), returning an
# exit code. The lead wires `label` and `calibrate` here, e.g. "label": "rewards.labeling:label_main".
SUBCOMMANDS: dict[str, str] = {
    "label": "rewards.labeling:label_main",
    "calibrate": "rewards.calibration:calibrate_main",
}

_REQUIRED = ("id", "source_image", "edited_image", "instruction")


class ScoreInputError(ValueError):
    """A samples or scores file is malformed; the message names file:line."""


# --------------------------------------------------------------------------------------------------------- score
def load_samples(path: str | Path) -> list[dict[str, Any]]:
    """Read and validate edit records to score; image paths resolved against the file's folder.

    Raises:
        ScoreInputError: bad JSON, a missing/ill-typed field, a missing image file, or a duplicate id (file:line).
    """
    path = Path(path)
    records, seen = [], {}
    try:
        rows = read_rows(path)
    except JSONLError as exc:
        raise ScoreInputError(str(exc)) from None
    for number, row in rows:
        where = f"{path}:{number}"
        missing = [k for k in _REQUIRED if k not in row]
        if missing:
            raise ScoreInputError(f"{where}: missing {missing}; each line needs {list(_REQUIRED)} (+ optional cot)")
        if not isinstance(row["id"], (str, int)) or isinstance(row["id"], bool):
            raise ScoreInputError(f"{where}: id must be a string or an integer, got {row['id']!r}")
        if str(row["id"]) in seen:
            raise ScoreInputError(f"{where}: id {row['id']!r} already used at line {seen[str(row['id'])]}")
        seen[str(row["id"])] = number
        if not isinstance(row["instruction"], str):
            raise ScoreInputError(f"{where}: instruction must be a string")
        for key in ("source_image", "edited_image"):
            image = path.parent / str(row[key])
            if not image.is_file():
                raise ScoreInputError(f"{where}: {key} {row[key]!r} not found (looked at {image})")
            row[key] = image
        records.append(row)
    return records


def scored_pairs(path: str | Path) -> set[tuple[str, str]]:
    """(id, prompt) pairs already in a scores file (empty when it does not exist).

    Raises:
        ScoreInputError: a line is not a complete JSON object with id and prompt (file:line; fix or delete it).
    """
    path = Path(path)
    if not path.exists():
        return set()
    try:
        rows = read_rows(path)
    except JSONLError as exc:  # score lines are written whole (one write each): a broken one was damaged since
        raise ScoreInputError(f"{exc.problems[0]}: not a complete score line; fix or delete it") from None
    missing = [f"{path}:{n}: not a complete score line (no id or prompt); fix or delete it" for n, row in rows
               if "id" not in row or "prompt" not in row]
    if missing:
        raise ScoreInputError(missing[0])
    return {(str(row["id"]), str(row["prompt"])) for _, row in rows}


def score_file(judge: Any, in_path: str | Path, out_path: str | Path, chunk_size: int = 64) -> dict[str, int]:
    """Score the records of ``in_path`` with ``judge`` (a :class:`rewards.cec.CECJudge`), appending to ``out_path``.

    Returns:
        Counts: ``total``, ``skipped`` (already in the file), ``scored``, ``no_score``.

    Raises:
        ScoreInputError: bad input lines. RequestRefused / ServerUnavailable from the judge: lines written so far
            are complete and a rerun resumes after them.
    """
    from PIL import Image

    from rewards.contract import RewardBatch

    records = load_samples(in_path)
    done = scored_pairs(out_path)
    todo = [r for r in records if (str(r["id"]), judge.prompt.name) not in done]
    counts = {"total": len(records), "skipped": len(records) - len(todo), "scored": 0, "no_score": 0}
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(out_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        for start in range(0, len(todo), chunk_size):
            chunk = todo[start : start + chunk_size]

            def load(p: Path) -> Image.Image:
                with Image.open(p) as im:
                    return im.convert("RGB")

            batch = RewardBatch(
                [load(r["source_image"]) for r in chunk], [load(r["edited_image"]) for r in chunk],
                [r["instruction"] for r in chunk], [r.get("cot") for r in chunk], {"ids": [r["id"] for r in chunk]},
            )

            def write(index: int, result: Any, chunk: list[dict[str, Any]] = chunk) -> None:
                row = {"id": chunk[index]["id"], "score": result.score, "prompt": judge.prompt.name,
                       "prompt_sha": judge.prompt.sha, "raw": result.raw}
                os.write(fd, (json.dumps(row) + "\n").encode("utf-8"))  # one write: never a torn line
                counts["scored" if result.score is not None else "no_score"] += 1

            judge.judge(batch, on_result=write)
            os.fsync(fd)
    finally:
        os.close(fd)
    return counts


def _score_main(args: argparse.Namespace) -> int:
    from rewards.cec import CECJudge

    judge = CECJudge(url=args.server, model=args.model, prompt=args.prompt, mode=args.mode,
                     concurrency=args.concurrency, api_key_env=args.api_key_env)
    t0 = time.monotonic()
    try:
        counts = score_file(judge, args.inp, args.out)
    finally:
        judge.close()
    seconds = time.monotonic() - t0
    done = counts["scored"] + counts["no_score"]
    print(
        f"scored {done} samples in {seconds:.1f} s ({done / max(seconds, 1e-9):.1f}/s) with {judge.prompt_id} "
        f"[{args.mode}] on {judge.model}: {counts['no_score']} without a score, {counts['skipped']} already in "
        f"{args.out}"
    )
    return 0


# --------------------------------------------------------------------------------------------------------- serve
def _serve_main(args: argparse.Namespace) -> int:
    from rewards.serve import VLLMServer

    work_dir = args.work_dir or Path(os.environ.get("METACOT_CACHE", "~/.cache/metacot")).expanduser() / (
        f"vllm-serve/{args.served_model_name or Path(args.model).name}-{args.port}"
    )
    server = VLLMServer(
        args.model, python=args.python, host=args.host, port=args.port, api_key=serve_api_key(args),
        max_model_len=args.max_model_len, served_model_name=args.served_model_name, work_dir=work_dir,
    )

    def on_signal(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    print(f"starting vLLM on {server.url} (log: {server.log_path}) ...", flush=True)
    try:
        with server:
            print(f"judge server ready: {server.url} (model name {server.served_model_name!r}); Ctrl-C stops it",
                  flush=True)
            while server.alive():
                time.sleep(1.0)
            print(f"error: the vLLM server exited by itself\n{server.log_tail()}", file=sys.stderr)
            return 1
    except KeyboardInterrupt:
        print("stopped the judge server", flush=True)
        return 0


def serve_api_key(args: argparse.Namespace) -> str | None:
    """The key ``serve`` requires: from ``$<--api-key-env>``, or ``--api-key`` (with a warning: argv is public).

    Raises:
        ValueError: both given, or the named variable is unset.
    """
    if args.api_key and args.api_key_env:
        raise ValueError("--api-key and --api-key-env both given; keep --api-key-env (the key stays out of `ps`)")
    if args.api_key:
        print("warning: --api-key shows the key to every user of this machine (`ps`); put it in an environment "
              "variable and pass --api-key-env NAME instead", file=sys.stderr)
        return str(args.api_key)
    if not args.api_key_env:
        return None
    key = os.environ.get(args.api_key_env)
    if not key:
        raise ValueError(f"--api-key-env {args.api_key_env}: that environment variable is unset or empty")
    return key


# --------------------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metacot reward", description="The CEC judge: serve it, score with it.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, target in SUBCOMMANDS.items():  # parsed by their own modules; listed here for --help
        sub.add_parser(name, help=f"see `metacot reward {name} --help` ({target})", add_help=False)

    serve = sub.add_parser("serve", help="start the vLLM judge server and keep it running")
    serve.add_argument("--model", required=True, help="local model folder")
    serve.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key-env", help="require the bearer token held in this environment variable")
    serve.add_argument("--api-key", help="require this bearer token (visible in `ps`: prefer --api-key-env)")
    serve.add_argument("--max-model-len", type=int, default=1024)
    serve.add_argument("--served-model-name", help="name clients use (default: the folder name)")
    serve.add_argument("--python", help="python of the vLLM venv (default: $METACOT_VLLM_PYTHON)")
    serve.add_argument("--work-dir", type=Path, help="caches and server.log (default under ~/.cache/metacot)")

    score = sub.add_parser("score", help="score edit records (JSONL) with the CEC judge")
    score.add_argument("--server", required=True, help="judge server URL, e.g. http://127.0.0.1:8000")
    score.add_argument("--in", dest="inp", required=True, type=Path, help="edit records JSONL (with edited_image)")
    score.add_argument("--out", required=True, type=Path, help="scores JSONL (appended to; rerun resumes)")
    score.add_argument("--prompt", default="cec_v1", help="prompt variant in rewards/prompts or a .txt path")
    score.add_argument("--mode", default="choice", choices=("parse", "choice", "logprobs"))
    score.add_argument("--model", help="served model name (default: the server's only model)")
    score.add_argument("--concurrency", type=int, default=8)
    score.add_argument("--api-key-env", help="environment variable holding the server's API key")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``metacot reward``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        from rewards.contract import import_object

        handler: Callable[[list[str]], int] = import_object(SUBCOMMANDS[argv[0]])
        return handler(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            return _serve_main(args)
        return _score_main(args)
    except (JudgeError, ValueError, OSError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
