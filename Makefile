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

.PHONY: install demo test lint format bench-smoke clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip setuptools wheel pybind11
ifeq ($(HAS_GPU),)
	$(BIN)/pip install --quiet $(TORCH_CPU)
endif
	$(BIN)/pip install --quiet --no-build-isolation -e ".[dev]"
	@touch $@

# Until the end-to-end demo lands: the fused-loss benchmark at smoke sizes.
demo: install
	TRITON_INTERPRET=$(INTERPRET) $(BIN)/python bench/fused_loss.py --smoke

test: install
	TRITON_INTERPRET=$(INTERPRET) $(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) build *.egg-info
