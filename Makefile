# metacot: the two commands of a fresh machine are `make quickstart` and `make test`.
# Each creates (or reuses) its virtual environments outside the clone, keyed by a hash of what they install,
# so repeated runs do not reinstall. METACOT_CACHE moves the cache (default ~/.cache/metacot).

SHELL := /bin/bash
PYTHON ?= python3
METACOT_CACHE ?= $(HOME)/.cache/metacot
export METACOT_CACHE

# Hash of the dependency pins only (editing pytest markers or metadata does not rebuild the venv).
DEPS_HASH := $(shell $(PYTHON) -c "import tomllib,hashlib,json;p=tomllib.load(open('pyproject.toml','rb'))['project'];print(hashlib.sha256(json.dumps([p['dependencies'],p.get('optional-dependencies',{})],sort_keys=True).encode()).hexdigest()[:12])")
VENV := $(METACOT_CACHE)/venvs/core-$(DEPS_HASH)
VLLM_HASH := $(shell sha256sum launch/vllm_env.sh 2>/dev/null | cut -c1-12)
VLLM_VENV := $(METACOT_CACHE)/venvs/vllm-$(VLLM_HASH)
PY := $(VENV)/bin/python
# DeepSpeed JIT-compiles a small CPU op; a folder per venv avoids recompiling it whenever another venv used it last.
export TORCH_EXTENSIONS_DIR ?= $(VENV)/torch_extensions

.PHONY: quickstart test venv vllm-env system-deps clean-venvs

# The venv is cached outside the clone and may serve several clones: the code always comes from THIS clone through
# PYTHONPATH (ahead of the editable install, which only provides the `metacot` console script).
export PYTHONPATH := $(CURDIR)$(if $(PYTHONPATH),:$(PYTHONPATH))

venv: $(VENV)/.installed

$(VENV)/.installed:
	@echo ">> creating $(VENV) (one-time: torch, diffusers, transformers, deepspeed, ...; a few minutes)"
	@rm -rf $(VENV) && $(PYTHON) -m venv $(VENV)
	@$(VENV)/bin/pip install -q --upgrade pip setuptools wheel 2>&1 | grep -v "^WARNING: Location" || true
	@set -o pipefail; DS_BUILD_OPS=0 $(VENV)/bin/pip install -q -e '.[train,test]' 2>&1 | grep -v "^WARNING: Location" || exit 1
	@touch $@

vllm-env:
	@bash launch/vllm_env.sh $(VLLM_VENV)

# Debian packages the tests use: a real one-node SLURM cluster, headless Chromium, and a C++ compiler (DeepSpeed's
# CPU Adam op and torch.compile's CPU code generation).
system-deps:
	@missing=""; \
	for cmd in slurmctld:slurmctld slurmd:slurmd sbatch:slurm-client munged:munge chromium:chromium g++:g++; do \
		command -v $${cmd%%:*} >/dev/null || missing="$$missing $${cmd##*:}"; done; \
	if [ -n "$$missing" ]; then echo ">> apt-get install$$missing"; \
		apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; fi

quickstart: venv
	@HF_HUB_OFFLINE=1 $(VENV)/bin/metacot quickstart --out runs/quickstart

# Two pytest-xdist workers (the tests use one torch thread each; tests/conftest.py keeps each shared server on one
# worker). TEST_WORKERS=0 runs them in this process, one by one.
TEST_WORKERS ?= 2
test: venv vllm-env system-deps
	@HF_HUB_OFFLINE=1 METACOT_VLLM_PYTHON=$(VLLM_VENV)/bin/python $(PY) -m pytest -q -n $(TEST_WORKERS) \
		--dist loadgroup $(PYTEST_ARGS)

clean-venvs:
	rm -rf $(METACOT_CACHE)/venvs
