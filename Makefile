# Two entry points used by README.md and .ci/run: `make run` and `make test` (plus `make test-slow`, `make soak`).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH_CPU_VERSION ?= 2.13.0

.PHONY: setup run test test-slow soak bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# Without CUDA, install the CPU wheel of torch first so the dependency resolver never pulls a CUDA build.
	@if command -v nvidia-smi >/dev/null 2>&1; then \
		echo "CUDA driver found: installing torch from the default index"; \
	else \
		echo "no CUDA: installing the CPU build torch==$(TORCH_CPU_VERSION)"; \
		$(PY) -m pip install -q "torch==$(TORCH_CPU_VERSION)"; \
	fi
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

run: setup
	$(VENV)/bin/sparsedial serve

test: setup
	$(PY) -m pytest -q -m "not slow"

test-slow: setup  # the long tests (a 60 s soak of the server), kept out of `make test` and CI
	$(PY) -m pytest -q -m slow

soak: setup  # 64 clients for 60 s against an in-process server; prints the counts (docs/reliability.md)
	$(PY) benchmarks/soak.py --seconds 60 --clients 64

clean:
	rm -rf $(VENV) build *.egg-info
