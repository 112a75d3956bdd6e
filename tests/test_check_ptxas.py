"""tools/check_ptxas.py's reading of nvcc's output, without nvcc (`make check-ptxas` runs
the real compile in CI)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import check_ptxas  # noqa: E402

MOMENTS = "_ZN5casmo12cuda_kernels14moments_kernelIN3c108BFloat16ELi512EEEvNS0_10LaunchArgsIT_EE"
GROUP_SUMS = "_ZN5casmo12cuda_kernels17group_sums_kernelILi512EEEvPKdS3_lPKfPd"
PTXAS_OUTPUT = f"""ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '{MOMENTS}' for 'sm_90'
ptxas info    : Function properties for {MOMENTS}
    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 128 registers, used 1 barriers, 4096 bytes smem, 3936 bytes cmem[0]
ptxas info    : Compiling entry function '{GROUP_SUMS}' for 'sm_90'
ptxas info    : Function properties for {GROUP_SUMS}
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 130 registers, used 1 barriers, 4096 bytes smem, 392 bytes cmem[0]
"""


def test_the_header_s_kernels_and_block_size():
    header = check_ptxas.KERNELS_HEADER.read_text()
    names = check_ptxas.kernel_names(header)
    assert names == ["moments_kernel", "tensor_sums_kernel", "update_kernel", "group_sums_kernel"]
    assert check_ptxas.block_size(header) == 512
    unit = check_ptxas.translation_unit(names)
    assert unit.count("template __global__ void") == 10
    assert "tensor_sums_kernel<c10::Half, kCudaBlockSize>(LaunchArgs<c10::Half>, int);" in unit


def test_arch_list_entries():
    assert check_ptxas.architectures("8.0;9.0+PTX") == [("80", False), ("90", True)]
    assert check_ptxas.architectures(" 8.6 9.0a ") == [("86", False), ("90", False)]
    with pytest.raises(SystemExit, match="Hopper"):
        check_ptxas.architectures("Hopper")


def test_ptxas_report_and_what_fails():
    moments, group_sums = check_ptxas.parse_ptxas(PTXAS_OUTPUT, "90")
    assert (moments.arch, moments.kernel, moments.registers, moments.stack) == (
        "sm_90",
        "moments_kernel<bfloat16>",
        128,
        8,
    )
    assert moments.problems(128) == ["spills (4 bytes stored, 4 loaded)"]
    assert group_sums.kernel == "group_sums_kernel" and group_sums.problems(128) == ["130 registers > 128"]
    assert group_sums.problems(130) == []


def test_ptx_needs_every_entry_bounded():
    bounded = f".entry {GROUP_SUMS}(\n.param .u64 a\n)\n.maxntid 512, 1, 1\n{{\n}}\n"
    unbounded = f".entry {MOMENTS}(\n.param .u64 a\n)\n{{\n}}\n"
    assert check_ptxas.ptx_problems(bounded, 512, 1) == []
    assert check_ptxas.ptx_problems(bounded + unbounded, 512, 2) == [
        "moments_kernel<bfloat16>: no .maxntid 512"
    ]
    assert check_ptxas.ptx_problems("", 512, 2) == ["0 entries in the PTX, expected 2"]
