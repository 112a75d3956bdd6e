"""The CUDA kernels' code, run on the CPU through cuda_emulation.h (real threads per
block, real barriers), against the pure-PyTorch reference.

Small chunk sizes make tensors span many blocks, and enough tensors and chunks are
used to overflow one launch's tensor and block limits."""

from __future__ import annotations

import hashlib
import platform

import pytest
import torch
from closeness import TOLERANCE, assert_matches_reference

from casmo_ext import _kernels, build_info, casmo_step_reference

pytestmark = [
    pytest.mark.cuda_emulated,
    pytest.mark.skipif(not build_info()["cuda_emulation"], reason="built without the CUDA emulation"),
]

HYPER = dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, c_min=0.1, robustness=0.5, rel_floor=0.1)
# Tensor sizes around the emulated block (32 threads) and the chunk sizes used here.
AWKWARD_SIZES = [0, 1, 5, 31, 32, 33, 63, 64, 65, 200, 0, 1000]
SUM_RTOL = {torch.float32: 1e-6, torch.bfloat16: 2e-3, torch.float16: 2e-3}


def limits() -> dict:
    return _kernels._C.cuda_launch_limits()


def emulated_step(
    ps, gs, ms, ss, steps, *, lr=1e-3, chunk_size=64, step_tensors=None, lr_tensor=None, **hyper
):
    h = {**HYPER, **hyper}
    float_steps = [] if step_tensors is not None else [float(s) for s in steps]
    return _kernels._C.cuda_emulated_step(
        ps,
        gs,
        ms,
        ss,
        float_steps,
        step_tensors or [],
        lr,
        lr_tensor,
        h["beta1"],
        h["beta2"],
        h["eps"],
        h["weight_decay"],
        h["c_min"],
        h["robustness"],
        h["rel_floor"],
        chunk_size,
    )


def reference_step(ps, gs, ms, ss, steps, *, lr=1e-3, **hyper):
    return casmo_step_reference(ps, gs, ms, ss, steps, lr=lr, **{**HYPER, **hyper})


class Group:
    """Parameters, moments and a gradient source for a list of tensor sizes. Gradients
    are a fixed per-element drift plus noise, so agar_i varies across elements."""

    def __init__(self, sizes, dtype=torch.float32, seed=0):
        gen = torch.Generator().manual_seed(seed)
        self.sizes, self.dtype, self.gen = list(sizes), dtype, gen
        self.params = [torch.randn(n, generator=gen).to(dtype) for n in sizes]
        self.drift = [torch.randn(n, generator=gen) * torch.rand(n, generator=gen) for n in sizes]
        self.ms = [torch.zeros(n, dtype=dtype) for n in sizes]
        self.ss = [torch.zeros(n, dtype=dtype) for n in sizes]

    def grads(self):
        """One gradient per parameter, laid out (strides) as the parameter is."""
        return [
            torch.empty_like(p).copy_(d + torch.randn(d.shape, generator=self.gen))
            for p, d in zip(self.params, self.drift)
        ]

    def clone(self) -> Group:
        other = object.__new__(Group)
        other.sizes, other.dtype, other.gen = self.sizes, self.dtype, self.gen
        other.drift = self.drift
        other.params, other.ms, other.ss = ([t.clone() for t in ts] for ts in (self.params, self.ms, self.ss))
        return other

    def tensors(self):
        return self.params, self.ms, self.ss


def assert_group_close(actual: Group, expected: Group, dtype) -> None:
    for name, xs, ys in zip(("p", "m", "s"), actual.tensors(), expected.tensors()):
        for i, (x, y) in enumerate(zip(xs, ys)):
            assert_matches_reference(x, y, dtype, f"{name}[{i}]")


def run_against_reference(group: Group, num_steps: int, *, chunk_size=64, **hyper) -> None:
    expected = group.clone()
    for step in range(1, num_steps + 1):
        grads = group.grads()
        steps = [step] * len(grads)
        sums = emulated_step(group.params, grads, group.ms, group.ss, steps, chunk_size=chunk_size, **hyper)
        ref_sums = reference_step(expected.params, grads, expected.ms, expected.ss, steps, **hyper)
        assert sums.dtype == torch.float64 and sums.shape == (2,)
        torch.testing.assert_close(sums, ref_sums, rtol=SUM_RTOL[group.dtype], atol=1e-9)
        assert_group_close(group, expected, group.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("robustness", [0.0, 0.5, 1.0])
def test_matches_reference_on_awkward_sizes(dtype, robustness):
    run_against_reference(Group(AWKWARD_SIZES, dtype), num_steps=3, robustness=robustness)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_decay_and_other_hyper_parameters(dtype):
    run_against_reference(
        Group(AWKWARD_SIZES, dtype, seed=1),
        num_steps=3,
        lr=1e-2,
        weight_decay=0.1,
        c_min=0.3,
        rel_floor=0.5,
        beta1=0.8,
        beta2=0.99,
    )


def test_chunk_size_larger_than_tensors():
    run_against_reference(Group(AWKWARD_SIZES, seed=2), num_steps=2, chunk_size=65536)


def test_more_tensors_than_fit_in_one_launch():
    max_tensors = limits()["max_tensors"]
    sizes = [(7 * i) % 50 for i in range(2 * max_tensors + 5)]  # includes empty tensors
    assert sum(n > 0 for n in sizes) > 2 * max_tensors
    run_against_reference(Group(sizes, seed=3), num_steps=2, chunk_size=16)


def test_tensor_spanning_several_launches():
    # One tensor with more chunks than two launches hold, between two small ones.
    chunk_size = 8
    big = (2 * limits()["max_blocks"] + 7) * chunk_size + 5
    run_against_reference(Group([3, big, 17], seed=4), num_steps=2, chunk_size=chunk_size)


def test_each_tensors_partials_are_summed_once():
    """Each tensor's gate comes from one sum of its chunks' partials, not one per block of
    the tensor (C^2 reads for C chunks): the reductions read each agar partial twice (the
    tensor's sum, the group's) and each confidence partial once, however many chunks."""
    chunk_size = 8
    big = (2 * limits()["max_blocks"] + 7) * chunk_size + 5  # spans three launches
    group = Group([3, big, 17, 0, 100], seed=10)
    chunks = sum(-(-n // chunk_size) for n in group.sizes)
    before = _kernels._C.cuda_emulated_partials_read()
    emulated_step(group.params, group.grads(), group.ms, group.ss, [1] * 5, chunk_size=chunk_size)
    assert _kernels._C.cuda_emulated_partials_read() - before == 3 * chunks


def exact_values(n, seed, scale):
    """n float32 values defined by integer arithmetic alone (no random generator, no libm),
    so the same on every machine and torch version; scale is a power of two."""
    i = torch.arange(n, dtype=torch.int64)
    return (((i * 7919 + seed * 104729) % 2001) - 1000).to(torch.float32) * scale


@pytest.mark.skipif(platform.machine() != "x86_64", reason="digests taken where no FMA is contracted")
@pytest.mark.parametrize(
    "dtype, digest", [(torch.float32, "9eb8461377de10b2"), (torch.bfloat16, "a665cf895b013d5a")]
)
def test_bitwise_as_before_the_gate_was_summed_once(dtype, digest):
    """Two steps of a tensor of 336 chunks (two launches) among others, bit for bit as the
    kernels stepped them when every update block summed its tensor's partials itself
    (commit 84bac02): the sum keeps its fixed order. x86-64 only: its host compiler
    contracts no multiply-adds into FMAs without -mfma, so the bits are the code's."""
    sizes = [3, 8 * 330 + 5, 17, 0, 100]
    ps = [exact_values(n, 1, 2.0**-9).to(dtype) for n in sizes]
    ms = [exact_values(n, 2, 2.0**-12).to(dtype) for n in sizes]
    ss = [exact_values(n, 3, 2.0**-20).abs().to(dtype) for n in sizes]
    outputs = hashlib.sha256()
    for step in (1, 2):
        gs = [(exact_values(n, 4, 2.0**-8) + exact_values(n, 4 + step, 2.0**-9)).to(dtype) for n in sizes]
        sums = emulated_step(ps, gs, ms, ss, [step] * len(sizes), lr=1e-2, weight_decay=0.01, chunk_size=8)
        for t in [sums] + ps + ms + ss:
            outputs.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    assert outputs.hexdigest()[:16] == digest


def test_non_contiguous_dense_tensors():
    """Transposed (dense, non-contiguous) tensors are stepped in storage order."""
    group = Group([], seed=5)
    group.params = [torch.randn(13, 7).t(), torch.randn(4, 5, 6).permute(2, 0, 1)]
    group.drift = [torch.randn(p.shape) for p in group.params]
    group.ms = [torch.zeros_like(p) for p in group.params]
    group.ss = [torch.zeros_like(p) for p in group.params]
    assert not group.params[0].is_contiguous()
    run_against_reference(group, num_steps=2, chunk_size=16)


def test_bitwise_deterministic():
    first = Group(AWKWARD_SIZES + [3000], torch.bfloat16, seed=6)
    second = first.clone()
    for step in (1, 2):
        grads = first.grads()
        sums_a = emulated_step(first.params, grads, first.ms, first.ss, [step] * len(grads))
        sums_b = emulated_step(second.params, grads, second.ms, second.ss, [step] * len(grads))
        assert torch.equal(sums_a, sums_b)
        for xs, ys in zip(first.tensors(), second.tensors()):
            assert all(torch.equal(x, y) for x, y in zip(xs, ys))


def test_every_element_written_and_nothing_else():
    """The tensors are slices of one NaN-poisoned buffer per role, with poisoned gaps
    between them: after a step every element has changed and no gap was touched."""
    sizes, gap, chunk_size = [1, 33, 64, 65, 250], 3, 16
    total = sum(sizes) + gap * (len(sizes) + 1)
    gen = torch.Generator().manual_seed(7)
    buffers = {role: torch.full((total,), float("nan")) for role in ("p", "g", "m", "s")}
    views = {role: [] for role in buffers}
    offset = gap
    for n in sizes:
        for role, buffer in buffers.items():
            views[role].append(buffer[offset : offset + n])
        offset += n + gap
    for role in ("p", "g", "m"):
        for view in views[role]:
            view.copy_(torch.randn(view.shape, generator=gen))
    for view in views["s"]:
        view.copy_(torch.rand(view.shape, generator=gen) + 0.1)
    before = {role: [v.clone() for v in views[role]] for role in ("p", "m", "s")}
    expected = {role: [v.clone() for v in views[role]] for role in ("p", "m", "s")}

    # Weight decay moves every parameter, so an unwritten one shows.
    hyper = dict(lr=0.1, weight_decay=0.1)
    sums = emulated_step(
        views["p"], views["g"], views["m"], views["s"], [5] * len(sizes), chunk_size=chunk_size, **hyper
    )
    ref_sums = reference_step(
        expected["p"], views["g"], expected["m"], expected["s"], [5] * len(sizes), **hyper
    )

    torch.testing.assert_close(sums, ref_sums, rtol=1e-5, atol=1e-9)
    for role in ("p", "m", "s"):
        for i, (view, old, want) in enumerate(zip(views[role], before[role], expected[role])):
            assert not (view == old).any(), f"{role}[{i}] has elements the kernels did not write"
            torch.testing.assert_close(view, want, **TOLERANCE[torch.float32])
        buffer = buffers[role]
        in_a_tensor = torch.zeros(total, dtype=torch.bool)
        offset = gap
        for n in sizes:
            in_a_tensor[offset : offset + n] = True
            offset += n + gap
        assert buffer[~in_a_tensor].isnan().all(), f"the kernels wrote outside the {role} tensors"


def test_capturable_reads_steps_and_lr_from_tensors():
    """Step counts and lr as (here CPU) tensors are read inside the kernels: the same
    result as with host values, bit for bit, and the lr value argument is ignored."""
    group = Group(AWKWARD_SIZES, seed=8)
    host = group.clone()
    expected = group.clone()
    step_tensors = [torch.zeros((), dtype=torch.float32) for _ in group.sizes]
    lr_tensor = torch.tensor(3e-3, dtype=torch.float32)
    for step in (1, 2, 3):
        grads = group.grads()
        torch._foreach_add_(step_tensors, 1)
        sums = emulated_step(
            group.params,
            grads,
            group.ms,
            group.ss,
            None,
            lr=0.0,
            step_tensors=step_tensors,
            lr_tensor=lr_tensor,
        )
        host_sums = emulated_step(host.params, grads, host.ms, host.ss, [step] * len(grads), lr=3e-3)
        ref_sums = reference_step(
            expected.params, grads, expected.ms, expected.ss, list(step_tensors), lr=lr_tensor
        )
        assert torch.equal(sums, host_sums)
        for xs, ys in zip(group.tensors(), host.tensors()):
            assert all(torch.equal(x, y) for x, y in zip(xs, ys))
        torch.testing.assert_close(sums, ref_sums, rtol=1e-6, atol=1e-9)
        assert_group_close(group, expected, torch.float32)


def test_lr_tensor_as_float64():
    group = Group([10, 100], seed=9)
    expected = group.clone()
    grads = group.grads()
    emulated_step(group.params, grads, group.ms, group.ss, [1, 1], lr=0.0, lr_tensor=torch.tensor(1e-2))
    reference_step(expected.params, grads, expected.ms, expected.ss, [1, 1], lr=1e-2)
    assert_group_close(group, expected, torch.float32)


def test_empty_groups():
    assert torch.equal(emulated_step([], [], [], [], []), torch.zeros(2, dtype=torch.float64))
    empty = [torch.zeros(0)]
    sums = emulated_step(empty, [torch.zeros(0)], [torch.zeros(0)], [torch.zeros(0)], [1])
    assert torch.equal(sums, torch.zeros(2, dtype=torch.float64))


def make_inputs(n=10, dtype=torch.float32):
    return (
        [torch.randn(n, dtype=dtype)],
        [torch.randn(n, dtype=dtype)],
        [torch.zeros(n, dtype=dtype)],
        [torch.zeros(n, dtype=dtype)],
    )


def test_mixed_dtypes_raise():
    ps, gs, ms, ss = make_inputs()
    with pytest.raises(RuntimeError, match="dtype"):
        emulated_step(ps, [gs[0].double()], ms, ss, [1])
    with pytest.raises(RuntimeError, match="dtype"):
        emulated_step(
            ps + [torch.zeros(3, dtype=torch.bfloat16)], gs + [torch.zeros(3)], ms + ms, ss + ss, [1, 1]
        )


def test_float64_is_refused():
    ps, gs, ms, ss = make_inputs(dtype=torch.float64)
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        emulated_step(ps, gs, ms, ss, [1])


def test_mismatched_strides_raise():
    p = torch.randn(4, 6)
    g = torch.randn(6, 4).t()  # same shape, other strides
    with pytest.raises(RuntimeError, match="strides"):
        emulated_step([p], [g], [torch.zeros_like(p)], [torch.zeros_like(p)], [1])


def test_strided_view_with_gaps_raises():
    p = torch.randn(10, 4)[:, :2]
    with pytest.raises(RuntimeError, match="gaps or overlaps"):
        emulated_step(
            [p], [torch.randn(10, 4)[:, :2]], [torch.zeros(10, 4)[:, :2]], [torch.zeros(10, 4)[:, :2]], [1]
        )


def test_step_counts_must_match_tensors():
    ps, gs, ms, ss = make_inputs()
    with pytest.raises(RuntimeError, match="one step count per tensor"):
        emulated_step(ps, gs, ms, ss, [1, 2])
    with pytest.raises(RuntimeError, match="float32"):
        emulated_step(ps, gs, ms, ss, None, step_tensors=[torch.ones((), dtype=torch.float64)])


def test_bad_chunk_size_raises():
    ps, gs, ms, ss = make_inputs()
    with pytest.raises(RuntimeError, match="chunk_size"):
        emulated_step(ps, gs, ms, ss, [1], chunk_size=0)
