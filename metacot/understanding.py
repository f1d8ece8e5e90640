"""The understanding expert: where a model folder keeps it, and how it writes the Meta-CoT.

:func:`load_understanding` is THE loader of the understanding expert (the Stage-1-tuned VLM) of any model folder:
a run's ``final/`` (SFT or Flow-GRPO), an export (or its ``pipeline/``), or a plain pipeline folder. Flow-GRPO with
``data.cot_source=model``, ``metacot eval``, the quickstart and ``metacot edit`` all call it, so the CoT is always
written by the trained expert, also where it is not the pipeline's text encoder (a LoRA-tuned VLM whose conditions
were encoded adapter-off keeps the tuned expert in ``final/understanding/``: see :mod:`metacot.final`).

:func:`write_cots` generates the Meta-CoT from (source image, instruction), greedy by default. The chat is the one the
expert was trained on in Stage 1 (``metacot.sft.trainer.lm_batch``): a user turn with the image and the instruction;
the assistant turn is the rendered Meta-CoT. Output is parsed leniently: a model's CoT that misses a section still
yields what it has, with the problems listed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image

from metacot.cot import parse_lenient
from metacot.cot.format import LenientResult


@dataclass
class WrittenCoT:
    text: str  # the raw generated text
    parsed: LenientResult  # what parse_lenient recovered (``parsed.cot`` may be None)

    @property
    def unparsed(self) -> bool:
        """Nothing usable could be read (no meta-task or no task): counted as ``cot_unparsed`` by Stage 2."""
        return self.parsed.cot is None

    @property
    def for_judge(self) -> Any:
        """What a CEC judge scores the edit against: the parsed Meta-CoT, or the raw text when it did not parse
        (the VLM judge reads text as is; the rule judge gives no score for text)."""
        return self.text if self.parsed.cot is None else self.parsed.cot


# -- where the expert lives -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelFolder:
    """Where the parts of a model folder live (:func:`describe_model_folder`).

    Attributes:
        root: the folder adapter paths are relative to (the export's root when given its ``pipeline/``).
        pipeline: the diffusers ``QwenImageEditPipeline`` folder.
        understanding: the transformers folder of the understanding expert's weights.
        processor: the folder its processor loads from.
        meta: the ``final/`` facts (a final's ``metacot.json``, an export's ``final_meta``); {} for a plain pipeline.
        adapters: an export's kept peft adapters, name -> ``{"path", "apply_to": [...]}`` (metacot.export.layout).
        shares_text_encoder: the understanding weights are the pipeline text encoder's (before adapters).
        kind: ``"export"``, ``"final"`` or ``"pipeline"``.
    """

    root: Path
    pipeline: Path
    understanding: Path
    processor: Path
    meta: dict[str, Any]
    adapters: dict[str, dict[str, Any]] = field(default_factory=dict)
    shares_text_encoder: bool = True
    kind: str = "pipeline"

    def adapters_on(self, target: str) -> list[dict[str, Any]]:
        """The kept adapters applied to ``target`` (``"understanding"``, ``"pipeline/text_encoder"``, ...)."""
        return [a for a in self.adapters.values() if target in a["apply_to"]]


def _export(root: Path, meta: dict[str, Any]) -> ModelFolder:
    layout = meta["layout"]
    und = root / layout["understanding"]["path"]
    return ModelFolder(root, root / layout["pipeline"], und, und, meta["final_meta"], layout["adapters"],
                       layout["understanding"]["same_weights_as"] == "pipeline/text_encoder", "export")


def describe_model_folder(folder: str | Path) -> ModelFolder:
    """Find the pipeline and the understanding expert of a model folder (module docstring lists the kinds).

    Raises:
        metacot.models.loading.ModelFolderError: the folder is none of them.
    """
    from metacot.models.loading import ModelFolderError

    folder = Path(folder)
    meta_path = folder / "metacot.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else None
    if (folder / "pipeline" / "model_index.json").is_file() and meta is not None:
        if meta.get("format") != "metacot-export":
            raise ModelFolderError(f"{meta_path} is not a metacot export's metacot.json (no format: metacot-export)")
        return _export(folder, meta)
    if (folder / "model_index.json").is_file():
        parent_meta = folder.parent / "metacot.json"
        if meta is None and folder.name == "pipeline" and parent_meta.is_file():
            outer = json.loads(parent_meta.read_text())
            if outer.get("format") == "metacot-export":  # an export's pipeline/: its expert is ../understanding
                return _export(folder.parent, outer)
        if meta is not None:  # a run's final/ (SFT, or Flow-GRPO carrying Stage 1's understanding/)
            und = meta.get("understanding", {"is_text_encoder": True, "path": "text_encoder"})
            path = folder / und["path"]
            return ModelFolder(folder, folder, path, folder / "processor" if und["is_text_encoder"] else path, meta,
                               {}, bool(und["is_text_encoder"]), "final")
        return ModelFolder(folder, folder, folder / "text_encoder", folder / "processor", {})
    hint = f" (a run folder? pass {folder / 'final'})" if (folder / "final").is_dir() else ""
    raise ModelFolderError(f"{folder} is neither a metacot export (pipeline/ + metacot.json), a run's final/ "
                           f"(model_index.json + metacot.json) nor a pipeline folder (model_index.json){hint}")


def merge_adapters(module: Any, root: Path, adapters: list[dict[str, Any]]) -> Any:
    """``module`` with each kept peft adapter (paths relative to ``root``) loaded and merged, in order."""
    for adapter in adapters:
        from peft import PeftModel

        module = PeftModel.from_pretrained(module, root / adapter["path"]).merge_and_unload()
    return module


def load_understanding(folder: str | Path, *, device: Any = "cpu", dtype: torch.dtype = torch.float32,
                       text_encoder: tuple[Any, Any] | None = None) -> tuple[Any, Any]:
    """The understanding expert ``(vlm, processor)`` of any model folder, frozen and in eval mode.

    Args:
        folder: a run's ``final/``, an export or its ``pipeline/``, or a plain pipeline folder.
        text_encoder: the caller's already loaded ``(vlm, processor)`` of the pipeline's text encoder, with the
            export's ``pipeline/text_encoder`` adapters merged when it has some; returned as is when the expert has
            the same weights (one copy in memory), ignored otherwise.

    Raises:
        metacot.models.loading.ModelFolderError: not a model folder.
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from metacot.models.vision_attention import use_grouped_vision_attention, use_uniform_grid_indices

    desc = describe_model_folder(folder)
    same = desc.shares_text_encoder and desc.adapters_on("understanding") == desc.adapters_on("pipeline/text_encoder")
    if same and text_encoder is not None:
        return text_encoder
    vlm = AutoModelForImageTextToText.from_pretrained(desc.understanding, dtype=dtype)
    use_grouped_vision_attention(vlm)
    use_uniform_grid_indices(vlm)
    vlm = merge_adapters(vlm, desc.root, desc.adapters_on("understanding")).to(device).eval().requires_grad_(False)
    return vlm, AutoProcessor.from_pretrained(desc.processor)


# -- writing ----------------------------------------------------------------------------------------------------------

def fit_to_budget(processor: Any, instruction: str, text: str, *, include_instruction: bool = True,
                  budget: int | None = None) -> tuple[str, bool]:
    """Cut a written Meta-CoT from its end until the generator's condition fits the text budget.

    A model's CoT can run to ``max_new_tokens`` (an undertrained one rambles); with the instruction it may then exceed
    the condition encoder's budget, which :func:`metacot.models.conditioning.encode_conditions` refuses. Training
    data is checked against the budget up front; written text is cut instead, and the caller counts the cut.

    Args:
        processor: the condition encoder's processor (its tokenizer counts).
        budget: text tokens after the prefix (default: the encoder's ``DEFAULT_MAX_TEXT_TOKENS``).

    Returns:
        ``(text, cut)``: the text as written when it fits, else its longest fitting prefix and True.
    """
    from metacot.models.conditioning import DEFAULT_MAX_TEXT_TOKENS, build_prompt, condition_text_token_counts

    budget = DEFAULT_MAX_TEXT_TOKENS if budget is None else budget
    cut = False
    for _ in range(8):  # a decode/encode round trip can shift the count by a token or two: re-check
        if not text.strip():
            return text, cut
        prompt = build_prompt(instruction, text, include_instruction=include_instruction)
        over = condition_text_token_counts(processor, [prompt], with_image=True)[0] - budget
        if over <= 0:
            return text, cut
        ids = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
        text = processor.tokenizer.decode(ids[:max(0, len(ids) - over - 1)], skip_special_tokens=True).rstrip()
        cut = True
    return "", True



def user_chat(processor: Any, instruction: str) -> str:
    """The prompt text of the understanding expert's chat (image + instruction, open assistant turn)."""
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]
    return processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


@torch.no_grad()
def write_cots(vlm: Any, processor: Any, images: Sequence[Image.Image], instructions: Sequence[str], *,
               max_new_tokens: int = 384, temperature: float | None = None, seed: int = 0) -> list[WrittenCoT]:
    """Decode a Meta-CoT for each (image, instruction) in one batch with left padding.

    Args:
        temperature: None decodes greedily (deterministic); a value samples at that temperature, seeded by ``seed``
            (the global RNG is restored afterwards).
    """
    tok = processor.tokenizer
    side = tok.padding_side
    tok.padding_side = "left"  # generation continues from the right edge of every row
    try:
        inputs = processor(text=[user_chat(processor, i) for i in instructions], images=list(images),
                           padding=True, return_tensors="pt").to(next(vlm.parameters()).device)
    finally:
        tok.padding_side = side
    sampling = {} if temperature is None else {"temperature": temperature, "top_k": 0, "top_p": 1.0}
    device = next(vlm.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        out = vlm.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=temperature is not None,
                           pad_token_id=tok.pad_token_id, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
                           **sampling)
    texts = tok.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return [WrittenCoT(t.strip(), parse_lenient(t)) for t in texts]
