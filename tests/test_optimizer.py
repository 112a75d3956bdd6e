"""casmo_ext.CASMO against the float64 spec, for the fused CPU kernel, the foreach
fallback and the per-tensor reference,
and its compatibility contract with the public `casmo` package."""

import copy
import warnings

import numpy as np
import pytest
import torch
from spec64 import SpecOptimizer

import casmo_ext
from casmo_ext import CASMO, _kernels

needs_kernel = pytest.mark.skipif(not casmo_ext.build_info()["cpu_kernel"], reason="casmo_ext._C not built")
BACKENDS = [
    pytest.param(dict(fused=True), marks=needs_kernel, id="kernel"),
    pytest.param(dict(fused=False), id="foreach"),
    pytest.param(dict(fused=False, foreach=False), id="reference"),
]
SHAPES = [(0,), (1,), (7,), (33, 5), (3, 4, 5), (40_001,), (2, 3, 1, 1)]


def rel_err(actual: torch.Tensor, expected: np.ndarray) -> float:
    """Norm-wise relative error; 0 for empty tensors."""
    if expected.size == 0:
        return 0.0
    diff = np.linalg.norm(actual.detach().double().numpy() - expected)
    return float(diff / max(np.linalg.norm(expected), 1e-30))


def make_groups(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(shape, generator=gen).to(dtype) for shape in SHAPES]
    groups = [
        {"params": params[:4]},
        {"params": params[4:], "lr": 3e-3, "weight_decay": 0.05, "c_min": 0.3, "rel_floor": 0.2},
    ]
    return groups


def gradients(groups, step, dtype, gen):
    """Per group, per tensor: a gradient with a drift (so AGAR is not trivial), or None
    on some steps for some tensors (they are skipped)."""
    grads = []
    for gi, group in enumerate(groups):
        row = []
        for i, p in enumerate(group["params"]):
            if (i + step + gi) % 4 == 3:
                row.append(None)
            else:
                row.append((0.3 * (i % 3 - 1) + torch.randn(p.shape, generator=gen)).to(dtype))
        grads.append(row)
    return grads


def run_against_spec(dtype, backend, robustness, steps):
    groups = make_groups(dtype)
    defaults = dict(lr=1e-2, betas=(0.5, 0.999), weight_decay=0.01, robustness=robustness)
    spec = SpecOptimizer(groups, defaults)
    torch_groups = [{**g, "params": [p.clone().requires_grad_() for p in g["params"]]} for g in groups]
    opt = CASMO(torch_groups, **backend, **defaults)
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        grads = gradients(torch_groups, step, dtype, gen)
        for group, group_grads in zip(torch_groups, grads):
            for p, g in zip(group["params"], group_grads):
                p.grad = g
        opt.step()
        spec.step([[None if g is None else g.double().numpy() for g in row] for row in grads])
    return opt, torch_groups, spec


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("robustness", [0.0, 0.5, 1.0])
def test_float32_matches_float64_spec(backend, robustness):
    opt, groups, spec = run_against_spec(torch.float32, backend, robustness, steps=30)
    for group, spec_group in zip(groups, spec.groups):
        for p, expected in zip(group["params"], spec_group["params"]):
            assert p.dtype == torch.float32
            assert rel_err(p, expected) < 1e-5
    for gi in range(2):
        metrics = opt.group_metrics(gi)
        agar, confidence = spec.metrics[gi]
        assert metrics["agar"] == pytest.approx(agar, rel=1e-4)
        assert metrics["confidence"] == pytest.approx(confidence, rel=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_tracks_spec(backend, dtype):
    opt, groups, spec = run_against_spec(dtype, backend, 0.5, steps=10)
    for group, spec_group in zip(groups, spec.groups):
        for p, expected in zip(group["params"], spec_group["params"]):
            assert p.dtype == dtype
            assert opt.state[p]["m"].dtype == dtype and opt.state[p]["s"].dtype == dtype
            assert rel_err(p, expected) < 2e-2


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernel_matches_reference_elementwise(dtype):
    """Every element of p, m and s changes each step, so one the kernel failed to write
    would keep its old value and show here."""
    torch.manual_seed(0)
    shapes = [(1,), (5,), (32_768,), (32_769,), (100_003,), (17, 3)]
    base = [torch.randn(s).to(dtype) for s in shapes]
    kernel_params = [p.clone().requires_grad_() for p in base]
    reference_params = [p.clone().requires_grad_() for p in base]
    kernel = CASMO(kernel_params, lr=1e-2, weight_decay=0.1, fused=True)
    reference = CASMO(reference_params, lr=1e-2, weight_decay=0.1, fused=False)
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    for _ in range(3):
        before = [p.detach().clone() for p in kernel_params]
        for a, b in zip(kernel_params, reference_params):
            a.grad = torch.randn(a.shape).to(dtype) + 0.5
            b.grad = a.grad.clone()
        kernel.step()
        reference.step()
        for a, b, old in zip(kernel_params, reference_params, before):
            assert not torch.equal(a, old) or dtype != torch.float32
            for x, y in [(a, b), (kernel.state[a]["m"], reference.state[b]["m"])]:
                torch.testing.assert_close(x.float(), y.float(), rtol=tol, atol=tol * y.abs().max().item())
    for key in ("agar", "confidence"):
        assert kernel.group_metrics()[key] == pytest.approx(reference.group_metrics()[key], rel=tol)


@needs_kernel
def test_kernel_deterministic_across_thread_counts():
    base = [torch.randn(300_001), torch.randn(1000), torch.randn(77, 77)]
    grads = [torch.randn_like(p) + 0.1 for p in base]
    results = []
    threads = torch.get_num_threads()
    try:
        # Threads claim chunks as they go, so repeated runs hand out chunks differently.
        for n in (1, 2, 3, 2, 3):
            torch.set_num_threads(n)
            params = [p.clone().requires_grad_() for p in base]
            opt = CASMO(params, fused=True)
            for _ in range(2):
                for p, g in zip(params, grads):
                    p.grad = g.clone()
                opt.step()
            results.append(([p.detach().clone() for p in params], opt.group_metrics()))
    finally:
        torch.set_num_threads(threads)
    for params, metrics in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(params, results[0][0]))
        assert metrics == results[0][1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_spec_invariants(backend):
    """AGAR does not depend on the gradient scale; robustness 0 with rel_floor 1 is
    AdamW with the denominator sqrt(m_hat^2 + s_hat)."""
    torch.manual_seed(3)
    grads = [torch.randn(50) + 0.2 for _ in range(4)]
    metrics = []
    for scale in (1.0, 1000.0):
        p = torch.zeros(50, requires_grad=True)
        opt = CASMO([p], **backend)
        for g in grads:
            p.grad = g * scale
            opt.step()
        metrics.append(opt.group_metrics()["agar"])
    assert metrics[0] == pytest.approx(metrics[1], rel=1e-5)

    p = torch.zeros(50, requires_grad=True)
    opt = CASMO([p], lr=0.1, betas=(0.5, 0.9), robustness=0.0, rel_floor=1.0, weight_decay=0.1, **backend)
    expected, m, s = np.zeros(50), np.zeros(50), np.zeros(50)
    for t, g in enumerate(grads, start=1):
        p.grad = g.clone()
        opt.step()
        g = g.double().numpy()
        d = g - m  # the deviation from the previous mean
        m = 0.5 * m + 0.5 * g
        s = 0.9 * s + 0.1 * d * d
        m_hat, s_hat = m / (1 - 0.5**t), s / (1 - 0.9**t)
        expected = expected * (1 - 0.1 * 0.1) - 0.1 * m_hat / (np.sqrt(m_hat**2 + s_hat) + 1e-8)
    assert rel_err(p, expected) < 1e-5
    assert opt.group_metrics()["confidence"] == pytest.approx(1.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_none_is_skipped_and_metrics_start_empty(backend):
    a, b = torch.ones(3, requires_grad=True), torch.ones(4, requires_grad=True)
    opt = CASMO([a, b], **backend)
    assert opt.group_metrics() == {"agar": None, "confidence": None}
    a.grad = torch.ones(3)
    opt.step()
    assert torch.equal(b, torch.ones(4)) and len(opt.state[b]) == 0
    assert opt.state[a]["step"] == 1
    assert opt.group_metrics()["agar"] is not None


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_layout_and_public_checkpoint_continue_the_same_trajectory(backend):
    torch.manual_seed(0)
    grads = [torch.randn(6, 5) for _ in range(8)]
    model = torch.nn.Linear(5, 6, bias=False)
    straight = copy.deepcopy(model)
    opt = CASMO(model.parameters(), lr=1e-2, **backend)
    straight_opt = CASMO(straight.parameters(), lr=1e-2, **backend)
    for g in grads[:4]:
        for m, o in ((model, opt), (straight, straight_opt)):
            m.weight.grad = g.clone()
            o.step()
    saved = opt.state_dict()
    state = saved["state"][0]
    assert set(state) == {"step", "m", "s"} and type(state["step"]) is int and state["step"] == 4
    # The public package's layout: the same state, param_groups without our extra keys.
    public = copy.deepcopy(saved)
    for group in public["param_groups"]:
        for key in ("capturable", "foreach", "maximize", "differentiable"):
            group.pop(key)
    resumed = copy.deepcopy(model)
    resumed_opt = CASMO(resumed.parameters(), lr=1e-2, **backend)
    resumed_opt.load_state_dict(public)
    for g in grads[4:]:
        for m, o in ((resumed, resumed_opt), (straight, straight_opt)):
            m.weight.grad = g.clone()
            o.step()
    assert torch.equal(resumed.weight, straight.weight)
    assert resumed_opt.state_dict()["state"][0]["step"] == 8


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"lr": -1.0}, "learning rate"),
        ({"eps": -1e-8}, "epsilon"),
        ({"betas": (1.0, 0.999)}, "beta1"),
        ({"betas": (0.9, -0.1)}, "beta2"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"c_min": 1.5}, "c_min"),
        ({"robustness": -0.5}, "robustness"),
        ({"rel_floor": 2.0}, "rel_floor"),
    ],
)
def test_invalid_hyperparameters_raise_value_error_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=name):
        CASMO([torch.zeros(1, requires_grad=True)], **kwargs)
    with pytest.raises(ValueError, match=name):  # a per-group override is checked too
        CASMO([{"params": [torch.zeros(1, requires_grad=True)], **kwargs}])


def test_unknown_and_retired_keywords():
    with pytest.raises(TypeError, match="unexpected keyword argument 'learning_rate'"):
        CASMO([torch.zeros(1, requires_grad=True)], learning_rate=0.1)
    for key, value in [("tau_init_steps", 100), ("granularity", "group"), ("total_steps", 10)]:
        with pytest.warns(DeprecationWarning, match=key):
            CASMO([torch.zeros(1, requires_grad=True)], **{key: value})


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_gradient_raises(backend):
    p = torch.zeros(4, 2, requires_grad=True)
    opt = CASMO([p], **backend)
    p.grad = torch.zeros(4, 2).to_sparse()
    with pytest.raises(NotImplementedError, match="sparse"):
        opt.step()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_guard_raises_and_leaves_everything_untouched(backend, bad):
    good = torch.randn(5, requires_grad=True)
    other = torch.randn(3, requires_grad=True)
    opt = CASMO([{"params": [good]}, {"params": [other]}], nan_guard=True, **backend)
    good.grad, other.grad = torch.ones(5), torch.ones(3)
    opt.step()
    before = (good.detach().clone(), other.detach().clone(), copy.deepcopy(opt.state_dict()))
    good.grad = torch.ones(5)
    other.grad = torch.tensor([1.0, bad, 1.0])
    with pytest.raises(RuntimeError, match="Non-finite .* group 1"):
        opt.step()
    assert torch.equal(good, before[0]) and torch.equal(other, before[1])
    after = opt.state_dict()
    for key, state in before[2]["state"].items():
        assert after["state"][key]["step"] == state["step"]
        assert torch.equal(after["state"][key]["m"], state["m"])
        assert torch.equal(after["state"][key]["s"], state["s"])


def test_missing_kernel_falls_back_to_reference_with_one_warning(monkeypatch):
    monkeypatch.setattr(_kernels, "_C", None)
    monkeypatch.setattr(_kernels, "_IMPORT_ERROR", ImportError("not built"))
    monkeypatch.setattr(_kernels, "_warned", False)
    p = torch.ones(3, requires_grad=True)
    expected = torch.ones(3, requires_grad=True)
    opt, reference = CASMO([p]), CASMO([expected], fused=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            p.grad, expected.grad = torch.ones(3), torch.ones(3)
            opt.step()
            reference.step()
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "pip install -e . --no-build-isolation" in messages[0]
    assert torch.equal(p, expected)
    with pytest.raises(RuntimeError, match="compiled kernels"):
        CASMO([p], fused=True)


@needs_kernel
def test_kernel_rejects_bad_tensor_lists_clearly():
    p = torch.zeros(4, 4)
    g, m, s = torch.zeros(4, 4), torch.zeros(4, 4), torch.zeros(4, 4)
    hyper = (1e-3, 0.9, 0.999, 1e-8, 0.0, 0.1, 0.5, 0.1)
    with pytest.raises(RuntimeError, match="dtype"):
        _kernels._C.cpu_step([p], [g.double()], [m], [s], [1.0], *hyper)
    with pytest.raises(RuntimeError, match="does not match its parameter"):
        _kernels._C.cpu_step([p], [g.t()], [m], [s], [1.0], *hyper)
    with pytest.raises(RuntimeError, match="gaps or overlaps"):
        _kernels._C.cpu_step([p[:, :2]], [g[:, :2]], [m[:, :2]], [s[:, :2]], [1.0], *hyper)
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        _kernels._C.cpu_step([p.double()], [g.double()], [m.double()], [s.double()], [1.0], *hyper)


@pytest.mark.parametrize("backend", BACKENDS)
def test_transposed_gradient_and_float64_params_are_handled(backend):
    """A gradient with other strides than its parameter is copied to the parameter's
    layout; float64 parameters take the reference path."""
    p = torch.randn(4, 6, requires_grad=True)
    twin = p.detach().clone().requires_grad_()
    opt, reference = CASMO([p], **backend), CASMO([twin], fused=False)
    g = torch.randn(6, 4)
    p.grad, twin.grad = g.t(), g.t().contiguous()
    opt.step()
    reference.step()
    torch.testing.assert_close(p, twin)
    q = torch.randn(5, dtype=torch.float64, requires_grad=True)
    opt64 = CASMO([q], **backend)
    q.grad = torch.ones(5, dtype=torch.float64)
    opt64.step()
    # First step: d = g (taken before m moves), so s_hat = g^2 = m_hat^2 and AGAR = 1/2.
    assert q.dtype == torch.float64 and opt64.group_metrics()["agar"] == pytest.approx(0.5)
