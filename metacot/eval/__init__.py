"""Evaluation against ground truth and baselines (see :mod:`metacot.eval.runner`)."""
