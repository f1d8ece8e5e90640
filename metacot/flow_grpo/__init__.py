"""Stage 2: Flow-GRPO on the denoising steps of a flow-matching editing model.

Modules:
    sde: one stochastic denoising step with the exact Gaussian log-density of its output ("sde" and "cps"
        variants), plus the default PPO clip range that matches each variant's log-ratio scale.
    math: pure RL math (group advantages, clipped policy loss, KL to the reference, window draw, EMA).

This package file stays import-light on purpose (no torch here): `metacot --help` and the CLI dispatch import
it without paying for torch.
"""
