"""Single edits on synthetic scenes with exact ground truth: the edited scene, the instruction and the Meta-CoT.

Every edit category is one function ``(rng, scene, target=None, at=None, used_ids=()) -> Edit | None``: it returns
None when the edit does not fit this scene (no room, no label to change, ...) and the caller tries something else.
``target`` (an object id) and ``at`` (a box an object left earlier) let edit chains inject dependencies.

Categories and the meta-tasks they are composed of:

=========  ========================  ===========================================================
category   meta-tasks                what changes
=========  ========================  ===========================================================
add        Add                       a new object in a region or beside another object
remove     Remove                    one object disappears
replace    Replace                   one object becomes a different shape and colour, same place
recolour   Replace                   colour attribute of one object
resize     Replace                   size attribute of one object (around its centre)
relabel    Replace                   text label of one object
move       Position Change           one object goes to a region or beside another object
swap       Position Change x2        two objects exchange places
count      Add or Remove             the number of objects of one shape
zoom       Camera Motion             the whole view scales about its centre; objects may leave it
pan        Camera Motion             the whole view shifts; objects may leave it
=========  ========================  ===========================================================

Deliberately left out: background changes, style edits, rotations, occlusion.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from metacot.scenes import (
    BESIDE,
    MAX_OBJECTS_AFTER_EDIT,
    REGIONS,
    Box,
    Obj,
    Scene,
    box_at,
    box_center,
    box_fits,
    boxes_apart,
    clone,
    describe,
    find,
    free_colors,
    label_fits,
    min_gap,
    name_of,
    new_object,
    next_id,
    place,
    place_beside,
    random_label,
    region_destination,
    region_of,
    region_phrase,
    side_for,
)
from metacot.cot.format import MetaCoT, MetaTask, TargetEntry
from metacot.cot.schema import SHAPES, SIZES

ADD, REMOVE, REPLACE = MetaTask.ADD, MetaTask.REMOVE, MetaTask.REPLACE
MOVE, CAMERA = MetaTask.POSITION_CHANGE, MetaTask.CAMERA_MOTION
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six")
WHOLE_VIEW = "the whole view"


@dataclass
class Edit:
    """One edit of a scene.

    Attributes:
        category: edit category (see the module docstring).
        after: the edited scene.
        cot: the exact Meta-CoT (traversal: objects of the source scene in order, then added objects).
        template: the instruction with ``{t}``/``{t2}`` (target objects) and ``{where}`` (a place) placeholders.
        fill: explicit values of those placeholders (object names, region words).
        targets: ids of the objects the operation acts on (for add: the new object).
        op: the operation as a past participle, used by chains ("the object that was moved").
        vacated: id -> box an object left (moved away or removed), for "where X used to be" references.
    """

    category: str
    after: Scene
    cot: MetaCoT
    template: str
    fill: dict[str, str]
    targets: tuple[str, ...]
    op: str
    vacated: dict[str, Box] = field(default_factory=dict)

    @property
    def instruction(self) -> str:
        """The instruction with every reference spelled out explicitly."""
        return self.template.format(**self.fill)


def make_cot(
    meta: tuple[MetaTask, ...],
    task: str,
    understanding: tuple[str, ...],
    before: Scene,
    after: Scene,
    changes: dict[str, str],
    targets: tuple[str, ...],
    thinking: str,
) -> MetaCoT:
    """Build a Meta-CoT whose traversal covers every object: ``changes`` maps object id -> how it changes."""
    before_ids = {o["id"] for o in before["objects"]}
    entries = [TargetEntry(name_of(o), o["id"] in changes, changes.get(o["id"], "")) for o in before["objects"]]
    entries += [TargetEntry(name_of(o), True, changes[o["id"]]) for o in after["objects"] if o["id"] not in before_ids]
    return MetaCoT(meta, task, targets, understanding, thinking, tuple(entries))


def _pick(
    rng: random.Random, scene: Scene, target: str | None, need: Callable[[Obj], bool] = lambda o: True
) -> Obj | None:
    """The ``target`` object if it qualifies, else (no target) a random qualifying object; None if none does."""
    if target is not None:
        obj = find(scene, target)
        return obj if need(obj) else None
    candidates = [o for o in scene["objects"] if need(o)]
    return rng.choice(candidates) if candidates else None


def _where(rng: random.Random, scene: Scene, size: tuple[int, int], ignore: tuple[str, ...], destination: bool,
           avoid_region: str | None = None) -> tuple[Box, str] | None:
    """A free box and the words for it: a region of the 3x3 grid, or beside another object."""
    others = [o for o in scene["objects"] if o["id"] not in ignore]
    if others and rng.random() < 0.35:
        anchor = rng.choice(others)
        direction = rng.choice(list(BESIDE))
        box = place_beside(rng, scene, anchor["box"], size, direction, ignore)
        if box is not None:
            return box, f"{BESIDE[direction]} {name_of(anchor)}"
    regions = [r for r in REGIONS if r != avoid_region]
    for region in rng.sample(regions, len(regions)):
        box = place(rng, scene, size, region, ignore)
        if box is None:
            continue
        return box, (region_destination(region) if destination else region_phrase(region))
    return None


def _at(
    scene: Scene, at: Box, size: tuple[int, int], ignore: tuple[str, ...], destination: bool
) -> tuple[Box, str] | None:
    """A box of ``size`` centred where ``at`` was, with its region words; None if that spot is not free."""
    box = box_at(box_center(at), *size)
    if not box_fits(scene, box, ignore):
        return None
    region = region_of(box, scene["width"])
    return box, (region_destination(region) if destination else region_phrase(region))


def edit_add(rng: random.Random, scene: Scene, target: str | None = None, at: Box | None = None,
             used_ids: tuple[str, ...] = ()) -> Edit | None:
    """Add one new object (unused colour) in a region, beside an object, or at ``at``."""
    colors = free_colors(scene)
    if len(scene["objects"]) >= MAX_OBJECTS_AFTER_EDIT or not colors:
        return None
    obj: Obj = {"id": next_id(scene, set(used_ids)), "shape": rng.choice(SHAPES), "color": rng.choice(colors)}
    for size in rng.sample(SIZES, len(SIZES)):
        side = side_for(size, scene["width"])
        found = _at(scene, at, (side, side), (), False) if at else _where(rng, scene, (side, side), (), False)
        if found is not None:
            obj.update(size=size, box=found[0])
            break
    else:
        return None
    after = clone(scene)
    after["objects"].append(obj)
    where = found[1]
    thinking = rng.choice([
        f"Adding puts a new object into free space without touching the others: {describe(obj)} goes {where}. "
        "Every existing object keeps its colour, shape, size and place.",
        f"Add: {describe(obj)} must appear {where}, where there is room so nothing overlaps. "
        "No existing object changes.",
    ])
    cot = make_cot((ADD,), "add an object", ("localization", "spatial reasoning"), scene, after,
                   {obj["id"]: f"added {where}"}, (name_of(obj),), thinking)
    template = rng.choice(["Add {new} {where}.", "Put {new} {where}.", "Place {new} {where}."])
    return Edit("add", after, cot, template, {"new": describe(obj), "where": where}, (obj["id"],), "added")


def edit_remove(rng: random.Random, scene: Scene, target: str | None = None, at: Box | None = None,
                used_ids: tuple[str, ...] = ()) -> Edit | None:
    """Remove one object (never the last one)."""
    obj = _pick(rng, scene, target)
    if obj is None or len(scene["objects"]) < 2:
        return None
    after = clone(scene)
    after["objects"] = [o for o in after["objects"] if o["id"] != obj["id"]]
    thinking = (f"Removing deletes one object: {name_of(obj)} disappears and plain background shows where it was. "
                "The other objects stay exactly as they are.")
    cot = make_cot((REMOVE,), "remove an object", ("localization", "object recognition"), scene, after,
                   {obj["id"]: "removed"}, (name_of(obj),), thinking)
    template = rng.choice(["Remove {t}.", "Delete {t}.", "Take {t} out of the picture.", "Erase {t}."])
    return Edit("remove", after, cot, template, {"t": name_of(obj)}, (obj["id"],), "removed",
                {obj["id"]: obj["box"]})


def edit_replace(rng: random.Random, scene: Scene, target: str | None = None, at: Box | None = None,
                 used_ids: tuple[str, ...] = ()) -> Edit | None:
    """Replace one object by another shape (colour unused or its own) in the same box; a label is dropped."""
    obj = _pick(rng, scene, target)
    if obj is None:
        return None
    new = {"id": obj["id"], "shape": rng.choice([s for s in SHAPES if s != obj["shape"]]),
           "color": rng.choice(free_colors(scene) + [obj["color"]]), "size": obj["size"], "box": list(obj["box"])}
    after = clone(scene)
    after["objects"] = [new if o["id"] == obj["id"] else o for o in after["objects"]]
    new_words = describe(new, with_size=False)
    thinking = (f"Replacing swaps one object for another in the same place: {name_of(obj)} becomes {new_words} "
                "of the same size. Nothing else moves or changes.")
    cot = make_cot((REPLACE,), "replace an object", ("localization", "object recognition"), scene, after,
                   {obj["id"]: f"replaced by {new_words}"}, (name_of(obj),), thinking)
    template = rng.choice(["Replace {t} with {new}.", "Turn {t} into {new}.", "Swap out {t} for {new}."])
    return Edit("replace", after, cot, template, {"t": name_of(obj), "new": new_words}, (obj["id"],), "replaced")


def edit_recolour(rng: random.Random, scene: Scene, target: str | None = None, at: Box | None = None,
                  used_ids: tuple[str, ...] = ()) -> Edit | None:
    """Give one object an unused colour."""
    obj, colors = _pick(rng, scene, target), free_colors(scene)
    if obj is None or not colors:
        return None
    color = rng.choice(colors)
    after = clone(scene)
    find(after, obj["id"])["color"] = color
    thinking = rng.choice([
        f"Recolouring is a Replace of one attribute: {name_of(obj)} keeps its shape, size and position and only "
        f"its colour changes to {color}. The other objects are untouched.",
        f"Only the colour of {name_of(obj)} is replaced, by {color}; shape, size, place and every other object "
        "stay the same.",
    ])
    cot = make_cot((REPLACE,), "recolour", ("localization", "color recognition"), scene, after,
                   {obj["id"]: f"becomes {color}"}, (name_of(obj),), thinking)
    template = rng.choice(["Make {t} {color}.", "Recolour {t} {color}.", "Change the colour of {t} to {color}.",
                           "Paint {t} {color}."])
    return Edit("recolour", after, cot, template, {"t": name_of(obj), "color": color}, (obj["id"],), "recoloured")


def edit_resize(rng: random.Random, scene: Scene, target: str | None = None, at: Box | None = None,
                used_ids: tuple[str, ...] = ()) -> Edit | None:
    """Change one object's size class around its centre (its label, if any, must still fit)."""
    obj = _pick(rng, scene, target)
    if obj is None:
        return None
    for size in rng.sample([s for s in SIZES if s != obj["size"]], len(SIZES) - 1):
        side = side_for(size, scene["width"])
        box = box_at(box_center(obj["box"]), side)
        fits_label = "text" not in obj or label_fits(obj["shape"], box, obj["text"], scene["width"])
        if fits_label and box_fits(scene, box, (obj["id"],)) and box != obj["box"]:
            break
    else:
        return None
    after = clone(scene)
    find(after, obj["id"]).update(size=size, box=box)
    verb = "grows" if SIZES.index(size) > SIZES.index(obj["size"]) else "shrinks"
    thinking = (f"Resizing replaces the size attribute: {name_of(obj)} {verb} from {obj['size']} to {size} around "
                "its own centre; colour and shape stay, and no other object moves.")
    cot = make_cot((REPLACE,), "resize", ("localization", "size comparison"), scene, after,
                   {obj["id"]: f"{verb} from {obj['size']} to {size}"}, (name_of(obj),), thinking)
    template = rng.choice(["Make {t} {size}.", "Resize {t} to {size}.", "Change the size of {t} to {size}."])
    return Edit("resize", after, cot, template, {"t": name_of(obj), "size": size}, (obj["id"],), "resized")


def edit_relabel(rng: random.Random, scene: Scene, target: str | None = None, at: Box | None = None,
                 used_ids: tuple[str, ...] = ()) -> Edit | None:
    """Change the text label of a labelled object."""
    obj = _pick(rng, scene, target, lambda o: "text" in o)
    if obj is None:
        return None
    text = next((t for t in (random_label(rng, obj["shape"], obj["box"], scene["width"]) for _ in range(8))
                 if t and t != obj["text"]), None)
    if text is None:
        return None
    after = clone(scene)
    find(after, obj["id"])["text"] = text
    old = obj["text"]
    thinking = (f'Changing text is a Replace of the label: the label on {name_of(obj)} reads "{old}" and must read '
                f'"{text}". The object itself and everything else stay the same.')
    cot = make_cot((REPLACE,), "change text", ("localization", "text recognition"), scene, after,
                   {obj["id"]: f'label changes from "{old}" to "{text}"'}, (name_of(obj),), thinking)
    template = rng.choice(['Change the label on {t} to "{text}".', 'Write "{text}" on {t} instead.',
                           'Replace the text on {t} with "{text}".'])
    return Edit("relabel", after, cot, template, {"t": name_of(obj), "text": text}, (obj["id"],), "relabelled")


def edit_move(rng: random.Random, scene: Scene, target: str | None = None, at: Box | None = None,
              used_ids: tuple[str, ...] = ()) -> Edit | None:
    """Move one object to another region, beside another object, or to ``at``."""
    obj = _pick(rng, scene, target)
    if obj is None:
        return None
    box = obj["box"]
    size = (box[2] - box[0], box[3] - box[1])
    ignore = (obj["id"],)
    old_region = region_of(box, scene["width"])
    if at is not None:
        found = _at(scene, at, size, ignore, True)
    else:
        found = _where(rng, scene, size, ignore, True, avoid_region=old_region)
    if found is None or found[0] == box:
        return None
    (ox, oy), (nx, ny) = box_center(box), box_center(found[0])
    if at is None and max(abs(nx - ox), abs(ny - oy)) < scene["width"] / 6:
        return None  # a move into the neighbouring region by a few pixels is too faint a signal
    after = clone(scene)
    find(after, obj["id"])["box"] = found[0]
    where = found[1]
    thinking = (f"Position Change moves one object: {name_of(obj)} goes from the {old_region} {where} and keeps its "
                "look. The spot it leaves shows background; the other objects stay.")
    cot = make_cot((MOVE,), "move an object", ("localization", "spatial reasoning"), scene, after,
                   {obj["id"]: f"moves {where}"}, (name_of(obj),), thinking)
    template = rng.choice(["Move {t} {where}.", "Shift {t} {where}.", "Take {t} {where}."])
    return Edit("move", after, cot, template, {"t": name_of(obj), "where": where}, (obj["id"],), "moved",
                {obj["id"]: box})


def edit_swap(rng: random.Random, scene: Scene, target: str | None = None, at: Box | None = None,
              used_ids: tuple[str, ...] = ()) -> Edit | None:
    """Exchange the places (centres) of two objects."""
    first = _pick(rng, scene, target)
    others = [o for o in scene["objects"] if first is not None and o["id"] != first["id"]]
    if first is None or not others:
        return None
    second = rng.choice(others)
    a, b = first["box"], second["box"]
    new_a = box_at(box_center(b), a[2] - a[0], a[3] - a[1])
    new_b = box_at(box_center(a), b[2] - b[0], b[3] - b[1])
    ignore = (first["id"], second["id"])
    if not (box_fits(scene, new_a, ignore) and box_fits(scene, new_b, ignore)
            and boxes_apart(new_a, new_b, min_gap(scene["width"]))):
        return None
    after = clone(scene)
    find(after, first["id"])["box"], find(after, second["id"])["box"] = new_a, new_b
    na, nb = name_of(first), name_of(second)
    thinking = (f"Swapping is two Position Changes: {na} moves to where {nb} is and {nb} moves to where {na} is. "
                "Both keep their look; nothing else moves.")
    cot = make_cot((MOVE, MOVE), "swap two objects", ("localization", "spatial reasoning"), scene, after,
                   {first["id"]: f"moves to where {nb} was", second["id"]: f"moves to where {na} was"}, (na, nb),
                   thinking)
    template = rng.choice(["Swap {t} and {t2}.", "Swap the positions of {t} and {t2}.",
                           "Exchange the places of {t} and {t2}."])
    return Edit("swap", after, cot, template, {"t": na, "t2": nb}, ignore, "swapped")


def _plural(shape: str, count: int) -> str:
    return shape if count == 1 else shape + "s"


def edit_count(rng: random.Random, scene: Scene, target: str | None = None, at: Box | None = None,
               used_ids: tuple[str, ...] = ()) -> Edit | None:
    """Change how many objects of one shape there are (adds objects anywhere or removes some)."""
    shape = rng.choice(SHAPES)
    same = [o for o in scene["objects"] if o["shape"] == shape]
    have, total = len(same), len(scene["objects"])
    wanted = [k for k in range(5) if k != have and 1 <= total - have + k <= MAX_OBJECTS_AFTER_EDIT]
    if not wanted:
        return None
    want = rng.choice(wanted)
    after, changes = clone(scene), {}
    if want < have:
        gone = rng.sample(same, have - want)
        after["objects"] = [o for o in after["objects"] if o not in gone]
        changes = {o["id"]: "removed" for o in gone}
        touched = gone
    else:
        colors = rng.sample(free_colors(scene), min(want - have, len(free_colors(scene))))
        if len(colors) < want - have:
            return None
        for color in colors:
            obj = new_object(rng, after, next_id(after, set(used_ids)), color, shape=shape)
            if obj is None:
                return None
            obj.pop("text", None)  # new objects are plain: the instruction says nothing about labels
            after["objects"].append(obj)
            changes[obj["id"]] = f"added {region_phrase(region_of(obj['box'], scene['width']))}"
        touched = [o for o in after["objects"] if o["id"] in changes]
    names = ", ".join(name_of(o) for o in touched)
    diff = abs(want - have)
    verb = "removed" if want < have else "added"
    thinking = (f"Changing a count starts with counting: there {'is' if have == 1 else 'are'} {NUMBER_WORDS[have]} "
                f"{_plural(shape, have)} now and {NUMBER_WORDS[want]} wanted, so {NUMBER_WORDS[diff]} "
                f"{_plural(shape, diff)} must be {verb} ({names}). Everything else stays.")
    meta = (REMOVE,) if want < have else (ADD,)
    cot = make_cot(meta, "change the count", ("counting", "localization"), scene, after, changes,
                   tuple(name_of(o) for o in touched), thinking)
    if want == 0:
        template = rng.choice(["Remove all the {plural}.", "Get rid of every {shape}."])
    else:
        template = rng.choice(["Make it {k} {noun}.", "Change the number of {plural} to {k}.",
                               "There should be {k} {noun}."])
    fill = {"k": NUMBER_WORDS[want], "noun": _plural(shape, want), "plural": shape + "s", "shape": shape}
    return Edit("count", after, cot, template, fill, tuple(changes), verb)


def _direction_words(dx: float, dy: float) -> str:
    words = [w for w, d in (("up", -dy), ("down", dy), ("left", -dx), ("right", dx)) if d >= 1]
    return " and ".join(words)


def _camera(scene: Scene, transform: Callable[[Box], Box]) -> tuple[Scene, dict[str, Box]] | None:
    """Apply a box transform to every object; objects wholly outside leave the view; partly outside -> None."""
    res = scene["width"]
    after = clone(scene)
    after["objects"], moved = [], {}
    for obj in scene["objects"]:
        box = transform(obj["box"])
        if box[2] <= 0 or box[0] >= res or box[3] <= 0 or box[1] >= res:
            continue  # left the view entirely
        if box[0] < 0 or box[1] < 0 or box[2] > res or box[3] > res or min(box[2] - box[0], box[3] - box[1]) < 3:
            return None  # cut by the frame or too small to read: pick another camera motion
        if "text" in obj and not label_fits(obj["shape"], box, obj["text"], res):
            return None
        after["objects"].append({**obj, "box": box})
        moved[obj["id"]] = box
    gap = min_gap(res)
    boxes = list(moved.values())
    if not boxes or any(not boxes_apart(a, b, gap) for i, a in enumerate(boxes) for b in boxes[i + 1:]):
        return None
    return after, moved


def edit_zoom(rng: random.Random, scene: Scene, target: str | None = None, at: Box | None = None,
              used_ids: tuple[str, ...] = ()) -> Edit | None:
    """Zoom the whole view in or out about its centre."""
    center = scene["width"] / 2
    for factor in rng.sample([1.25, 1.5, 2.0, 0.75, 0.5], 5):  # the first that keeps every object whole
        result = _camera(scene, lambda box, z=factor: [round(center + (v - center) * z) for v in box])
        if result is not None:
            break
    else:
        return None
    after, moved = result
    z = f"{factor:g}"
    changes = {}
    for obj in scene["objects"]:
        if obj["id"] not in moved:
            changes[obj["id"]] = "leaves the view"
            continue
        (ox, oy), (nx, ny) = box_center(obj["box"]), box_center(moved[obj["id"]])
        motion = _direction_words(nx - ox, ny - oy)
        scale = f"grows {z}x" if factor > 1 else f"shrinks to {z}x"
        changes[obj["id"]] = f"{scale} and moves {motion}" if motion else f"{scale} in place"
    gone = [name_of(o) for o in scene["objects"] if o["id"] not in moved]
    leaving = f" {', '.join(gone)} {'leaves' if len(gone) == 1 else 'leave'} the view." if gone else ""
    effect = "in to {z}x about the centre scales every object by {z}, making it larger and pushing it away from"
    if factor < 1:
        effect = "out to {z}x about the centre scales every object by {z}, making it smaller and pulling it toward"
    thinking = (f"Camera Motion changes the whole view, not single objects: zooming {effect.format(z=z)} the "
                f"centre.{leaving} The background colour stays.")
    cot = make_cot((CAMERA,), "zoom", ("spatial reasoning", "size comparison"), scene, after, changes,
                   (WHOLE_VIEW,), thinking)
    if factor > 1:
        template = rng.choice(["Zoom in {z}x.", "Zoom in on the centre by {z}x.",
                               "Move the camera closer ({z}x zoom)."])
    else:
        template = rng.choice(["Zoom out to {z}x.", "Pull the camera back to {z}x zoom."])
    return Edit("zoom", after, cot, template, {"z": z}, tuple(o["id"] for o in scene["objects"]), "zoomed")


_OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}


def edit_pan(rng: random.Random, scene: Scene, target: str | None = None, at: Box | None = None,
             used_ids: tuple[str, ...] = ()) -> Edit | None:
    """Pan the camera: the whole picture shifts the opposite way; the uncovered strip is background."""
    options = [(d, f, a) for d in _OPPOSITE for f, a in ((1 / 8, "slightly"), (1 / 4, "by a quarter of the view"))]
    for direction, fraction, amount in rng.sample(options, len(options)):  # noqa: B007 (first that fits)
        shift = round(scene["width"] * fraction)
        dx = {"left": shift, "right": -shift}.get(direction, 0)
        dy = {"up": shift, "down": -shift}.get(direction, 0)
        result = _camera(scene, lambda b, x=dx, y=dy: [b[0] + x, b[1] + y, b[2] + x, b[3] + y])
        if result is not None:
            break
    else:
        return None
    after, moved = result
    opposite = _OPPOSITE[direction]
    changes = {o["id"]: (f"shifts {opposite} by {shift} pixels" if o["id"] in moved else "leaves the view")
               for o in scene["objects"]}
    gone = [name_of(o) for o in scene["objects"] if o["id"] not in moved]
    leaving = f" {', '.join(gone)} {'leaves' if len(gone) == 1 else 'leave'} the view." if gone else ""
    thinking = (f"Camera Motion: panning the camera {direction} moves the whole picture {opposite} by {shift} "
                f"pixels; objects keep their size and look.{leaving} The uncovered strip shows plain background.")
    cot = make_cot((CAMERA,), "pan", ("spatial reasoning",), scene, after, changes, (WHOLE_VIEW,), thinking)
    template = rng.choice(["Pan the camera {dir} {amount}.", "Move the view {dir} {amount}.",
                           "Shift the camera {dir} {amount}."])
    return Edit("pan", after, cot, template, {"dir": direction, "amount": amount},
                tuple(o["id"] for o in scene["objects"]), "panned")


EDITS: dict[str, Callable[..., Edit | None]] = {
    "add": edit_add, "remove": edit_remove, "replace": edit_replace, "recolour": edit_recolour,
    "resize": edit_resize, "relabel": edit_relabel, "move": edit_move, "swap": edit_swap, "count": edit_count,
    "zoom": edit_zoom, "pan": edit_pan,
}
CATEGORIES: tuple[str, ...] = tuple(EDITS)


def traversal_ids(before: Scene, after: Scene) -> list[str]:
    """Object ids in the order of a Meta-CoT's target traversal: ``before``'s objects, then added ones."""
    before_ids = [o["id"] for o in before["objects"]]
    return before_ids + [o["id"] for o in after["objects"] if o["id"] not in set(before_ids)]


def changes_by_id(cot: MetaCoT, before: Scene, after: Scene) -> dict[str, str]:
    """Object id -> how it changes, read back from a Meta-CoT's traversal (changed entries only)."""
    ids = traversal_ids(before, after)
    if len(ids) != len(cot.traversal):
        raise ValueError(f"traversal has {len(cot.traversal)} entries but the scenes have {len(ids)} objects")
    return {i: e.how for i, e in zip(ids, cot.traversal) if e.changed}
