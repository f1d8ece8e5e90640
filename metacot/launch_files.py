"""Where metacot's launch files are: the repository's ``launch/`` (SLURM templates, DeepSpeed and accelerate
configs, the vLLM environment script), shipped inside the package as ``metacot/_launch``: a link to ``../launch``
in the source tree, real files in a wheel. So an installed metacot (``pip install metacot-*.whl``, no repository)
renders SLURM jobs and finds its DeepSpeed configs the same way a checkout does."""

from __future__ import annotations

from pathlib import Path

LAUNCH_DIR = Path(__file__).resolve().parent / "_launch"
