"""The kernels as the custom operator torch.ops.casmo_ext.step_ (schema, fake kernel,
dispatcher mutation) and CASMO.step under torch.compile, on the CPU."""

from __future__ import annotations

import copy

import pytest
import torch
from torch._dynamo.testing import CompileCounter

import casmo_ext
from casmo_ext import CASMO

pytestmark = pytest.mark.skipif(not casmo_ext.build_info()["cpu_kernel"], reason="casmo_ext._C not built")
HYPER = (0.9, 0.999, 1e-8, 0.01, 0.1, 0.5, 0.1)  # beta1 ... rel_floor, the operator's order


def op_args(sizes=(300, 7), tensor_steps=False, scaling=False):
    gen = torch.Generator().manual_seed(0)
    ps = [torch.randn(n, generator=gen) for n in sizes]
    gs, ms = [torch.randn(n, generator=gen) for n in sizes], [torch.randn(n, generator=gen) for n in sizes]
    ss = [torch.rand(n, generator=gen) for n in sizes]
    steps = [torch.tensor(3.0) for _ in sizes] if tensor_steps else [3.0] * len(sizes)
    step_floats, step_tensors = ([], steps) if tensor_steps else (steps, [])
    grad_scale, found_inf = (torch.tensor(4.0), torch.tensor(0.0)) if scaling else (None, None)
    return (ps, gs, ms, ss, step_floats, step_tensors, 1e-2, None, *HYPER, grad_scale, found_inf)


@pytest.mark.parametrize("tensor_steps", [False, True])
@pytest.mark.parametrize("scaling", [False, True])
def test_opcheck(tensor_steps, scaling):
    torch.library.opcheck(
        torch.ops.casmo_ext.step_.default, op_args(tensor_steps=tensor_steps, scaling=scaling)
    )


def test_fake_kernel_gives_the_metrics_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in op_args()[4:]]
        ps, gs, ms, ss = ([mode.from_tensor(t) for t in ts] for ts in op_args()[:4])
        sums = torch.ops.casmo_ext.step_(ps, gs, ms, ss, *args)
    assert sums.shape == (2,) and sums.dtype == torch.float64


def test_step_bumps_version_counters():
    """The step mutates through the dispatcher, so autograd sees the parameters change."""
    p = torch.nn.Parameter(torch.ones(50))
    opt = CASMO([p], fused=True)
    p.grad = torch.ones(50)
    version = p._version
    opt.step()
    assert p._version > version and opt.state[p]["m"]._version > 0


def test_scaled_step_bumps_gradient_versions():
    """Under a GradScaler the step unscales the gradients in place: autograd sees it."""
    p = torch.nn.Parameter(torch.ones(50))
    opt = CASMO([p], fused=True)
    p.grad = torch.full((50,), 4.0)
    version = p.grad._version
    opt.step()
    assert p.grad._version == version
    opt.grad_scale, opt.found_inf = torch.tensor(4.0), torch.tensor(0.0)
    opt.step()
    assert p.grad._version > version and torch.equal(p.grad, torch.ones(50))


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(10, 20), torch.nn.Tanh(), torch.nn.Linear(20, 1))


def set_grads(model, step):
    gen = torch.Generator().manual_seed(step)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen) + 0.1


def run_compiled(backend, steps, **kwargs):
    eager_model, compiled_model = make_model(), make_model()
    eager = CASMO(eager_model.parameters(), lr=1e-2, weight_decay=0.01, **kwargs)
    compiled = CASMO(compiled_model.parameters(), lr=1e-2, weight_decay=0.01, **kwargs)
    compiled_step = torch.compile(compiled.step, backend=backend)
    for step in range(steps):
        set_grads(eager_model, step)
        set_grads(compiled_model, step)
        eager.step()
        compiled_step()
    return (eager_model, eager), (compiled_model, compiled)


def assert_same(eager, compiled, rtol=1e-6, atol=1e-7):
    (eager_model, eager_opt), (compiled_model, compiled_opt) = eager, compiled
    for p, q in zip(eager_model.parameters(), compiled_model.parameters()):
        torch.testing.assert_close(q, p, rtol=rtol, atol=atol)
        torch.testing.assert_close(compiled_opt.state[q]["s"], eager_opt.state[p]["s"], rtol=rtol, atol=atol)
    assert compiled_opt.group_metrics()["agar"] == pytest.approx(eager_opt.group_metrics()["agar"], rel=1e-6)


@pytest.mark.parametrize(
    "kwargs", [dict(fused=True), dict(fused=True, capturable=True), dict(fused=False)], ids=str
)
def test_compiled_step_is_one_graph_without_recompiles(kwargs):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    counter = CompileCounter()
    eager, compiled = run_compiled(counter, 6, **kwargs)
    assert counter.frame_count == 1 and counter.op_count > 0
    assert dict(torch._dynamo.utils.counters["graph_break"]) == {}
    assert_same(eager, compiled)
    saved = compiled[1].state_dict()  # tensor step counts while compiling; ints in checkpoints
    if not kwargs.get("capturable"):
        assert all(type(state["step"]) is int and state["step"] == 6 for state in saved["state"].values())


def test_compile_after_eager_steps_and_a_public_checkpoint():
    """Int step counts (eager steps, a checkpoint of the public package) become tensors
    at the first compiled step: one recompile, then the same trajectory as eager."""
    model = make_model()
    opt = CASMO(model.parameters(), lr=1e-2)
    set_grads(model, 0)
    opt.step()
    twin_model = copy.deepcopy(model)
    twin = CASMO(twin_model.parameters(), lr=1e-2)
    twin.load_state_dict(copy.deepcopy(opt.state_dict()))
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled_step = torch.compile(opt.step, backend=counter)
    for step in range(1, 5):
        set_grads(model, step)
        set_grads(twin_model, step)
        compiled_step()
        twin.step()
    assert counter.frame_count == 2
    assert_same((twin_model, twin), (model, opt))


def test_inductor_compiled_step_matches_eager():
    torch._dynamo.reset()
    eager, compiled = run_compiled("inductor", 3, fused=True)
    assert_same(eager, compiled)


def test_compiled_step_under_a_scaler_unscales_the_gradients():
    """Functionalization (aot_eager, as inductor uses it) writes the unscaled gradients back
    because the operator's schema marks them as mutated."""
    torch._dynamo.reset()
    eager_model, compiled_model = make_model(), make_model()
    eager = CASMO(eager_model.parameters(), lr=1e-2, fused=True)
    compiled = CASMO(compiled_model.parameters(), lr=1e-2, fused=True)
    compiled_step = torch.compile(compiled.step, backend="aot_eager")
    for step in range(3):
        for model, opt in ((eager_model, eager), (compiled_model, compiled)):
            set_grads(model, step)
            torch._foreach_mul_([p.grad for p in model.parameters()], 256.0)
            opt.grad_scale, opt.found_inf = torch.tensor(256.0), torch.tensor(0.0)
        eager.step()
        compiled_step()
        for p, q in zip(eager_model.parameters(), compiled_model.parameters()):
            assert torch.equal(q.grad, p.grad)
    assert_same((eager_model, eager), (compiled_model, compiled))
