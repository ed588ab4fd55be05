# One-command set-up on a fresh machine: every target below creates the environment it needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of PyTorch this project is developed against; a machine with a CUDA build of
# torch already importable in $(VENV) keeps it.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.nio_fast-installed
PYTEST_ARGS ?=

.PHONY: all install demo test test-fast bench gpu-check cuda-check clean

all: test

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Reinstall (and rebuild the extension) whenever the build inputs change.
$(STAMP): $(BIN)/python setup.py $(wildcard csrc/*)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet ninja pybind11 numpy
	$(BIN)/python -m pip install --quiet --no-build-isolation -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/nio-fast demo

# Compile-check every CUDA source with nvcc where nvcc exists: a CUDA syntax error fails here,
# on a machine without a GPU.
cuda-check:
	@if command -v nvcc >/dev/null 2>&1; then \
		for source in csrc/*.cu; do \
			[ -e "$$source" ] || continue; \
			echo "nvcc -c $$source"; \
			nvcc -std=c++17 -O2 -c "$$source" -o /tmp/nio_fast_cuda_check.o || exit 1; \
		done; \
	else echo "nvcc not found: CUDA sources not compile-checked"; fi

test: $(STAMP) cuda-check
	@$(BIN)/python -m pytest -q $(PYTEST_ARGS); status=$$?; \
	if [ $$status -eq 5 ]; then echo "pytest collected no tests: failing on purpose"; exit 1; fi; \
	exit $$status

bench: $(STAMP)
	$(BIN)/python -m pytest benchmarks -q -p no:cacheprovider

# On a GPU machine (no network there): the system's CUDA build of torch, no .venv; the script
# builds the extension in place itself.
gpu-check:
	$(PYTHON) benchmarks/gpu_check.py

clean:
	rm -rf build *.egg-info nio_fast/_C*.so .pytest_cache .benchmarks
