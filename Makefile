# Two commands from a fresh clone:
#   make demo   installs into .venv, builds the kernels and runs the main job
#   make test   installs into .venv, builds the kernels and runs the whole test suite
# Also: make bench (optimizer step benchmark), make lint.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# cpp_extension's guess of CUDA_HOME from an nvcc wrapper on PATH can be wrong; with no
# GPU to detect, an explicit architecture list keeps the build to two targets.
export CUDA_HOME ?= /usr/local/cuda
export TORCH_CUDA_ARCH_LIST ?= 8.0;9.0
export MAX_JOBS ?= 2

KERNEL_SOURCES := $(wildcard casmo_ext/csrc/*) setup.py

.PHONY: demo test bench lint install

install: $(VENV)/.built

$(VENV)/.deps: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

# torch is needed at build time, hence --no-build-isolation.
$(VENV)/.built: $(VENV)/.deps $(KERNEL_SOURCES)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PY) -c "import casmo_ext; print('casmo_ext build:', casmo_ext.build_info())"
	touch $@

test: install
	$(PY) -m pytest -q

demo: install
	$(PY) -c "print('demo: not yet wired')"

bench: install
	$(PY) -m casmo_ext.bench

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
