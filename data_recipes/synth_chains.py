"""Edit chains: L edits applied in turn, with every intermediate image exact, optionally with injected dependencies.

Dependent chains make later steps refer to earlier ones, as in CGSE's synthetic chains:

- operation references: the object is named by what an earlier step did to it ("recolour the object that was
  moved"), used only when exactly one object underwent that operation so far;
- position references: a place is named by an object that left it ("add a star where the red square used to
  be"), used only when no other object ever carried that name in the chain.

Each step is also kept with its explicit instruction (references spelled out), so a single step is a valid
stand-alone edit sample; the chain's composite instruction joins the step phrasings (with the references) and its
Meta-CoT resolves every reference in the task thinking and lists every object's net change in the traversal.

Deliberately left out: camera motion and count changes inside chains (a moved camera makes "where X used to be"
ill-defined), references across chains, and more reference kinds than these two.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from data_recipes.synth_edits import EDITS, Edit, changes_by_id
from metacot.scenes import Scene, box_center, find, name_of, random_scene
from metacot.cot.format import MetaCoT, TargetEntry, render

CHAIN_CATEGORIES = ("add", "remove", "replace", "recolour", "resize", "relabel", "move", "swap")
# How an operation refers back to its object; swap and remove leave no single object to refer to.
OPERATION_WORDS = {
    "added": "the object that was added",
    "replaced": "the replacement object",
    "recoloured": "the object that was recoloured",
    "resized": "the object that was resized",
    "relabelled": "the object whose label was changed",
    "moved": "the object that was moved",
}
TARGETED = ("remove", "replace", "recolour", "resize", "relabel", "move", "swap")
# Chains whose instruction + Meta-CoT exceed this many whitespace words are redrawn, so both stay inside the
# condition encoder's 512 tokens: the tiny 1k-vocabulary BPE spends 1.9-2.05 tokens per word on this text
# (240 words -> at most about 500 tokens), Qwen's 151k-vocabulary tokenizer far fewer. Chains of up to 5 steps
# fit (5-step ones are often redrawn); from 6 steps on nearly every draw is too long and make_chain gives up
# with an error saying so.
COT_WORD_BUDGET = 240


@dataclass(frozen=True)
class Reference:
    """A dependency injected into a step: ``words`` in the instruction pick out ``object_id`` via step ``step``.

    ``kind`` is ``"operation"`` (the step acts on that object) or ``"position"`` (the step puts something
    where that object used to be).
    """

    kind: str
    words: str
    step: int
    object_id: str


@dataclass
class Step:
    """One step: the edit, the scene it starts from, its phrasing inside the chain and its reference if any."""

    edit: Edit
    before: Scene
    phrase: str
    reference: Reference | None


@dataclass
class Chain:
    """A chain of steps with its composite instruction and Meta-CoT (``scenes`` has L + 1 entries)."""

    dependent: bool
    scenes: list[Scene]
    steps: list[Step]
    instruction: str
    cot: MetaCoT


def make_chain(rng: random.Random, resolution: int, length: int, dependent: bool) -> Chain:
    """Generate one chain of ``length`` steps; dependent chains contain at least one reference when length > 1.

    Raises:
        RuntimeError: no chain could be built in 200 attempts: the chain is too long for the word budget
            (:data:`COT_WORD_BUDGET`) or the resolution too small.
    """
    for _ in range(200):
        scene = random_scene(rng, resolution)
        steps = _steps(rng, scene, length, dependent)
        if steps is None:
            continue
        if dependent and length > 1 and not any(s.reference for s in steps):
            continue
        scenes = [scene] + [s.edit.after for s in steps]
        cot, instruction = composite_cot(scenes, steps), compose_instruction([s.phrase for s in steps])
        if len(render(cot).split()) + len(instruction.split()) > COT_WORD_BUDGET:
            continue
        return Chain(dependent, scenes, steps, instruction, cot)
    raise RuntimeError(f"could not build a chain of {length} steps at {resolution} px whose instruction and "
                       f"Meta-CoT fit the {COT_WORD_BUDGET}-word budget in 200 tries; use a shorter --chain-length "
                       "(up to 5 steps fit)")


def _steps(rng: random.Random, scene: Scene, length: int, dependent: bool) -> list[Step] | None:
    steps: list[Step] = []
    used_ids = {o["id"] for o in scene["objects"]}
    for _ in range(length):
        step = None
        if dependent and steps and rng.random() < 0.7:
            step = _dependent_step(rng, scene, steps, tuple(used_ids))
        for category in rng.sample(CHAIN_CATEGORIES, len(CHAIN_CATEGORIES)):
            if step is not None:
                break
            edit = EDITS[category](rng, scene, used_ids=tuple(used_ids))
            step = Step(edit, scene, edit.instruction, None) if edit is not None else None
        if step is None:
            return None
        steps.append(step)
        scene = step.edit.after
        used_ids |= {o["id"] for o in scene["objects"]}
    return steps


def _dependent_step(rng: random.Random, scene: Scene, steps: list[Step], used_ids: tuple[str, ...]) -> Step | None:
    options = _operation_refs(scene, steps) + _position_refs(scene, steps)
    for ref in rng.sample(options, len(options)):
        if ref.kind == "operation":
            categories = [c for c in TARGETED if c != "relabel" or "text" in find(scene, ref.object_id)]
            category = rng.choice(categories)
            edit = EDITS[category](rng, scene, target=ref.object_id, used_ids=used_ids)
            override = {"t": ref.words}
        else:
            category = rng.choice(["add", "move"])
            vacated = steps[ref.step - 1].edit.vacated[ref.object_id]
            edit = EDITS[category](rng, scene, at=vacated, used_ids=used_ids)
            if category == "move" and edit is not None and edit.targets[0] == ref.object_id:
                edit = None  # "move the red square to where the red square used to be" is no reference
            override = {"where": ("to " if category == "move" else "") + ref.words}
        if edit is not None:
            return Step(edit, scene, edit.template.format(**{**edit.fill, **override}), ref)
    return None


def _operation_refs(scene: Scene, steps: list[Step]) -> list[Reference]:
    present = {o["id"] for o in scene["objects"]}
    refs = []
    for op, words in OPERATION_WORDS.items():
        # A swap moves two objects, so after one "the object that was moved" is ambiguous.
        ops = {op, "swapped"} if op == "moved" else {op}
        hits = [(j, t) for j, s in enumerate(steps, start=1) if s.edit.op in ops for t in s.edit.targets]
        if len({obj_id for _, obj_id in hits}) == 1 and hits[-1][1] in present:
            refs.append(Reference("operation", words, hits[-1][0], hits[-1][1]))
    return refs


def _position_refs(scene: Scene, steps: list[Step]) -> list[Reference]:
    """Places objects left, where "where X used to be" is unambiguous.

    That needs: X had one place until it left, at most one place since (it did not wander on), and no other
    object ever carried X's name.
    """
    scenes = [steps[0].before] + [s.edit.after for s in steps]
    refs = []
    for j, step in enumerate(steps, start=1):
        for obj_id, box in step.edit.vacated.items():
            name = name_of(find(step.before, obj_id))
            holders = {o["id"] for sc in scenes for o in sc["objects"] if name_of(o) == name}
            places_before = {tuple(o["box"]) for sc in scenes[:j] for o in sc["objects"] if o["id"] == obj_id}
            places_after = {tuple(o["box"]) for sc in scenes[j:] for o in sc["objects"] if o["id"] == obj_id}
            if holders == {obj_id} and places_before == {tuple(box)} and len(places_after) <= 1:
                refs.append(Reference("position", f"where {name} used to be", j, obj_id))
    return refs


def compose_instruction(phrases: list[str]) -> str:
    """Join step instructions into one: "First, ... Then, ... Finally, ..." (a single step stays as it is)."""
    if len(phrases) == 1:
        return phrases[0]
    words = ["First, "] + ["Then, "] * (len(phrases) - 2) + ["Finally, "]
    return " ".join(w + p[0].lower() + p[1:] for w, p in zip(words, phrases))


def composite_cot(scenes: list[Scene], steps: list[Step]) -> MetaCoT:
    """The whole chain's Meta-CoT: meta-tasks of all steps in order, references resolved, net change per object."""
    meta = tuple(m for s in steps for m in s.edit.cot.meta_tasks)
    targets = tuple(dict.fromkeys(t for s in steps for t in s.edit.cot.targets))
    understanding = tuple(dict.fromkeys(u for s in steps for u in s.edit.cot.understanding))
    if any(s.reference for s in steps):
        understanding += ("reference resolution",)
    lines = [f"The instruction has {len(steps)} steps, each applied to the result of the previous one."]
    for j, step in enumerate(steps, start=1):
        metas = " + ".join(m.value for m in step.edit.cot.meta_tasks)
        ref = step.reference
        explicit = step.edit.instruction
        if ref is not None:  # it continues the sentence "... is X, from step k; so: ..."
            explicit = explicit[0].lower() + explicit[1:]
        if ref is None:
            lines.append(f"Step {j} ({metas}): {explicit}")
        elif ref.kind == "operation":
            who = name_of(find(step.before, ref.object_id))
            lines.append(f'Step {j} ({metas}): "{ref.words}" is {who}, from step {ref.step}; so: {explicit}')
        else:
            cx, cy = box_center(steps[ref.step - 1].edit.vacated[ref.object_id])
            lines.append(f'Step {j} ({metas}): "{ref.words}" is the spot around ({cx:g}, {cy:g}) left in step '
                         f"{ref.step}; so: {explicit}")
    return MetaCoT(meta, "multi-step edit: " + ", ".join(s.edit.cot.task for s in steps), targets, understanding,
                   " ".join(lines), tuple(_net_traversal(scenes, steps)))


def _net_traversal(scenes: list[Scene], steps: list[Step]) -> list[TargetEntry]:
    """Objects of the first scene, then objects added later; changed = differs between first and last scene."""
    first = {o["id"]: o for o in scenes[0]["objects"]}
    last = {o["id"]: o for o in scenes[-1]["objects"]}
    order = list(first)
    names = {i: name_of(o) for i, o in first.items()}
    hows: dict[str, list[str]] = {}
    for j, step in enumerate(steps, start=1):
        for obj_id, how in changes_by_id(step.edit.cot, step.before, step.edit.after).items():
            if obj_id not in names:
                order.append(obj_id)
                names[obj_id] = name_of(find(step.edit.after, obj_id))
            hows.setdefault(obj_id, []).append(f"{how} (step {j})")
    entries = []
    for obj_id in order:
        changed = first.get(obj_id) != last.get(obj_id)
        how = "; ".join(hows.get(obj_id, []))
        if how and not changed:
            how += "; no net change"
        entries.append(TargetEntry(names[obj_id], changed, how))
    return entries
