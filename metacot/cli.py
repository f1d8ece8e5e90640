"""``metacot``: the command line. Each command is a thin entry over library functions.

Commands are dispatched lazily (a dict of dotted module paths, no registry) so that ``metacot --help`` and light
commands start without importing torch. Each target module has ``main(argv: list[str]) -> int`` with its own argparse.
"""

from __future__ import annotations

import importlib
import sys

# command -> (module with main(argv), one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "data": ("data_recipes.cli", "Meta-CoT data: synth, synth-hypothetical, import, annotate (served VLM), mix, check"),
    "models": ("metacot.models.cli", "build tiny local models (tiny: Qwen2.5-VL + QwenImage edit pipeline folders)"),
    "sft": ("metacot.sft.cli", "Stage 1: SFT of the understanding and generation experts"),
    "grpo": ("metacot.flow_grpo.cli", "Stage 2: Flow-GRPO of the generation expert on early denoising steps"),
    "reward": ("rewards.cli", "CEC judge: serve (vLLM), score, label (human UI), calibrate"),
    "export": ("metacot.export.cli", "export a run as diffusers + transformers folders with a model card"),
    "edit": ("metacot.export.edit", "edit an image: write the Meta-CoT, then edit conditioned on it"),
    "eval": ("metacot.eval.cli", "evaluate edits against ground truth and baselines"),
    "launch": ("metacot.launch_cli", "render and submit SLURM jobs (DeepSpeed, judge nodes, preemption-safe)"),
    "experiment": ("metacot.experiments.cli", "the paper's ablation grid in miniature (ablation)"),
    "quickstart": ("metacot.experiments.quickstart", "the whole pipeline end to end on tiny models (CPU) or bigger (GPU)"),
}


def _usage() -> str:
    width = max(len(c) for c in COMMANDS)
    lines = ["usage: metacot <command> [options]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run 'metacot <command> --help' for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``metacot`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help", "help"}:
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"metacot: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, _ = COMMANDS[command]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            print(f"metacot: the {command!r} command is not available in this version ({exc})", file=sys.stderr)
            return 2
        raise
    return int(module.main(rest) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
