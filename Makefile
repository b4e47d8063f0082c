# Two commands for a newcomer: `make demo` (the main job on the embedded data) and `make test`.
# Each creates .venv and installs what it needs on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1

# pyproject.toml says which versions are supported; constraints.txt pins the ones the tests run on.
$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	touch $@

.PHONY: install demo test bench gpu-check
install: $(VENV)/.installed

demo: $(VENV)/.installed
	bash launch/demo.sh

test: $(VENV)/.installed
	$(PY) -m ruff check mimtrain tests
	$(PY) -m pytest -q

# The CPU demo's tiny ViT under MAE and SimMIM (docs/benchmarks.md, "make bench"); about a minute on a laptop CPU.
bench: $(VENV)/.installed
	$(PY) -m mimtrain bench

# One GPU slot (one H100/H200, <= 600 s of commands after the install): parts a-f of docs/benchmarks.md's GPU section,
# each under its own cap; `bash launch/gpu_check.sh --dry-run` prints the plan. It installs .venv itself.
gpu-check:
	bash launch/gpu_check.sh
