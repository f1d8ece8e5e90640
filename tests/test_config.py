"""Config layering (defaults < YAML < key=value) and validation errors."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
from omegaconf import MISSING

from metacot.config import ConfigError, check, load_config, resolve_config_path, to_yaml


@dataclass
class Optim:
    lr: float = 1e-3  # learning rate
    warmup: int = 0


@dataclass
class Example:
    model: str = MISSING  # required path
    batch_size: int = 8
    group_size: int = 4
    optim: Optim = field(default_factory=Optim)

    def __post_init__(self) -> None:
        check(self.batch_size % self.group_size == 0, "batch_size",
              f"must be a multiple of group_size={self.group_size}, or groups are split across steps")


def test_layering_yaml_then_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("model: /m\nbatch_size: 16\noptim:\n  lr: 0.5\n")
    cfg = load_config(Example, path, ["optim.lr=0.25", "optim.warmup=3"])
    assert isinstance(cfg, Example)
    assert (cfg.model, cfg.batch_size, cfg.optim.lr, cfg.optim.warmup) == ("/m", 16, 0.25, 3)


def test_missing_required_value_is_named() -> None:
    with pytest.raises(ConfigError, match=r"model"):
        load_config(Example, None, [])


def test_validation_message_names_key_and_reason() -> None:
    with pytest.raises(ConfigError, match=r"batch_size: must be a multiple of group_size=4"):
        load_config(Example, None, ["model=/m", "batch_size=6"])


def test_unknown_key_and_bad_type_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="optim"):
        load_config(Example, None, ["model=/m", "optim.lrr=1"])
    with pytest.raises(ConfigError):
        load_config(Example, None, ["model=/m", "batch_size=abc"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(Example, None, ["model"])


def test_unknown_preset_lists_presets() -> None:
    with pytest.raises(ConfigError, match="no config file or preset"):
        resolve_config_path("does-not-exist")


def test_resolved_yaml_round_trips(tmp_path: Path) -> None:
    cfg = load_config(Example, None, ["model=/m"])
    (tmp_path / "r.yaml").write_text(to_yaml(cfg))
    again = load_config(Example, tmp_path / "r.yaml", [])
    assert again == cfg


def test_a_value_given_to_a_group_names_the_key(tmp_path: Path) -> None:
    """OmegaConf's own "Merge error" leaves the key out; ours names it, where it came from, and the fix."""
    with pytest.raises(ConfigError, match=r"^optim: is a group of settings.*optim\.<field>=.*override 'optim=8'"):
        load_config(Example, None, ["model=/m", "optim=8"])
    (tmp_path / "c.yaml").write_text("model: /m\noptim:\n  lr: fast\n")
    with pytest.raises(ConfigError, match=r"^optim\.lr: .*c\.yaml\]$"):
        load_config(Example, tmp_path / "c.yaml", [])
