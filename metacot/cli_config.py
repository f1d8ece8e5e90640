"""``--config FILE`` and ``key=value`` for the tools that are not training stages (eval, export, calibrate).

The training stages take ``--config FILE [key=value ...]`` (:mod:`metacot.stage_cli`); the tools around them take
flags. :func:`parse_args` gives a tool's own argparse parser the same form, so that a job script can keep one YAML
file per step and change one value on the command line::

    metacot eval --config eval.yaml out=runs/eval-2 cot_source=oracle
    metacot eval --config eval.yaml --print-config        # the resolved values, as YAML

Keys are the flags' names without the leading dashes (``judge-url`` or ``judge_url``). Each value is parsed as YAML
(numbers, booleans, lists) and then checked as the flag would be (its type and choices). Precedence: the flag's
default < the file < ``key=value`` and flags given on the command line; the same key given both as a flag and as
``key=value`` is refused. Required flags and required groups may come from any of the three, and mutually exclusive
flags stay exclusive whichever way they are given. A flag that takes several values (``--scores A B``) takes
every word after it, so put ``key=value`` words before such a flag, or give the list as ``scores=[A,B]``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Sequence

import yaml

_OWN = ("config", "print_config", "overrides", "help")


class CLIConfigError(ValueError):
    """A config file or ``key=value`` the tool cannot use; the message says which key and what it takes."""


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.dest not in _OWN and a.dest != argparse.SUPPRESS}


def _coerce(action: argparse.Action, key: str, value: Any) -> Any:
    """``value`` (parsed YAML) as the flag of ``action`` would have stored it."""
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise CLIConfigError(f"{key} takes true or false, got {value!r}")
        # store_false flags (e.g. --merge-lora with dest keep_lora) share the dest: the value is the dest's value
        return value
    if action.nargs in ("+", "*"):
        items = value if isinstance(value, list) else [value]
        if action.nargs == "+" and not items:
            raise CLIConfigError(f"{key} needs at least one value")
        return [_scalar(action, key, v) for v in items]
    if isinstance(value, (list, dict)):
        raise CLIConfigError(f"{key} takes one value, got {value!r}")
    return _scalar(action, key, value)


def _scalar(action: argparse.Action, key: str, value: Any) -> Any:
    if value is None:
        return None
    kind = action.type or str
    try:
        out = kind(str(value))
    except (TypeError, ValueError) as exc:
        raise CLIConfigError(f"{key}: {value!r} is not a valid {getattr(kind, '__name__', kind)} ({exc})") from None
    if action.choices is not None and out not in action.choices:
        raise CLIConfigError(f"{key}: {out!r} is not one of {', '.join(map(str, action.choices))}")
    return out


def _explicit(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set[str]:
    """The dests the command line itself set (parsed again with every default suppressed)."""
    saved = {a: a.default for a in parser._actions}
    saved_defaults = dict(parser._defaults)
    try:
        for a in parser._actions:
            a.default = argparse.SUPPRESS
        parser._defaults.clear()
        ns = parser.parse_intermixed_args(list(argv))
    finally:
        for a, d in saved.items():
            a.default = d
        parser._defaults.update(saved_defaults)
    return set(vars(ns)) - set(_OWN)


def _load_file(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise CLIConfigError(f"--config {path}: no such file")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise CLIConfigError(f"--config {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise CLIConfigError(f"--config {path} must hold a mapping of key: value, got {type(data).__name__}")
    return data


def _key(options: dict[str, argparse.Action], raw: str, where: str) -> str:
    key = str(raw).strip().lstrip("-").replace("-", "_")
    if key not in options:
        raise CLIConfigError(f"{where}: unknown key {raw!r}; the keys are: {', '.join(sorted(options))}")
    return key


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse ``argv`` with ``parser`` plus ``--config FILE``, ``--print-config`` and ``key=value`` overrides.

    With ``--print-config`` the resolved values are printed as YAML and the process exits 0. Errors exit 2 through
    ``parser.error`` with one line saying which key and why.
    """
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    parser.add_argument("--config", default=None, help="YAML file of key: value (the flags' names)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved values as YAML and exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="values over the file's, e.g. out=runs/x")
    options = _options(parser)
    required = [a for a in options.values() if a.required and a.option_strings]
    groups = [g for g in parser._mutually_exclusive_groups]
    group_required = [g for g in groups if g.required]
    for a in required:
        a.required = False
    for g in group_required:
        g.required = False
    try:
        args = parser.parse_intermixed_args(argv)  # positionals (export's RUN) and key=value in any order
        explicit = _explicit(parser, argv)
        values: dict[str, Any] = {}
        if args.config:
            for raw, value in _load_file(args.config).items():
                key = _key(options, raw, f"--config {args.config}")
                values[key] = _coerce(options[key], key, value)
        for item in args.overrides:
            raw, eq, text = item.partition("=")
            if not eq:
                raise CLIConfigError(f"{item!r} is not key=value (flags go before the overrides)")
            key = _key(options, raw, item)
            if key in explicit:
                raise CLIConfigError(f"{key} is given twice: as a flag and as {item!r}; keep one")
            values[key] = _coerce(options[key], key, yaml.safe_load(text) if text else "")
        for key, value in values.items():
            if key not in explicit:
                setattr(args, key, value)
        missing = [a for a in required if getattr(args, a.dest) is None]
        if missing:
            raise CLIConfigError("missing " + ", ".join(
                f"{a.option_strings[-1]} (or {a.dest}=... / in --config)" for a in missing))
        for g in groups:
            dests = {a.dest for a in g._group_actions if a.dest in explicit or a.dest in values}
            if len(dests) > 1:
                raise CLIConfigError("only one of " + " / ".join(a.option_strings[-1] for a in g._group_actions)
                                     + " may be given")
            if g in group_required and not dests:
                raise CLIConfigError("one of " + " / ".join(a.option_strings[-1] for a in g._group_actions)
                                     + " is required")
    except CLIConfigError as exc:
        parser.error(str(exc))
    finally:
        for a in required:
            a.required = True
        for g in group_required:
            g.required = True
    if args.print_config:
        print(yaml.safe_dump({k: v for k, v in vars(args).items() if k not in _OWN}, sort_keys=True), end="")
        raise SystemExit(0)
    return args
