"""Experiments built from the library's stages: ``ablation`` (the Meta-CoT paper's ablation in miniature)."""
