# Two commands for a newcomer: `make demo` and `make test`. Both install into .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test-deps demo study test lint clean gpu-check

$(PY):
	$(PYTHON) -m venv $(VENV)

# The install runs when what it depends on changed since the last one (the stamp): the package metadata, the
# build script and the extension's sources (the Python code is installed editable: no reinstall for it).
# triton 3.6.0: the Triton of the GPU image (torch 2.11 + CUDA 13); the tests compile the kernels for sm_90 with it
# and run them in its interpreter, which turns 1-element arrays into ints (an error from NumPy 2.4 on): numpy < 2.4
STAMP := $(VENV)/.install-stamp
install: $(STAMP)

$(STAMP): pyproject.toml setup.py vgs_kernels/_cuda_home.py $(wildcard csrc/*) | $(PY)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	@$(PY) -c "import triton, numpy, sys; sys.exit(triton.__version__ != '3.6.0' or \
		tuple(map(int, numpy.__version__.split('.')[:2])) >= (2, 4))" \
		2>/dev/null || $(PY) -m pip install -q "triton==3.6.0" "numpy<2.4"
	$(PY) -m pip install -q "setuptools>=64" wheel
	# --no-build-isolation: compile vgs_kernels._C against the torch installed above
	$(PY) -m pip install -q --no-build-isolation -e ".[train,bench,dev,trl]"
	@touch $@

demo: install
	$(PY) -m vgs_train.tools.demo

# What the demo's comparison supports: every arm on 8 seeds under the machine's own instruction set and under
# emulated AVX2 (about 1.7 h on 2 cores; each run's result is cached in runs/study, a rerun adds what is missing)
study: install
	$(PY) -m vgs_train.tools.study --readme README.md

# verl for the adapter's and the recipe's tests (tests/kernels/integrations/test_verl.py, tests/train/integrations/
# test_verl_recipe.py: verl's own agg_loss / distillation_loss, its engine registry): the package without its
# dependencies (verl 0.9 pins transformers<5.11 and pulls ray[default], wandb, CUDA extras) plus what importing
# its loss and FSDP-engine code needs (peft for the engine), pinned to the versions the tests ran with; none of
# them touches torch.
# deepspeed (the `deepspeed` extra) for the ZeRO-3 case of tests/train/test_distributed.py: an sdist whose
# build imports torch, so --no-build-isolation builds it against the CPU torch above (an isolated build would
# fetch a CUDA torch); no op is compiled at install. Only the tests need them: `make demo` does not install them.
test-deps: install
	@$(PY) -m pip show -q verl >/dev/null 2>&1 || { $(PY) -m pip install -q --no-deps "verl==0.9.1" && \
		$(PY) -m pip install -q "ray==2.60.0" "tensordict==0.10.0" "omegaconf==2.4.0" "codetiming==1.4.0" \
		"peft==0.21.2"; }
	@$(PY) -m pip show -q deepspeed >/dev/null 2>&1 || $(PY) -m pip install -q --no-build-isolation "deepspeed==0.19.8"

test: test-deps
	$(PY) -m pytest -q tests

# On a GPU machine with torch (CUDA), triton and nvcc installed (no network, no .venv): build the
# extension there, CUDA tests, kernel / row-kernel / step benchmarks, README tables; <= 8 minutes.
GPU_PYTHON ?= python3
gpu-check:
	$(GPU_PYTHON) -m benchmarks.gpu_check

lint: install
	$(PY) -m ruff check vgs_kernels vgs_train tests benchmarks

clean:
	rm -rf build *.egg-info vgs_kernels/_C*.so vgs_kernels/_C_build.txt $(STAMP)
