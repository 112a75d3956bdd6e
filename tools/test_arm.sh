#!/usr/bin/env bash
# make test-arm: the extension cross-compiled for aarch64 and its CPU kernel tests
# (tests/test_cpu_kernel.py, tests/test_optimizer.py) run on the NEON build under qemu's
# user-mode emulation, on an x86-64 Debian or Ubuntu machine. Needs root (debootstrap,
# chroot, mounts in a private mount namespace) and the network to Debian's mirror and PyPI.
#
# Everything lives in .arm/ (ignored by git), made on the first run and reused after:
#   .arm/root        a Debian bookworm arm64 root (debootstrap): python3.11 and its headers
#   .arm/wheels      the aarch64 wheels: torch, numpy, pytest at requirements.txt's pins
#   .arm/root/opt/site        those wheels installed (pip --target, on the host)
#   .arm/root/opt/cuda-stubs  stub CUDA libraries: PyPI's aarch64 torch is a CUDA build
#                             (tools/arm_cuda_stubs.py says why and how)
#   .arm/src         a copy of the working tree, where the extension is built in place
# The build: setup.py runs under the emulated Python (so torch, the Python headers and
# the extension suffix are aarch64's, and setup.py compiles only the DEFAULT variant,
# at::vec's NEON code), with Debian's x86-64 cross compiler, which runs natively: its
# files are bind-mounted into the root for the build only.
# Options (environment): ARM_DIR (default .arm), ARM_MIRROR (a Debian mirror), PYTHON (a
# host Python with pip, default python3), PYTEST_ARGS (extra pytest arguments).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
ARM=$(realpath -m "${ARM_DIR:-.arm}")
ROOT=$ARM/root
SUITE=bookworm # its python3 is 3.11, as torch's cp311 aarch64 wheel
MIRROR=${ARM_MIRROR:-http://deb.debian.org/debian}
PYTHON=${PYTHON:-python3}
start=$SECONDS

say() { printf '\n== test-arm: %s (%ds)\n' "$*" "$((SECONDS - start))"; }
die() {
  echo "test-arm: $*" >&2
  exit 1
}

[ "$(id -u)" = 0 ] || die "needs root (debootstrap, chroot and mounts): run it with sudo"
[ "$(uname -m)" = x86_64 ] || die "written for an x86-64 host (on aarch64, run make test)"
# The cross compiler's x86-64 libraries are taken from /usr/lib/x86_64-linux-gnu alone.
[ "$(realpath /lib)" = /usr/lib ] || die "written for a merged-/usr host (Debian 12, Ubuntu 22.04 or later)"
"$PYTHON" -m pip --version >/dev/null 2>&1 ||
  die "needs a Python with pip to fetch the aarch64 wheels: set PYTHON (e.g. PYTHON=.venv/bin/python)"

# --- host tools -------------------------------------------------------------------
missing=()
command -v debootstrap >/dev/null || missing+=(debootstrap)
command -v qemu-aarch64-static >/dev/null || missing+=(qemu-user-static)
command -v aarch64-linux-gnu-g++ >/dev/null || missing+=(g++-aarch64-linux-gnu)
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq "${missing[@]}" >/dev/null ||
    { apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null; }
fi
# The kernel runs aarch64 programs through qemu once binfmt_misc knows them; the F flag
# (loaded at registration) lets it do so inside the chroot too.
binfmt=/proc/sys/fs/binfmt_misc
[ -e $binfmt/register ] || mount -t binfmt_misc binfmt_misc $binfmt
if [ ! -e $binfmt/qemu-aarch64 ]; then
  update-binfmts --enable qemu-aarch64 2>/dev/null || cat /usr/lib/binfmt.d/qemu-aarch64.conf >$binfmt/register
fi
grep -q '^enabled' $binfmt/qemu-aarch64 || echo 1 >$binfmt/qemu-aarch64
grep -q '^flags: .*F' $binfmt/qemu-aarch64 || die "binfmt qemu-aarch64 is registered without the F flag"

# --- the arm64 root ---------------------------------------------------------------
if [ ! -e "$ROOT/.debootstrap-done" ]; then
  say "debootstrap --arch arm64 $SUITE into $ROOT (a few minutes)"
  rm -rf "$ROOT"
  mkdir -p "$ARM"
  nice debootstrap --arch=arm64 --variant=minbase --include=python3.11-dev,libgomp1 \
    "$SUITE" "$ROOT" "$MIRROR" >"$ARM/debootstrap.log" 2>&1 ||
    die "debootstrap failed: see $ARM/debootstrap.log"
  touch "$ROOT/.debootstrap-done"
fi
# Where the build finds the host's x86-64 cross compiler: its /usr/bin, /usr/lib/gcc-cross
# and /usr/aarch64-linux-gnu under /opt/cross/usr (gcc finds its parts relative to
# itself), its x86-64 libraries and loader where an x86-64 program looks for them.
CROSS_BINDS=(/usr/bin:/opt/cross/usr/bin /usr/lib/gcc-cross:/opt/cross/usr/lib/gcc-cross
  /usr/aarch64-linux-gnu:/opt/cross/usr/aarch64-linux-gnu /usr/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu)
for bind in "${CROSS_BINDS[@]}"; do mkdir -p "$ROOT${bind#*:}"; done
mkdir -p "$ROOT/src"
ln -sfn usr/lib/x86_64-linux-gnu "$ROOT/lib64"
ln -sfn /opt/cross/usr/aarch64-linux-gnu "$ROOT/usr/aarch64-linux-gnu" # libc.so names it
for tool in /usr/bin/aarch64-linux-gnu-*; do
  ln -sfn "/opt/cross$tool" "$ROOT$tool"
done

# --- aarch64 wheels -----------------------------------------------------------------
pin() { grep -E "^$1==" requirements.txt || die "requirements.txt pins no $1"; }
# torch without its dependencies: on aarch64 they include the CUDA libraries (gigabytes),
# which the stubs stand in for; its other dependencies are listed here instead.
PACKAGES=("$(pin torch)" "$(pin numpy)" "$(pin pytest)" filelock "typing-extensions>=4.10.0"
  "setuptools>=77.0.3" "sympy>=1.13.3" "networkx>=2.5.1" jinja2 "fsspec>=0.8.5")
PLATFORM=(--platform manylinux_2_28_aarch64 --platform manylinux_2_17_aarch64 --platform manylinux2014_aarch64
  --only-binary=:all: --python-version 3.11 --implementation cp --abi cp311)
SITE=$ROOT/opt/site
if [ "$(cat "$SITE/.packages" 2>/dev/null)" != "${PACKAGES[*]}" ]; then
  say "downloading and installing the aarch64 wheels (torch: 454 MB)"
  mkdir -p "$ARM/wheels"
  nice "$PYTHON" -m pip download -qq -d "$ARM/wheels" "${PLATFORM[@]}" --no-deps "${PACKAGES[0]}"
  nice "$PYTHON" -m pip download -qq -d "$ARM/wheels" "${PLATFORM[@]}" "${PACKAGES[@]:1}"
  rm -rf "$SITE" "$ROOT/opt/cuda-stubs"
  local_install() { nice "$PYTHON" -m pip install -qq --no-index --find-links "$ARM/wheels" --no-compile --root-user-action=ignore \
    --target "$SITE" "${PLATFORM[@]}" "$@"; }
  local_install --no-deps "${PACKAGES[0]}"
  local_install "${PACKAGES[@]:1}"
  echo "${PACKAGES[*]}" >"$SITE/.packages"
fi
if [ ! -e "$ROOT/opt/cuda-stubs/.done" ]; then
  say "stub CUDA libraries for torch's aarch64 CUDA build"
  "$PYTHON" tools/arm_cuda_stubs.py "$SITE" "$ROOT/usr/lib/aarch64-linux-gnu" "$ROOT/opt/cuda-stubs"
  touch "$ROOT/opt/cuda-stubs/.done"
fi

# --- the working tree, copied --------------------------------------------------------
mkdir -p "$ARM/src"
git ls-files -z --cached --others --exclude-standard |
  tar --null -T - --ignore-failed-read -cf - 2>/dev/null | tar -C "$ARM/src" -xf -

# The emulated CPU: qemu's Neoverse N1 (Graviton2: NEON, no SVE, so torch runs its DEFAULT
# capability), described to the CPU probes in torch's libraries by a /proc/cpuinfo and a
# /sys CPU tree of its own. qemu 7.2 passes the host's /proc/cpuinfo through: cpuinfo,
# reading this x86 machine's CPUs there and in /sys, crashed
# torch.backends.cpu.get_cpu_capability(); with no /sys, torch's float16 conversions
# fail ("Failed to initialize cpuinfo!"). The tree has no "present" list: with one, the
# Arm Compute Library's probe tried millions of cpuN/regs/identification/midr_el1 names
# at every torch import (4 minutes); without it, cpuinfo says once per process that it
# cannot parse that list, and uses "possible".
QEMU_CPU=neoverse-n1
CPUS=$(nproc)
sys_cpu=$ARM/cpu/sys/devices/system/cpu
rm -rf "$ARM/cpu"
mkdir -p "$sys_cpu"
for list in possible online; do echo "0-$((CPUS - 1))" >"$sys_cpu/$list"; done
for ((cpu = 0; cpu < CPUS; cpu++)); do
  mkdir -p "$sys_cpu/cpu$cpu/regs/identification"
  echo 0x00000000414fd0c1 >"$sys_cpu/cpu$cpu/regs/identification/midr_el1"
done
for ((cpu = 0; cpu < CPUS; cpu++)); do
  printf 'processor\t: %d\nBogoMIPS\t: 50.00\nFeatures\t: %s\nCPU implementer\t: 0x41\nCPU architecture: 8\n' \
    $cpu "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp ssbs"
  printf 'CPU variant\t: 0x4\nCPU part\t: 0xd0c\nCPU revision\t: 1\n\n'
done >"$ARM/cpu/cpuinfo"

# Runs a command in the arm64 root, in a private mount namespace: its mounts (/proc, /dev,
# the CPU description above, the source tree and, with BUILD=1, the host's cross
# compiler, read-only) disappear with it. The environment is the root's own, plus what is
# passed here.
in_root() {
  local binds="mount -t proc proc $ROOT/proc && mount --bind $ARM/cpu/cpuinfo $ROOT/proc/cpuinfo"
  binds+=" && mount --rbind /dev $ROOT/dev && mount --bind $ARM/cpu/sys $ROOT/sys"
  binds+=" && mount --bind $ARM/src $ROOT/src"
  if [ "${BUILD:-0}" = 1 ]; then
    local bind target
    for bind in "${CROSS_BINDS[@]}"; do
      target=$ROOT${bind#*:}
      binds+=" && mount --bind ${bind%%:*} $target && mount -o remount,bind,ro $target"
    done
  fi
  # shellcheck disable=SC2016  # "$0" and "$@" are expanded by that sh
  unshare --mount --propagation private sh -c "$binds"' && exec chroot "$0" "$@"' "$ROOT" \
    env -i PATH=/usr/bin:/bin HOME=/root LANG=C.UTF-8 PYTHONPATH=/opt/site QEMU_CPU=$QEMU_CPU \
    LD_LIBRARY_PATH=/opt/cuda-stubs OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" "$@"
}

# --- the build -------------------------------------------------------------------------
hash=$( (
  cat "$SITE/.packages"
  sha256sum setup.py casmo_ext/csrc/*
) | sha256sum | cut -c1-16)
if [ "$(cat "$ARM/src/.built" 2>/dev/null)" != "$hash" ] || ! ls "$ARM"/src/casmo_ext/_C.*.so >/dev/null 2>&1; then
  say "building casmo_ext._C for aarch64 (emulated setup.py, native cross compiler)"
  # torch's headers warn a good deal with setup.py's flags: the output goes to a log.
  BUILD=1 in_root sh -c 'cd /src && exec nice "$@"' sh env CASMO_NO_CUDA=1 MAX_JOBS=1 \
    CC=aarch64-linux-gnu-gcc CXX=aarch64-linux-gnu-g++ LDSHARED="aarch64-linux-gnu-g++ -shared" \
    LDFLAGS="-Wl,-rpath-link,/opt/cuda-stubs" python3.11 setup.py build_ext --inplace --force \
    >"$ARM/build.log" 2>&1 || {
    tail -40 "$ARM/build.log"
    die "the build failed: $ARM/build.log"
  }
  grep '^casmo_ext:' "$ARM/build.log" || true
  echo "$hash" >"$ARM/src/.built"
fi
so=$(ls "$ARM"/src/casmo_ext/_C.*.so)
# The DEFAULT build is at::vec's NEON code: 4-lane float vector arithmetic must be there.
neon=$(aarch64-linux-gnu-objdump -d --no-show-raw-insn "$so" | grep -cE $'\t(fmla|fmul|fadd|fsqrt|fdiv)\tv[0-9]+\\.4s' || true)
[ "$neon" -gt 0 ] || die "no NEON float instructions in $so"
echo "${so#"$REPO"/}: $neon NEON 4-lane float instructions"

# --- the tests ---------------------------------------------------------------------------
say "pytest under qemu-aarch64"
in_root sh -c 'cd /src && exec nice "$@"' sh python3.11 -c '
import platform, torch, casmo_ext
info = casmo_ext.build_info()
print("machine:", platform.machine(), "| torch", torch.__version__,
      "| torch CPU capability:", torch.backends.cpu.get_cpu_capability(), "| build_info:", info)
assert platform.machine() == "aarch64" and info["cpu_kernel"] and info["cpu_kernel_capability"] == "DEFAULT"
'
# shellcheck disable=SC2086  # PYTEST_ARGS is split on purpose
in_root sh -c 'cd /src && exec nice "$@"' sh python3.11 -m pytest -p no:cacheprovider -q -rs \
  --durations=15 tests/test_cpu_kernel.py tests/test_optimizer.py ${PYTEST_ARGS:-}
say "passed"
