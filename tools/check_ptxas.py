"""The CUDA kernels' register use, checked without a GPU (`make check-ptxas`, run by CI).

    python tools/check_ptxas.py

Compiles every kernel of casmo_ext/csrc/casmo_cuda_kernels.cuh, at the block size the
GPU launches them with, for each architecture in TORCH_CUDA_ARCH_LIST (default
"8.0;9.0+PTX", the Makefile's) with `nvcc -O3 -Xptxas -v`, prints each kernel's
registers, spills and stack, and fails (exit 1) on any spill or on more registers per
thread than a block of that many threads may have (65536 / 512 = 128): such a kernel
would fail only at launch ("too many resources requested"), which no test without a GPU
shows. With "+PTX" it also checks that the PTX, which a newer GPU compiles at load time
with no other register cap, carries the block size (`.maxntid`, from __launch_bounds__).
Only the kernels are compiled, not the extension: about a minute on 2 cores.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

CSRC = Path(__file__).resolve().parent.parent / "casmo_ext" / "csrc"
KERNELS_HEADER = CSRC / "casmo_cuda_kernels.cuh"
REGISTERS_PER_BLOCK = 65536  # every architecture from sm_50 on
DTYPES = {"float": "float32", "c10::BFloat16": "bfloat16", "c10::Half": "float16"}
# Kernels templated on the element type; the others take only the block size.
TYPED_KERNELS = ("moments_kernel", "tensor_sums_kernel", "update_kernel")


@dataclass
class KernelUse:
    arch: str
    kernel: str
    registers: int
    spill_stores: int
    spill_loads: int
    stack: int

    def problems(self, max_registers: int) -> list[str]:
        found = []
        if self.spill_stores or self.spill_loads:
            found.append(f"spills ({self.spill_stores} bytes stored, {self.spill_loads} loaded)")
        if self.registers > max_registers:
            found.append(f"{self.registers} registers > {max_registers}")
        return found


def block_size(header: str) -> int:
    return int(re.search(r"constexpr int kCudaBlockSize = (\d+);", header).group(1))


def kernel_names(header: str) -> list[str]:
    """The __global__ functions the header defines."""
    return re.findall(r"__global__ void(?:\s+__launch_bounds__\(\w+\))?\s+(\w+)\(", header)


def translation_unit(names: list[str]) -> str:
    """A .cu file instantiating every kernel as casmo_cuda_launch.h launches it."""
    lines = ['#include "casmo_cuda_kernels.cuh"', "namespace casmo::cuda_kernels {"]
    for name in names:
        if name in TYPED_KERNELS:
            for ctype in DTYPES:
                extra = ", int" if name == "tensor_sums_kernel" else ""
                lines.append(
                    f"template __global__ void {name}<{ctype}, kCudaBlockSize>(LaunchArgs<{ctype}>{extra});"
                )
        else:
            lines.append(
                f"template __global__ void {name}<kCudaBlockSize>"
                "(const double*, const double*, int64_t, const float*, double*);"
            )
    lines.append("}  // namespace casmo::cuda_kernels")
    return "\n".join(lines) + "\n"


def architectures(arch_list: str) -> list[tuple[str, bool]]:
    """("90", with_ptx) per entry of a TORCH_CUDA_ARCH_LIST such as "8.0;9.0+PTX"."""
    entries = []
    for entry in re.split(r"[;\s]+", arch_list.strip()):
        match = re.fullmatch(r"(\d+)\.(\d+)a?(\+PTX)?", entry)
        if not match:
            sys.exit(f"check_ptxas: cannot read TORCH_CUDA_ARCH_LIST entry {entry!r} (use e.g. 8.0;9.0+PTX)")
        entries.append((match.group(1) + match.group(2), bool(match.group(3))))
    return entries


def parse_ptxas(output: str, arch: str) -> list[KernelUse]:
    """The ptxas -v report, one KernelUse per entry function."""
    uses = []
    for block in re.split(r"ptxas info\s*: Compiling entry function ", output)[1:]:
        mangled = re.match(r"'(\w+)'", block).group(1)
        registers = re.search(r"Used (\d+) registers", block)
        spills = re.search(
            r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", block
        )
        uses.append(
            KernelUse(
                arch=f"sm_{arch}",
                kernel=readable(mangled),
                registers=int(registers.group(1)),
                stack=int(spills.group(1)),
                spill_stores=int(spills.group(2)),
                spill_loads=int(spills.group(3)),
            )
        )
    return uses


def readable(mangled: str) -> str:
    """moments_kernel<bfloat16> from its mangled name, _ZN5casmo12cuda_kernels14moments_kernelI...:
    the last of the length-prefixed names, and the element type among its template arguments."""
    names = re.match(r"_ZN((?:\d+\w+?)+?)I", mangled)
    position, name = 0, ""
    while names and position < len(names.group(1)):
        length = re.match(r"\d+", names.group(1)[position:]).group()
        start = position + len(length)
        name, position = names.group(1)[start : start + int(length)], start + int(length)
    for marker, dtype in (("BFloat16", "bfloat16"), ("Half", "float16"), ("IfLi", "float32")):
        if name in TYPED_KERNELS and marker in mangled:
            return f"{name}<{dtype}>"
    return name or mangled


def nvcc_path() -> str:
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    candidate = Path(cuda_home) / "bin" / "nvcc"
    nvcc = str(candidate) if candidate.exists() else shutil.which("nvcc")
    if nvcc is None:
        sys.exit(f"check_ptxas: nvcc not found (in {cuda_home}/bin or on PATH); set CUDA_HOME")
    return nvcc


def torch_include() -> str:
    """torch's headers (c10's Half and BFloat16), found without importing torch."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("check_ptxas: torch is not installed in this Python (its headers are needed)")
    return str(Path(spec.submodule_search_locations[0]) / "include")


def compile_arch(nvcc: str, source: Path, arch: str, with_ptx: bool, workdir: Path) -> tuple[str, str]:
    """ptxas's report for sm_<arch>, and the PTX (empty unless with_ptx)."""
    codes = f"[sm_{arch},compute_{arch}]" if with_ptx else f"sm_{arch}"
    command = [nvcc, "-std=c++20", "-O3", "-c", f"-I{CSRC}", f"-I{torch_include()}", "-Xptxas", "-v"]
    command += [f"-gencode=arch=compute_{arch},code={codes}", "--keep", f"--keep-dir={workdir}"]
    command += ["-o", str(workdir / f"kernels_{arch}.o"), str(source)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"check_ptxas: nvcc failed for sm_{arch}:\n{result.stdout}{result.stderr}")
    ptx = "".join(path.read_text() for path in workdir.glob("*.ptx")) if with_ptx else ""
    return result.stdout + result.stderr, ptx


def ptx_problems(ptx: str, threads: int, expected: int) -> list[str]:
    """The PTX entries that do not declare `.maxntid threads, 1, 1`, or that are missing."""
    entries = re.split(r"\.entry\s+", ptx)[1:]
    bound = re.compile(rf"\.maxntid\s+{threads},\s*1,\s*1")
    problems = [
        f"{readable(e.split('(')[0].strip())}: no .maxntid {threads}" for e in entries if not bound.search(e)
    ]
    if len(entries) != expected:
        problems.append(f"{len(entries)} entries in the PTX, expected {expected}")
    return problems


@dataclass
class Limits:
    threads: int  # a block's
    max_registers: int  # per thread
    kernels: int  # instantiations, as ptxas reports them


def check_arch(nvcc: str, source: Path, arch: str, with_ptx: bool, limits: Limits) -> list[str]:
    """Compiles for sm_<arch>, prints each kernel's row, returns what fails."""
    workdir = source.parent / arch
    workdir.mkdir()
    report, ptx = compile_arch(nvcc, source, arch, with_ptx, workdir)
    uses = parse_ptxas(report, arch)
    failures = []
    if len(uses) != limits.kernels:
        failures.append(f"sm_{arch}: ptxas reported {len(uses)} kernels, expected {limits.kernels}")
    for use in uses:
        spilled = use.spill_stores + use.spill_loads
        print(f"{use.arch:<7} {use.kernel:<28} {use.registers:>9} {spilled:>15} {use.stack:>6}")
        failures += [f"{use.arch} {use.kernel}: {p}" for p in use.problems(limits.max_registers)]
    if with_ptx:
        failures += [f"compute_{arch} PTX {p}" for p in ptx_problems(ptx, limits.threads, limits.kernels)]
    return failures


def check(arch_list: str) -> int:
    header = KERNELS_HEADER.read_text()
    names = kernel_names(header)
    threads = block_size(header)
    kernels = sum(len(DTYPES) if name in TYPED_KERNELS else 1 for name in names)
    limits = Limits(threads, REGISTERS_PER_BLOCK // threads, kernels)
    nvcc, failures = nvcc_path(), []
    print(f"check_ptxas: {len(names)} kernels, {threads} threads a block, {limits.max_registers} registers")
    print(f"{'arch':<7} {'kernel':<28} {'registers':>9} {'spills (bytes)':>15} {'stack':>6}")
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "kernels.cu"
        source.write_text(translation_unit(names))
        for arch, with_ptx in architectures(arch_list):
            failures += check_arch(nvcc, source, arch, with_ptx, limits)
    for failure in failures:
        print(f"FAIL {failure}")
    return 1 if failures else 0


def main() -> None:
    started = time.monotonic()
    status = check(os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX"))
    verdict = "failed" if status else "passed"
    print(f"check_ptxas: {verdict} in {time.monotonic() - started:.0f} s")
    sys.exit(status)


if __name__ == "__main__":
    main()
