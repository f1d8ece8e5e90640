"""Structured configs: dataclass schemas layered as defaults < YAML file < ``key=value`` overrides.

Every stage declares its config as dataclasses (fields documented where they are declared) and loads it with
:func:`load_config`. Validation lives in each dataclass's ``__post_init__`` and raises :class:`ConfigError`
naming the key and what to change; it runs once, when the layered config is turned into the dataclass.
Required values are ``???`` (OmegaConf's MISSING): a run that leaves one unset fails at start, not at step 5,000.

Presets ship in ``metacot/configs/``: ``--config tiny`` resolves to ``metacot/configs/<stage>_tiny.yaml``
when the stage names its preset prefix, or to any ``metacot/configs/<name>.yaml``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

PRESET_DIR = Path(__file__).parent / "configs"

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value is missing, mistyped or inconsistent. The message says which key and how to fix it."""


def resolve_config_path(name_or_path: str | Path, stage: str | None = None) -> Path:
    """Find a config file given a path or a preset name.

    Args:
        name_or_path: a YAML path, or a preset name such as ``tiny`` or ``sft_tiny``.
        stage: the stage prefix tried first for bare preset names (``tiny`` -> ``sft_tiny.yaml``).

    Raises:
        ConfigError: nothing matches; the message lists the presets that exist.
    """
    path = Path(name_or_path)
    if path.suffix in {".yaml", ".yml"} or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; pass an existing YAML file or a preset name")
        return path
    candidates = [f"{stage}_{name_or_path}.yaml"] if stage else []
    candidates.append(f"{name_or_path}.yaml")
    for candidate in candidates:
        if (PRESET_DIR / candidate).is_file():
            return PRESET_DIR / candidate
    presets = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
    raise ConfigError(f"no config file or preset named {str(name_or_path)!r}; presets: {', '.join(presets)}")


def load_config(
    schema: type[T],
    config: str | Path | None = None,
    overrides: Sequence[str] = (),
    stage: str | None = None,
) -> T:
    """Layer defaults < YAML < overrides onto ``schema`` and return a validated dataclass instance.

    Args:
        schema: the stage's config dataclass.
        config: a YAML path or preset name (see :func:`resolve_config_path`), or None for defaults only.
        overrides: ``key=value`` strings in dotted OmegaConf syntax, e.g. ``train.lr=1e-4``.
        stage: preset prefix for bare preset names.

    Returns:
        An instance of ``schema`` whose ``__post_init__`` validation has run.

    Raises:
        ConfigError: unknown keys, wrong types, missing required (``???``) values or failed validation.
    """
    try:
        merged = OmegaConf.structured(schema)
        if config is not None:
            path = resolve_config_path(config, stage)
            merged = _merge(merged, OmegaConf.load(path), str(path))
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} is not key=value; write e.g. train.lr=1e-4")
            merged = _merge(merged, OmegaConf.from_dotlist([item]), f"override {item!r}")
        missing = sorted(_missing_keys(merged))
        if missing:
            raise ConfigError(
                f"required config values are unset (???): {', '.join(missing)}; set them in the YAML file "
                f"or on the command line as key=value"
            )
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        raise ConfigError(_describe(exc, getattr(exc, "full_key", None), "config")) from exc


def _merge(base: DictConfig, layer: DictConfig, source: str) -> DictConfig:
    """``OmegaConf.merge`` whose errors name the key (OmegaConf leaves it out when a group gets a plain value)."""
    try:
        return OmegaConf.merge(base, layer)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or _failing_key(base, OmegaConf.to_container(layer), "")
        raise ConfigError(_describe(exc, key, source, base)) from exc


def _failing_key(base: DictConfig, layer: dict[str, Any], prefix: str) -> str | None:
    """The deepest key of ``layer`` whose merge into ``base`` fails."""
    for key, value in layer.items():
        nested: Any = value
        for part in reversed(f"{prefix}{key}".split(".")):
            nested = {part: nested}
        try:
            OmegaConf.merge(base, nested)
        except OmegaConfBaseException:
            deeper = _failing_key(base, value, f"{prefix}{key}.") if isinstance(value, dict) else None
            return deeper or f"{prefix}{key}"
    return None


def _describe(exc: OmegaConfBaseException, key: str | None, source: str, base: DictConfig | None = None) -> str:
    """One line: the key, what is wrong, and how to fix it."""
    reason = str(getattr(exc, "msg", None) or exc).splitlines()[0]
    group = key is not None and base is not None and \
        isinstance(OmegaConf.select(base, key, throw_on_missing=False), DictConfig)
    if group:
        return (f"{key}: is a group of settings, not a single value ({reason}); set its fields instead, e.g. "
                f"{key}.<field>=... (--print-config lists them) [{source}]")
    return f"{key or 'config'}: {reason}; check the key name and the value's type [{source}]"


def _missing_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    out: list[str] = []
    for key in cfg.keys():
        full = f"{prefix}{key}"
        if OmegaConf.is_missing(cfg, key):
            out.append(full)
            continue
        value = cfg._get_node(key)
        if isinstance(value, DictConfig):
            out.extend(_missing_keys(value, full + "."))
    return out


def to_yaml(cfg: Any) -> str:
    """Render a config dataclass (or DictConfig) as YAML, interpolations resolved."""
    node = cfg if isinstance(cfg, DictConfig) else OmegaConf.structured(cfg)
    return OmegaConf.to_yaml(node, resolve=True)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a config dataclass, for wandb and JSON reports."""
    if dataclasses.is_dataclass(cfg):
        return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def check(condition: bool, key: str, message: str) -> None:
    """Raise :class:`ConfigError` for ``key`` unless ``condition`` holds. Used by ``__post_init__`` validators."""
    if not condition:
        raise ConfigError(f"{key}: {message}")
