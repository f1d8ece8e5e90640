"""The reward contract, defined once for every reward in metacot.

A reward is a plain callable ``reward(batch: RewardBatch) -> list[float | None]``: one entry per sample, ``None``
meaning "no score for this sample" (a judge reply without a score, say). A ``None`` sample drops out of its group's
statistics in Flow-GRPO; it is never replaced by 0 or a neutral value, which would quietly bias the advantages.
Each reward documents its scale in its docstring and in a ``scale`` attribute ``(low, high)``.

Rewards are named in configs either by a short built-in name (:data:`BUILTIN`) or a dotted import path
(``package.module:attr`` or ``package.module.attr``). A class is instantiated with the keyword arguments given in the
config; a function is used as is. :class:`WeightedReward` combines several with weights.
"""

from __future__ import annotations

import importlib
import inspect
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

    from metacot.cot import MetaCoT


@dataclass
class RewardBatch:
    """What every reward receives.

    Attributes:
        source_images: the unedited inputs, PIL RGB.
        edited_images: the model's outputs, PIL RGB, same length.
        instructions: the editing instructions.
        cots: the Meta-CoTs the edits were conditioned on: a ``MetaCoT``, the raw text of a model-written CoT that
            did not parse (judges that need a parsed CoT return None for it), or None where a sample has none.
        extras: further per-sample columns by name (e.g. ``ids``, ``categories``, ``target_images``,
            ``scene_before``, ``scene_after``); each a list of the batch's length.
    """

    source_images: Sequence["Image.Image"]
    edited_images: Sequence["Image.Image"]
    instructions: Sequence[str]
    cots: Sequence["MetaCoT | str | None"]
    extras: dict[str, Sequence[Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.edited_images)
        lengths = {
            "source_images": len(self.source_images),
            "instructions": len(self.instructions),
            "cots": len(self.cots),
            **{f"extras[{k!r}]": len(v) for k, v in self.extras.items()},
        }
        wrong = {k: v for k, v in lengths.items() if v != n}
        if wrong:
            raise ValueError(f"RewardBatch columns must all have {n} entries (edited_images); got {wrong}")

    def __len__(self) -> int:
        return len(self.edited_images)


RewardFn = Callable[[RewardBatch], list[float | None]]

# Short names for the rewards that ship with metacot.
BUILTIN: dict[str, str] = {
    "brightness": "rewards.simple:brightness",
    "target_similarity": "rewards.simple:target_similarity",
    "cec_rule": "rewards.rule_judge:CECRuleJudge",
    "cec_vlm": "rewards.cec:CECJudge",
}


def import_object(path: str) -> Any:
    """Import ``package.module:attr`` or ``package.module.attr``.

    Raises:
        ImportError: the module or attribute does not exist; the message shows what was tried.
    """
    if ":" in path:
        module_name, attr = path.split(":", 1)
    else:
        module_name, _, attr = path.rpartition(".")
    if not module_name:
        raise ImportError(f"{path!r} is not a dotted import path; write package.module:name")
    module = importlib.import_module(module_name)
    try:
        return getattr(module, attr)
    except AttributeError as exc:
        raise ImportError(f"module {module_name!r} has no attribute {attr!r} (from {path!r})") from exc


class RewardSpecError(ValueError):
    """A reward named in a config cannot be built as given; the message names the config key and the fix."""


def resolve_reward(spec: str) -> Any:
    """The class or function a reward spec (built-in name or dotted path) names.

    Raises:
        RewardSpecError: the name is neither built in nor importable.
    """
    try:
        return import_object(BUILTIN.get(spec, spec))
    except ImportError as exc:
        raise RewardSpecError(
            f"unknown reward {spec!r}: not a built-in ({', '.join(sorted(BUILTIN))}) and not importable ({exc})"
        ) from exc


def check_reward_options(spec: str, kwargs: Mapping[str, Any], key: str = "rewards") -> Any:
    """Check ``kwargs`` against the real signature of the reward ``spec`` names, without building it; returns it.

    Raises:
        RewardSpecError: unknown or missing options (naming ``key``, the option and the accepted ones), options for
            a plain function, or an object that is not callable.
    """
    obj = resolve_reward(spec)
    if not isinstance(obj, type):
        if not callable(obj):
            raise RewardSpecError(f"{key}: reward {spec!r} resolved to {type(obj).__name__}, which is not callable")
        if kwargs:
            raise RewardSpecError(f"{key}: reward {spec!r} is a function and takes no options; remove "
                                  f"{', '.join(sorted(kwargs))}")
        return obj
    params = inspect.signature(obj).parameters
    accepted = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(kwargs) - set(accepted))
        if unknown:
            raise RewardSpecError(f"{key}.{unknown[0]}: not an option of {spec!r} ({obj.__module__}:{obj.__name__}); "
                                  f"it accepts {', '.join(accepted)} (plus weight and fn)")
    missing = [n for n in accepted if params[n].default is inspect.Parameter.empty and n not in kwargs]
    if missing:
        raise RewardSpecError(f"{key}: reward {spec!r} needs {', '.join(missing)}; set {key}.{missing[0]}=...")
    return obj


def build_reward(spec: str, **kwargs: Any) -> RewardFn:
    """Resolve a reward by built-in name or dotted path; instantiate classes with ``kwargs``.

    Raises:
        RewardSpecError: the name is neither built in nor importable, options that its signature does not take, or
            options for a plain function.
    """
    return _build(spec, kwargs, f"reward {spec!r}")


def _build(spec: str, kwargs: dict[str, Any], key: str) -> RewardFn:
    obj = check_reward_options(spec, kwargs, key)
    return obj(**kwargs) if isinstance(obj, type) else obj


class WeightedReward:
    """Weighted sum of several rewards: ``total = sum_i w_i * r_i``.

    A sample is ``None`` in the total when any component with non-zero weight gave ``None`` for it: a partial sum
    would be on a different scale than its group's other samples.

    Args:
        components: name -> (reward callable, weight).
    """

    def __init__(self, components: Mapping[str, tuple[RewardFn, float]]) -> None:
        if not components:
            raise ValueError("WeightedReward needs at least one component reward")
        self.components = dict(components)

    def __call__(self, batch: RewardBatch) -> list[float | None]:
        return self.score(batch)[0]

    def score(self, batch: RewardBatch) -> tuple[list[float | None], dict[str, list[float | None]]]:
        """Return (total per sample, per-component scores per sample)."""
        parts: dict[str, list[float | None]] = {}
        for name, (fn, _) in self.components.items():
            values = list(fn(batch))
            if len(values) != len(batch):
                raise ValueError(f"reward {name!r} returned {len(values)} scores for a batch of {len(batch)}")
            for v in values:
                if v is not None and not math.isfinite(float(v)):
                    raise ValueError(f"reward {name!r} returned a non-finite score {v}; return None for no score")
            parts[name] = [None if v is None else float(v) for v in values]
        total: list[float | None] = []
        for i in range(len(batch)):
            acc = 0.0
            for name, (_, weight) in self.components.items():
                v = parts[name][i]
                if weight == 0:
                    continue
                if v is None:
                    acc = math.nan
                    break
                acc += weight * v
            total.append(None if math.isnan(acc) else acc)
        return total, parts


def build_weighted_reward(specs: Mapping[str, Mapping[str, Any]]) -> WeightedReward:
    """Build a :class:`WeightedReward` from config: ``{name: {"weight": w, "fn": spec, **kwargs}}``.

    ``fn`` defaults to the component's name, so ``{"brightness": {"weight": 1.0}}`` is enough.
    """
    components = {}
    for name, opts in specs.items():
        weight, fn_spec, kwargs = split_spec(name, opts)
        components[name] = (_build(fn_spec, kwargs, f"rewards.{name}"), weight)
    return WeightedReward(components)


def split_spec(name: str, opts: Mapping[str, Any] | None) -> tuple[float, str, dict[str, Any]]:
    """``(weight, fn, constructor kwargs)`` of one config component ``rewards.<name>``.

    Raises:
        RewardSpecError: the weight is not a number, or ``fn`` is not a string.
    """
    kwargs = dict(opts or {})
    weight, fn_spec = kwargs.pop("weight", 1.0), kwargs.pop("fn", name)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise RewardSpecError(f"rewards.{name}.weight: {weight!r} is not a number; write e.g. "
                              f"rewards.{name}.weight=1.0")
    if not isinstance(fn_spec, str):
        raise RewardSpecError(f"rewards.{name}.fn: {fn_spec!r} is not a name; write a built-in name "
                              f"({', '.join(sorted(BUILTIN))}) or a dotted path package.module:attr")
    return float(weight), fn_spec, kwargs


def check_reward_specs(specs: Mapping[str, Mapping[str, Any] | None]) -> None:
    """Check every component of a ``rewards`` config against its reward's real signature, building nothing.

    Raises:
        RewardSpecError: naming the first wrong key and the accepted ones.
    """
    for name, opts in specs.items():
        _, fn_spec, kwargs = split_spec(name, opts)
        check_reward_options(fn_spec, kwargs, key=f"rewards.{name}")
