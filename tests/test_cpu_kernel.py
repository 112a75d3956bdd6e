"""The CPU kernel's vector passes (casmo_cpu_kernel.cpp) against casmo_math.h applied one
element at a time (cpu_scalar_step), under the CPU capability torch runs with; and the
kernel tests of this file and of test_optimizer.py (against the reference and the
float64 spec) rerun in a subprocess for every capability this machine supports, forced
with ATEN_CPU_CAPABILITY."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from closeness import assert_matches_reference

from casmo_ext import _kernels, build_info

pytestmark = pytest.mark.skipif(not build_info()["cpu_kernel"], reason="casmo_ext._C not built")

# Around the vector widths (8, 16 lanes; 16, 32 per step), the float32 sum block (1024),
# the chunk (16384) and the small-tensor limit (32768).
SIZES = [0, 1, 2, 7, 15, 16, 17, 31, 32, 33, 63, 65, 1023, 1025, 16383, 16385, 32768, 32769, 100_003]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Two groups' hyper-parameters, in cpu_step's order (lr, beta1, beta2, eps, weight_decay,
# c_min, robustness, rel_floor).
GROUPS = [(1e-2, 0.9, 0.999, 1e-8, 0.0, 0.1, 0.5, 0.1), (3e-3, 0.5, 0.99, 1e-6, 0.05, 0.3, 1.0, 0.2)]
X86_CAPABILITIES = ["DEFAULT", "AVX2", "AVX512"]
EXPECTED = os.environ.get("CASMO_EXPECT_CPU_CAPABILITY")
PAD = 64  # elements of NaN poison on each side of every tensor


def poisoned(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """values copied into the middle of a NaN-filled buffer: (buffer, dense view). A kernel
    that reads past a tensor's ends gets NaN into its sums; one that writes there shows."""
    buffer = torch.full((values.numel() + 2 * PAD,), float("nan"), dtype=values.dtype)
    view = buffer[PAD : PAD + values.numel()]
    view.copy_(values)
    return buffer, view


def make_state(dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    tensors = {name: [] for name in ("p", "m", "s")}
    for n in SIZES:
        tensors["p"].append(torch.randn(n, generator=gen).to(dtype))
        tensors["m"].append((0.1 * torch.randn(n, generator=gen)).to(dtype))
        tensors["s"].append((0.01 * torch.rand(n, generator=gen)).to(dtype))
    return tensors, gen


def run_steps(step_fn, dtype, hyper, steps=3, seed=0):
    """Steps fresh poisoned copies of the same state with the same gradients; returns the
    buffers (poison included) and each step's [sum agar_i, sum C_i]."""
    tensors, gen = make_state(dtype, seed)
    buffers = {name: [poisoned(x) for x in xs] for name, xs in tensors.items()}
    views = {name: [view for _, view in pairs] for name, pairs in buffers.items()}
    sums = []
    for step in range(1, steps + 1):
        grads = [(0.2 + torch.randn(n, generator=gen)).to(dtype) for n in SIZES]
        sums.append(step_fn(views["p"], grads, views["m"], views["s"], [float(step)] * len(SIZES), *hyper))
    return {name: [buffer for buffer, _ in pairs] for name, pairs in buffers.items()}, sums


def test_kernel_uses_the_capability_torch_reports():
    torch_capability = torch.backends.cpu.get_cpu_capability()
    expected = torch_capability if torch_capability in X86_CAPABILITIES else "DEFAULT"
    assert _kernels._C.cpu_capability() == expected
    if EXPECTED is not None:
        assert expected == EXPECTED


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hyper", GROUPS, ids=["group0", "group1"])
def test_vector_passes_match_scalar_math(dtype, hyper):
    kernel, kernel_sums = run_steps(_kernels._C.cpu_step, dtype, hyper)
    scalar, scalar_sums = run_steps(_kernels._C.cpu_scalar_step, dtype, hyper)
    for name in ("p", "m", "s"):
        for n, actual, expected in zip(SIZES, kernel[name], scalar[name]):
            assert torch.isnan(actual[:PAD]).all() and torch.isnan(actual[-PAD:]).all(), f"{name}[{n}]"
            middle = slice(PAD, PAD + n)
            assert not torch.isnan(actual[middle]).any(), f"{name}[{n}] not written"
            assert_matches_reference(actual[middle], expected[middle], dtype, f"{name}[{n}]")
    rtol = 1e-6 if dtype == torch.float32 else 2e-3
    for got, want in zip(kernel_sums, scalar_sums):
        torch.testing.assert_close(got, want, rtol=rtol, atol=0.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_each_tensors_sums_count_only_its_elements(dtype):
    """One tensor per call, so that lanes past a tensor's end (which would add C_i =
    trust^robustness * rel_floor each) show against a sum of a few elements."""
    gen = torch.Generator().manual_seed(2)
    for n in [size for size in SIZES if size > 0]:
        p, g = torch.randn(n, generator=gen).to(dtype), (0.3 + torch.randn(n, generator=gen)).to(dtype)
        sums = []
        for step_fn in (_kernels._C.cpu_step, _kernels._C.cpu_scalar_step):
            state = [p.clone(), g, torch.zeros_like(p), torch.zeros_like(p)]
            sums.append(step_fn(*[[x] for x in state], [1.0], *GROUPS[0]))
        torch.testing.assert_close(sums[0], sums[1], rtol=1e-5 if dtype == torch.float32 else 2e-3, atol=0.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_bitwise_deterministic_across_thread_counts(dtype):
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3, 2):
            torch.set_num_threads(n)
            results.append(run_steps(_kernels._C.cpu_step, dtype, GROUPS[1], steps=2))
    finally:
        torch.set_num_threads(threads)
    (first, first_sums), rest = results[0], results[1:]
    for tensors, sums in rest:
        for name in ("p", "m", "s"):
            pairs = zip(tensors[name], first[name])  # the NaN poison compares equal as 0
            assert all(torch.equal(a.nan_to_num(), b.nan_to_num()) for a, b in pairs)
        assert all(torch.equal(a, b) for a, b in zip(sums, first_sums))


def supported_capabilities() -> list[str]:
    """The capabilities torch can be forced down to on this machine (its own first)."""
    natural = torch.backends.cpu.get_cpu_capability()
    if natural in X86_CAPABILITIES:
        return X86_CAPABILITIES[: X86_CAPABILITIES.index(natural) + 1]
    return sorted({natural, "DEFAULT"})


@pytest.mark.skipif(EXPECTED is not None, reason="already running under a forced capability")
@pytest.mark.skipif("ATEN_CPU_CAPABILITY" in os.environ, reason="ATEN_CPU_CAPABILITY is set")
@pytest.mark.parametrize("capability", X86_CAPABILITIES)
def test_kernel_tests_pass_under_every_capability(capability):
    if capability not in supported_capabilities():
        pytest.skip(f"this CPU does not run {capability}")
    tests = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability.lower(), "CASMO_EXPECT_CPU_CAPABILITY": capability}
    env.setdefault("OMP_NUM_THREADS", "1")
    files = [os.path.join(tests, f) for f in ("test_cpu_kernel.py", "test_optimizer.py")]
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files, "-k", "kernel"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and " failed" not in result.stdout
