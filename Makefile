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

.PHONY: install demo test bench
install: $(VENV)/.installed

demo: $(VENV)/.installed
	bash launch/demo.sh

test: $(VENV)/.installed
	$(PY) -m ruff check mimtrain tests
	$(PY) -m pytest -q

# The CPU demo's tiny ViT under MAE and SimMIM (docs/benchmarks.md, "make bench"); about a minute on a laptop CPU.
bench: $(VENV)/.installed
	$(PY) -m mimtrain bench
