# Two commands from a fresh clone:
#   make demo   installs into .venv, builds the kernels and runs the main job
#   make test   installs into .venv, builds the kernels and runs the whole test suite
# Also: make bench (optimizer step benchmark), make throughput, make benchmark (and
# benchmark-pilot, benchmark-small), make lint,
# make check-arm (the C++ sources compiled for aarch64 with a cross compiler), make
# check-ptxas (the CUDA kernels' registers, no GPU needed), make gpu-check (on a GPU).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# cpp_extension's guess of CUDA_HOME from an nvcc wrapper on PATH can be wrong; with no
# GPU to detect, an explicit architecture list keeps the build to two targets, and +PTX
# lets GPUs newer than Hopper compile the kernels at load time (docs/speed.md).
export CUDA_HOME ?= /usr/local/cuda
export TORCH_CUDA_ARCH_LIST ?= 8.0;9.0+PTX
export MAX_JOBS ?= 2

KERNEL_SOURCES := $(wildcard casmo_ext/csrc/*) setup.py

.PHONY: demo test bench throughput speed-check benchmark benchmark-pilot benchmark-small lint install check-arm check-ptxas gpu-check test-arm

install: $(VENV)/.built $(VENV)/pip.conf

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

# Lets plain `pip install -e .` build in .venv (see venv-pip.conf).
$(VENV)/pip.conf: venv-pip.conf | $(VENV)/.deps
	cp venv-pip.conf $@

# Two workers (pytest-xdist), each on one thread, a test file each at a time (a file's
# runs are shared by its tests). Files start in name order, not largest first, so that
# test_benchmark.py, the longest, starts at once and the rest fills the other worker.
test: install
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=25

# The main job, small: what the benchmark compares, on one seed. The semicircle toy and a
# 750-step DCGAN on the built-in shapes data, each with Adam on both networks (adam_adam)
# and with CASMO on the generator (casmo_adam), two runs at a time; then the figures, among
# them plots/dcgan-shapes/compare_samples.png (the two generators' samples side by side over
# their KID curves), and results.md, which quotes the published grid's seed-to-seed spread:
# one seed is an illustration, not evidence. Each demo writes a new folder.
DEMO := runs/demo-$(shell date +%Y%m%d-%H%M%S)
demo: install
	$(PY) benchmark.py --out $(DEMO) --parts a c --configs adam_adam casmo_adam --toy-seeds 1 --toy-epochs 40 \
		--dcgan-seeds 1 --dcgan-steps 750 --eval-every 250 --eval-samples 500 --g-ema 0 \
		--control-configs --sweep-robustness --dcgan-sweep-robustness
	@echo "demo: samples side by side with their KID in $(DEMO)/plots/dcgan-shapes/compare_samples.png"

bench: install
	$(PY) -m casmo_ext.bench

# Steps/second of the four DCGAN configurations at batch 16 on the built-in shapes
# data (the median over logged steps, in summary.md). Run it alone on the machine.
THROUGHPUT := runs/throughput-$(shell date +%Y%m%d-%H%M%S)
throughput: install
	for config in adam_adam casmo_adam adam_casmo casmo_casmo; do \
		$(PY) train_dcgan.py --dataset shapes --subset 1024 --bs 16 --max-steps 120 --log-every 10 \
			--g-opt $${config%_*} --d-opt $${config#*_} --data-root data --out $(THROUGHPUT)/dcgan-$$config \
			|| exit 1; \
	done
	$(PY) plot_logs.py $(THROUGHPUT) --out $(THROUGHPUT)/plots

# Steps/s of the DCGAN in fp32, channels_last, bf16 and both on this machine, beside what
# --amp auto chooses here (a few minutes where bf16 is emulated). Run it alone; not in CI.
speed-check: install
	$(PY) tools/speed_check.py

# The benchmark's evidence: the grid of docs/benchmark_protocol.md, part by part (a: adam_adam
# and casmo_adam on the shapes DCGAN, 8 seeds, and the step-size control; b: the same under
# the stress setting that benchmark-pilot chose; c: the other configurations, the robustness
# sweeps, the toy), with figures and results.md in runs/benchmark after each part. It prints
# its time estimate first (about 18 hours on 2 cores). Runs with a result are kept and
# interrupted ones resumed, so it can be stopped and started again; ARGS="--publish
# docs/results" publishes each run as it ends and skips those published, here or elsewhere.
# benchmark-small is a quick look; pass more options in ARGS, e.g.
# make benchmark ARGS="--dataset tinyimagenet --dcgan-steps 0 --device cuda".
ARGS ?=
benchmark: install
	$(PY) benchmark.py $(ARGS)

# The stress pilot, before part b: adam_adam under each candidate setting; its choice in
# runs/benchmark/pilot/pilot.json (and the --publish folder's, which the grid reads too).
benchmark-pilot: install
	$(PY) benchmark.py --pilot $(ARGS)

benchmark-small: install
	$(PY) benchmark.py --small $(ARGS)

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

# Every C++ source, type-checked for aarch64 (Grace, Graviton) against the installed
# torch's headers: an x86-only construct outside a guard fails here. .ci/run installs
# the cross compiler (Debian/Ubuntu: apt-get install g++-aarch64-linux-gnu).
ARM_CXX ?= aarch64-linux-gnu-g++
check-arm: $(VENV)/.deps
	@includes="$$($(PY) -c 'import sysconfig; from torch.utils.cpp_extension import include_paths; \
		print(" ".join("-I" + p for p in include_paths() + [sysconfig.get_paths()["include"]]))')" && \
	for source in casmo_ext/csrc/*.cpp; do \
		echo "$(ARM_CXX) -fsyntax-only $$source"; \
		$(ARM_CXX) -std=c++20 -fsyntax-only -Wno-psabi -DTORCH_EXTENSION_NAME=_C $$includes $$source || exit 1; \
	done

# The CUDA kernels compiled alone with nvcc -Xptxas -v for each architecture of
# TORCH_CUDA_ARCH_LIST: fails on a register spill or on more registers per thread than a
# 512-thread block allows (128), which would otherwise fail only at launch on a GPU.
# Needs nvcc, not a GPU; about a minute.
check-ptxas: $(VENV)/.deps
	$(PY) tools/check_ptxas.py

# The GPU acceptance run (docs/speed.md): builds for this machine's GPU, runs
# tests/test_cuda.py, the step benchmark, a compiled and a graphed step and the DCGAN
# throughput, within 8 minutes, and writes runs/gpu-check-<time>/report.md. Without a GPU
# it prints one line and exits with status 2. Any Python with torch can run it:
# make gpu-check PY=python3.
gpu-check:
	$(PY) tools/gpu_check.py

# The NEON build run, not only compiled: the extension cross-compiled for aarch64 and
# tests/test_cpu_kernel.py and tests/test_optimizer.py run on it under qemu's user-mode
# emulation, in a Debian arm64 root that it makes in .arm/ (tools/test_arm.sh says how).
# Needs root and the network to Debian's mirror and PyPI. Not run by CI (its time): about
# 7-15 minutes the first time on 2 cores (the root, a 454 MB torch wheel) (docs/speed.md).
test-arm:
	tools/test_arm.sh
