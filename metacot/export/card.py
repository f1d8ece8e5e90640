"""The export's provenance: facts gathered from the run(s) (``metacot.json``) and the model card (``README.md``).

Facts: the base models, the training data (sha256 of each JSONL and the data folder's ``manifest.json`` with its
content hash), every stage's resolved config (for a Flow-GRPO run also its upstream SFT run, found through the
Stage 1 ``final/`` it started from), the judge with its calibration-gate record (``gate.json``), the last metrics
rows, the run's plots (copied into ``report/``), the exact prompt format, and the export's own verification.
Missing provenance (a data file deleted since training, a GRPO run started from a folder that is not an SFT run's
``final/``) is recorded as missing, visibly, rather than failing the export: the weights are still what they are.

Left out: anything not in the run folders (hub metadata, licences of the base model: add them by hand).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import shutil
from pathlib import Path
from typing import Any

from metacot.config import to_dict
from metacot.cot import MetaCoT, MetaTask, TargetEntry, render
from metacot.export.source import RunSource, load_run_config, run_stage
from metacot.facts import prompt_options
from metacot.run import read_metrics
from metacot.models.conditioning import NEGATIVE_PROMPT, build_prompt, stock_template

EXAMPLE_INSTRUCTION = "Make the red circle blue."
EXAMPLE_COT = MetaCoT(
    meta_tasks=(MetaTask.REPLACE,), task="recolour", targets=("the red circle",),
    understanding=("localization", "color recognition"),
    thinking="Find the red circle and paint it blue; nothing else changes.",
    traversal=(TargetEntry("the red circle", True, "becomes blue"), TargetEntry("the green square", False, "")),
)




def example_prompt(options: dict[str, bool]) -> str:
    """The example edit's prompt string in the format the model was trained with."""
    cot = None if options["no_cot"] else render(EXAMPLE_COT)
    return build_prompt(EXAMPLE_INSTRUCTION, cot, include_instruction=options["include_instruction"])


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def data_facts(path: str) -> dict[str, Any]:
    """Hash of a training JSONL and the ``manifest.json`` of its folder, if there is one."""
    jsonl = Path(path)
    facts: dict[str, Any] = {"path": str(jsonl), "found": jsonl.is_file()}
    if not jsonl.is_file():
        return facts
    facts["sha256"] = _sha256(jsonl)
    manifest = jsonl.parent / "manifest.json"
    if manifest.is_file():
        content = json.loads(manifest.read_text())
        facts["manifest"] = {"path": str(manifest), "sha256": _sha256(manifest),
                             **{k: content.get(k) for k in ("recipe", "version", "seed", "settings", "content_sha256")}}
    return facts


def metrics_facts(run: Path) -> dict[str, Any]:
    """The last metrics row and the last row with evaluation figures (``eval_*``)."""
    path = run / "metrics.jsonl"
    rows = read_metrics(path, skip_torn=True) if path.is_file() else []
    last_eval = next((r for r in reversed(rows) if any(k.startswith("eval_") for k in r)), None)
    return {"rows": len(rows), "last": rows[-1] if rows else None, "last_eval": last_eval}


def stage_facts(run: Path, stage: str, cfg: Any) -> dict[str, Any]:
    """Everything recorded about one stage's run folder."""
    facts: dict[str, Any] = {"run": str(run.resolve()), "base_model": str(cfg.model), "config": to_dict(cfg),
                             "data": {"train": data_facts(cfg.data.train)}, "metrics": metrics_facts(run)}
    if stage == "grpo":
        if cfg.data.eval:
            facts["data"]["eval"] = data_facts(cfg.data.eval)
        gate = run / "gate.json"
        facts["judge"] = {"rewards": dict(cfg.rewards), "judge": to_dict(cfg.judge),
                          "gate": json.loads(gate.read_text()) if gate.is_file() else None}
    return facts


def upstream_sft_run(grpo_cfg: Any) -> Path | None:
    """The SFT run whose ``final/`` a Flow-GRPO run started from, or None when it did not start from one."""
    model = Path(grpo_cfg.model)
    run = model.parent
    if model.name == "final" and (run / "config.yaml").is_file() and run_stage(run / "config.yaml") == "sft":
        return run
    return None


def collect_facts(src: RunSource, final_meta: dict[str, Any]) -> dict[str, Any]:
    """Stages, base models, data, judge, metrics and prompt format of the exported weights."""
    stages = {src.stage: stage_facts(src.run, src.stage, src.cfg)}
    if src.stage == "grpo":
        upstream = upstream_sft_run(src.cfg)
        if upstream is None:
            stages["sft"] = {"missing": f"{src.cfg.model} is not the final/ of an SFT run folder"}
        else:
            stages["sft"] = stage_facts(upstream, "sft", load_run_config(upstream)[1])
    options = prompt_options(final_meta)
    template, drop = stock_template()
    doc = inspect.cleandoc(build_prompt.__doc__ or "").split("\nArgs:")[0].strip()
    prompt = {"function": "metacot.models.conditioning.build_prompt", **options, "doc": doc,
              "resolution": int(src.cfg.data.resolution), "example_instruction": EXAMPLE_INSTRUCTION,
              "example": example_prompt(options), "negative_prompt": NEGATIVE_PROMPT,
              "condition_template": template, "condition_template_dropped_tokens": drop}
    sft = stages.get("sft", {})
    return {"format": "metacot-export", "version": 1,
            "source": {"run": str(src.run.resolve()), "stage": src.stage, "step": src.step,
                       "weights": "final" if src.checkpoint is None else f"checkpoints/step-{src.step}"},
            "base_models": {"sft": sft.get("base_model"), "grpo": stages.get("grpo", {}).get("base_model")},
            "stages": stages, "prompt_format": prompt, "final_meta": final_meta}


def copy_reports(facts: dict[str, Any], out: Path) -> list[str]:
    """Copy each stage's plots into ``out/report/`` (of the evaluation grids only the newest); returns the paths."""
    copied = []
    for stage, info in facts["stages"].items():
        report = Path(info["run"]) / "report" if "run" in info else None
        if report is None or not report.is_dir():
            continue
        pngs = sorted(report.glob("*.png"))
        grids = [p for p in pngs if p.name.startswith("eval-")]
        for png in [p for p in pngs if not p.name.startswith("eval-")] + grids[-1:]:
            rel = f"report/{stage}-{png.name}"
            (out / "report").mkdir(exist_ok=True)
            shutil.copy2(png, out / rel)
            copied.append(rel)
    return copied


# -- README.md ---------------------------------------------------------------------------------------------------------

def _json_block(value: Any) -> str:
    return "```json\n" + json.dumps(value, indent=2, sort_keys=True, default=str) + "\n```"


def _fence(text: str, lang: str = "") -> str:
    return f"```{lang}\n{text.rstrip()}\n```"


def _usage(facts: dict[str, Any]) -> str:
    """Plain transformers + diffusers code: the understanding expert writes the Meta-CoT, the pipeline edits."""
    adapters, options = facts["layout"]["adapters"], facts["prompt_format"]
    size = facts["prompt_format"]["resolution"]
    lines = ["import torch", "from diffusers import DiffusionPipeline",
             "from transformers import AutoModelForImageTextToText, AutoProcessor", "from PIL import Image", "",
             'image = Image.open("in.png").convert("RGB")', 'instruction = "Make the red circle blue."', ""]
    if not options["no_cot"]:
        lines += ["# 1. the understanding expert writes the Meta-CoT (greedy, the chat it was trained on)",
                  'und = AutoModelForImageTextToText.from_pretrained("EXPORT/understanding", dtype=torch.bfloat16)',
                  'processor = AutoProcessor.from_pretrained("EXPORT/understanding")']
        if "understanding" in adapters:
            lines += ["from peft import PeftModel",
                      f'und = PeftModel.from_pretrained(und, "EXPORT/{adapters["understanding"]["path"]}")'
                      ".merge_and_unload()"]
        lines += ['chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]',
                  "text = processor.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)",
                  'inputs = processor(text=[text], images=[image], return_tensors="pt")',
                  "out = und.generate(**inputs, max_new_tokens=384, do_sample=False)",
                  'meta_cot = processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)'
                  ".strip()", ""]
    lines += ["# 2. the edit, conditioned on exactly the prompt string metacot trained with",
              'pipe = DiffusionPipeline.from_pretrained("EXPORT/pipeline", dtype=torch.bfloat16).to("cuda")']
    for adapter in adapters.values():
        for target in (t for t in adapter["apply_to"] if t.startswith("pipeline/")):
            attr = target.split("/")[1]
            lines += ["from peft import PeftModel",
                      f'pipe.{attr} = PeftModel.from_pretrained(pipe.{attr}, "EXPORT/{adapter["path"]}")'
                      ".merge_and_unload()"]
    if options["no_cot"]:
        lines.append("prompt = instruction  # this model was trained without Meta-CoT")
    elif options["include_instruction"]:
        lines.append('prompt = instruction + "\\nMeta-CoT:\\n" + meta_cot')
    else:
        lines.append('prompt = "Meta-CoT:\\n" + meta_cot  # trained to see the Meta-CoT without the instruction')
    lines += [f"edited = pipe(image=image, prompt=prompt, negative_prompt={options['negative_prompt']!r}, "
              "true_cfg_scale=4.0,",
              f"             num_inference_steps=50, height={size}, width={size}).images[0]"]
    return _fence("\n".join(lines), "python")


def _size_note(facts: dict[str, Any]) -> str:
    size = facts["prompt_format"]["resolution"]
    return (f"Training ran at {size}x{size} px with the source image at the same size. The stock pipeline resizes the "
            "source to about one megapixel whatever `height`/`width` say (its module-level `calculate_dimensions("
            "1024 * 1024, ratio)`); to condition on the source at the training size as metacot does, shrink that "
            "target as the export's own check does: "
            "`import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit as m; "
            f"f = m.calculate_dimensions; m.calculate_dimensions = lambda area, ratio: f({size} * {size}, ratio)`. "
            "`metacot edit` samples at the source's own size.")


def _storage(layout: dict[str, Any]) -> str:
    und = layout["understanding"]
    if und["files"] == "hardlink":
        return ("`understanding/` is the same model as `pipeline/text_encoder`: its weight files are **hard links** to "
                "those of `pipeline/text_encoder/` (no extra disk here), beside a copy of the small config and "
                "processor files, so it loads on its own with transformers. Tools that copy the folder (`cp -r` "
                "without `-l`, hub uploads, archives) store the weights twice. A pointer instead of links is not "
                "possible: transformers has no config field that loads weights from another folder, and symbolic "
                "links break hub uploads, zip archives and Windows.")
    if und["files"] == "copy":
        return ("`understanding/` is the same model as `pipeline/text_encoder` but this filesystem has no hard "
                "links, so its weight files are copies.")
    return ("`understanding/` holds its own weights: the understanding expert differs from the text encoder that "
            "conditions the MMDiT (its LoRA was not used to encode conditions).")


def _stage_section(stage: str, info: dict[str, Any]) -> list[str]:
    out = [f"### {stage.upper()} run", ""]
    if "missing" in info:
        return out + [f"Not found: {info['missing']}.", ""]
    out += [f"- run folder: `{info['run']}`", f"- base model: `{info['base_model']}`"]
    for split, data in info["data"].items():
        if not data["found"]:
            out.append(f"- {split} data: `{data['path']}` (**not found any more**; hash unknown)")
            continue
        out.append(f"- {split} data: `{data['path']}` sha256 `{data['sha256']}`")
        if "manifest" in data:
            m = data["manifest"]
            out.append(f"  - manifest `{m['path']}`: recipe {m['recipe']} v{m['version']}, seed {m['seed']}, "
                       f"content sha256 `{m['content_sha256']}`")
    if "judge" in info:
        out += ["", "Rewards and judge (the calibration gate's record, `gate.json`):", "",
                _json_block(info["judge"])]
    metrics = info["metrics"]
    out += ["", f"Final metrics ({metrics['rows']} rows in metrics.jsonl), last row:", "", _json_block(metrics["last"])]
    if metrics["last_eval"] and metrics["last_eval"] != metrics["last"]:
        out += ["", "Last evaluation row:", "", _json_block(metrics["last_eval"])]
    out += ["", "<details><summary>Resolved config</summary>", "", _json_block(info["config"]), "", "</details>", ""]
    return out


def render_readme(facts: dict[str, Any]) -> str:
    """The model card: what the folders are, how to use them without metacot, and where the weights came from."""
    src, layout, prompt = facts["source"], facts["layout"], facts["prompt_format"]
    v = facts["verification"]
    lines = [
        f"# metacot export of `{Path(src['run']).name}` ({src['stage']}, step {src['step']})", "",
        "An instruction-based image-editing model aligned with structured Meta-CoT reasoning by metacot "
        "(Stage 1 SFT, Stage 2 Flow-GRPO with a CoT-Editing Consistency reward).", "",
        "| folder | what | loads with |", "|---|---|---|",
        "| `pipeline/` | QwenImageEditPipeline: the trained VLM as text encoder + MMDiT + VAE + scheduler | "
        "`diffusers.DiffusionPipeline.from_pretrained` |",
        "| `understanding/` | the understanding expert (writes the Meta-CoT) | "
        "`transformers.AutoModelForImageTextToText`, `AutoProcessor` |",
    ]
    for name, adapter in layout["adapters"].items():
        lines.append(f"| `{adapter['path']}/` | peft LoRA of the {name} expert (r={adapter['r']}, "
                     f"alpha={adapter['alpha']}); apply to {', '.join(f'`{t}`' for t in adapter['apply_to'])} | "
                     f"`peft.PeftModel.from_pretrained` |")
    lines += ["| `metacot.json` | these facts for machines | json |", "",
              f"Weights: safetensors, {layout['dtype']}, shards of at most {layout['max_shard_size']}. LoRA: "
              f"**{layout['lora']}**"
              + (f": the components the adapters apply to hold the base weights (from `{layout['base_model']}`), so "
                 "the folder is complete on its own; `adapters/<expert>/` alone is a standard peft adapter over that "
                 "base, for users who have it." if layout["lora"] == "kept" else " into the weights."),
              f"Exported from `{src['run']}` ({src['weights']}).", "", _storage(layout), "",
              "## Use with plain transformers + diffusers", "", _usage(facts), "", _size_note(facts), "",
              "## Prompt format (exactly as in training)", "",
              f"Generator conditioned with: Meta-CoT {'**off** (no-CoT baseline)' if prompt['no_cot'] else 'on'}, "
              f"instruction {'included' if prompt['include_instruction'] else '**left out**'}. "
              f"Negative prompt for true CFG: `{prompt['negative_prompt']!r}`. The prompt goes into the stock "
              f"pipeline's condition template, whose first {prompt['condition_template_dropped_tokens']} tokens are "
              f"dropped. Format (`{prompt['function']}`):", "", _fence(prompt["doc"].strip()), "",
              "Example prompt string:", "", _fence(prompt["example"]), "",
              "## Training", "", f"- Stage 1 SFT started from `{facts['base_models']['sft']}`"]
    if facts["base_models"]["grpo"]:
        lines.append(f"- Stage 2 Flow-GRPO started from `{facts['base_models']['grpo']}` (Stage 1's final weights)")
    lines.append("")
    for stage in ("sft", "grpo"):
        if stage in facts["stages"]:
            lines += _stage_section(stage, facts["stages"][stage])
    if facts["reports"]:
        lines += ["### Curves", ""] + [f"![{Path(p).stem}]({p})" for p in facts["reports"]] + [""]
    lines += ["## Verification", "",
              f"Reloaded in a fresh process without metacot: a {v['smoke']['image_shape'][1]}px "
              f"{facts['verification_steps']}-step edit gave a finite image (pixels {v['smoke']['pixel_min']:.3f} .. "
              f"{v['smoke']['pixel_max']:.3f}, {v['smoke']['seconds']} s on {v['smoke']['device']}); the understanding "
              f"expert generated {v['smoke']['generated_tokens']} tokens."]
    if v.get("check_against"):
        lines += ["", f"Weights compared with `{v['check_against']['run']}` (merged LoRA recomputed as "
                      "W_base + (alpha/r) B A):", "", _json_block(v["check_against"]["folders"])]
    return "\n".join(lines) + "\n"
