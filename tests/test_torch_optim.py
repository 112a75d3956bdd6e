"""CASMO as a torch.optim citizen: torch's keywords (foreach, maximize, differentiable),
edge cases of groups, lr tensors and CUDA-graph capture, non-finite gradients on every
backend, LR schedulers and optimizer hooks, float32 moments for 16-bit parameters."""

from __future__ import annotations

import copy

import pytest
import torch
from backends import BACKENDS, needs_emulation, needs_kernel
from torch.utils._python_dispatch import TorchDispatchMode

from casmo_ext import CASMO, _kernels, casmo_step_reference
from casmo_ext.foreach import casmo_step_foreach

HYPER = dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, c_min=0.1, robustness=0.5, rel_floor=0.1)


def make_tensors(sizes, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    return [(0.3 + torch.randn(n, generator=gen)).to(dtype) for n in sizes]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("capturable", [False, True])
def test_foreach_step_matches_the_reference(dtype, capturable):
    """Tensors with different step counts, an empty one, a tensor lr."""
    sizes = [5, 0, 300, 1]
    params = make_tensors(sizes, dtype, 0)
    ms, ss = [torch.zeros(n, dtype=dtype) for n in sizes], [torch.zeros(n, dtype=dtype) for n in sizes]
    twins = [[t.clone() for t in ts] for ts in (params, ms, ss)]
    lr = torch.tensor(1e-2, dtype=torch.float64)
    for step in range(1, 4):
        grads = make_tensors(sizes, dtype, step)
        counts = [step + i for i in range(len(sizes))]
        if capturable:
            counts = [torch.tensor(float(c)) for c in counts]
        sums = casmo_step_foreach(params, grads, ms, ss, counts, lr=lr, **HYPER)
        expected_sums = casmo_step_reference(*twins[:1], grads, *twins[1:], counts, lr=lr, **HYPER)
        torch.testing.assert_close(sums, expected_sums, rtol=1e-6, atol=0)
    for actual, expected in zip(params + ms + ss, sum(twins, [])):
        torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-7)


def test_foreach_keyword_values():
    p = torch.ones(3, requires_grad=True)
    for foreach in (None, False, True):
        CASMO([p], foreach=foreach)
    with pytest.raises(ValueError, match="`fused` and `foreach` cannot both be True"):
        CASMO([p], fused=True, foreach=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_maximize_steps_with_the_negated_gradient(backend):
    torch.manual_seed(0)
    p = torch.randn(40, requires_grad=True)
    ascending, descending = p.detach().clone().requires_grad_(), p.detach().clone().requires_grad_()
    up = CASMO([ascending], lr=1e-2, maximize=True, **backend)
    down = CASMO([descending], lr=1e-2, **backend)
    for _ in range(3):
        g = torch.randn(40) + 0.5
        ascending.grad, descending.grad = g.clone(), -g
        up.step()
        down.step()
    assert torch.equal(ascending, descending)
    assert not torch.equal(ascending, p)
    assert torch.equal(up.state[ascending]["m"], down.state[descending]["m"])


def test_differentiable_only_false():
    p = torch.ones(3, requires_grad=True)
    CASMO([p], differentiable=False)
    with pytest.raises(NotImplementedError, match="differentiable=False"):
        CASMO([p], differentiable=True)


def test_invalid_param_group_is_not_kept():
    opt = CASMO([torch.ones(3, requires_grad=True)])
    with pytest.raises(ValueError, match="learning rate"):
        opt.add_param_group({"params": [torch.ones(2, requires_grad=True)], "lr": -1.0})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": [torch.ones(2, requires_grad=True)], "lr": 0.5})
    assert len(opt.param_groups) == 2 and opt.param_groups[1]["lr"] == 0.5


@pytest.mark.parametrize("backend", BACKENDS)
def test_metrics_of_a_group_of_empty_tensors(backend):
    empty, full = torch.ones(0, requires_grad=True), torch.ones(3, requires_grad=True)
    opt = CASMO([{"params": [empty]}, {"params": [full]}], **backend)
    empty.grad, full.grad = torch.ones(0), torch.ones(3)
    opt.step()
    assert opt.group_metrics(0) == {"agar": None, "confidence": None}
    assert opt.group_metrics(1)["agar"] == pytest.approx(0.5)
    assert opt.state[empty]["step"] == 1


def test_capturable_lr_on_another_device_is_refused_clearly():
    p = torch.ones(3, requires_grad=True)
    opt = CASMO([p], lr=torch.tensor(1e-3), capturable=True)
    opt.param_groups[0]["lr"] = torch.tensor(1e-3, device="meta")  # a device other than p's
    p.grad = torch.ones(3)
    with pytest.raises(ValueError, match=r"lr tensor on the parameters' device \(cpu\)"):
        opt.step()
    assert torch.equal(p, torch.ones(3)) and len(opt.state[p]) == 0


@pytest.mark.parametrize("capturable", [False, True])
def test_lr_tensor_steps_as_the_float(capturable):
    p, q = torch.ones(4, requires_grad=True), torch.ones(4, requires_grad=True)
    with_tensor = CASMO([p], lr=torch.tensor(0.1, dtype=torch.float64), capturable=capturable)
    with_float = CASMO([q], lr=0.1)
    for _ in range(2):
        p.grad, q.grad = torch.arange(4.0), torch.arange(4.0)
        with_tensor.step()
        with_float.step()
    torch.testing.assert_close(p, q)


def test_capture_of_a_non_capturable_step_is_refused(monkeypatch):
    p = torch.ones(3, requires_grad=True)
    opt = CASMO([p])
    p.grad = torch.ones(3)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="capturable=True"):
        opt.step()
    assert torch.equal(p, torch.ones(3)) and len(opt.state[p]) == 0
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    opt.step()
    assert not torch.equal(p, torch.ones(3))


class HostDataTensors(TorchDispatchMode):
    """Records the operators that make a tensor of host (Python) data: on a GPU, a copy from
    pageable memory, which synchronises and which CUDA graph capture refuses."""

    def __init__(self):
        super().__init__()
        self.made = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.lift_fresh.default, torch.ops.aten.lift_fresh_copy.default):
            self.made.append(func)
        return func(*args, **(kwargs or {}))


def assert_step_tensor(step, value, device):
    assert isinstance(step, torch.Tensor) and step.dtype == torch.float32 and step.device == device
    assert step.item() == value


@pytest.mark.parametrize("backend", BACKENDS)
def test_capturable_step_counts_are_made_on_the_device(backend):
    """As torch's Adam makes them (torch.zeros on the device), not from host data."""
    p = torch.nn.Parameter(torch.ones(5))
    opt = CASMO([p], capturable=True, **backend)
    p.grad = torch.ones(5)
    with HostDataTensors() as host:
        opt.step()
        opt.step()
    assert host.made == []
    assert_step_tensor(opt.state[p]["step"], 2, p.device)


@pytest.mark.parametrize("backend", BACKENDS)
def test_capturable_group_loads_int_steps_as_device_tensors(backend):
    """A checkpoint with int steps (the public package's, a non-capturable run's) loaded for
    a capturable group gives float32 step tensors on the parameters' device, made without
    host data, as torch's Adam loads them: converted at the first step instead, they would
    be converted inside a CUDA graph capture, whose replays would reset them."""
    p = torch.nn.Parameter(torch.ones(5))
    source = CASMO([p], **backend)
    p.grad = torch.ones(5)
    source.step()
    source.step()
    saved = source.state_dict()
    assert type(saved["state"][0]["step"]) is int
    saved["param_groups"][0]["capturable"] = True  # loaded groups take the checkpoint's options
    opt = CASMO([p], capturable=True, **backend)
    with HostDataTensors() as host:
        opt.load_state_dict(saved)
        assert_step_tensor(opt.state[p]["step"], 2, p.device)
        opt.step()
    assert host.made == []
    assert_step_tensor(opt.state[p]["step"], 3, p.device)
    assert opt.state_dict()["state"][0]["step"].item() == 3  # capturable checkpoints keep tensors


def kernel_step(ps, gs, ms, ss, steps, *, lr, **hyper):
    return _kernels._C.cpu_step(ps, gs, ms, ss, [float(s) for s in steps], lr, *hyper.values())


def scalar_kernel_step(ps, gs, ms, ss, steps, *, lr, **hyper):
    return _kernels._C.cpu_scalar_step(ps, gs, ms, ss, [float(s) for s in steps], lr, *hyper.values())


def emulated_step(ps, gs, ms, ss, steps, *, lr, **hyper):
    float_steps = [float(s) for s in steps]
    return _kernels._C.cuda_emulated_step(ps, gs, ms, ss, float_steps, [], lr, None, *hyper.values(), 64)


STEP_FUNCTIONS = [
    pytest.param(casmo_step_reference, id="reference"),
    pytest.param(casmo_step_foreach, id="foreach"),
    pytest.param(kernel_step, marks=needs_kernel, id="kernel"),
    pytest.param(scalar_kernel_step, marks=needs_kernel, id="kernel-scalar"),
    pytest.param(emulated_step, marks=needs_emulation, id="emulated"),
]


@pytest.mark.parametrize("step_fn", STEP_FUNCTIONS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("robustness", [0.0, 0.5])
def test_non_finite_gradient_spoils_its_tensor_only(step_fn, bad, robustness):
    """docs/casmo_spec.md: without nan_guard, a non-finite gradient element makes its own
    m and s non-finite and its tensor's A NaN, so every element of that tensor becomes
    NaN; other tensors step as if it were not there."""
    sizes = [257, 100]
    params, ms = make_tensors(sizes, torch.float32, 0), make_tensors(sizes, torch.float32, 1)
    ss = [m.abs() for m in ms]
    grads = make_tensors(sizes, torch.float32, 2)
    grads[0][100] = bad
    hyper = {**HYPER, "robustness": robustness}
    clean = [t[1].clone() for t in (params, ms, ss)]
    casmo_step_reference([clean[0]], [grads[1]], [clean[1]], [clean[2]], [3], lr=1e-2, **hyper)
    sums = step_fn(params, grads, ms, ss, [3, 3], lr=1e-2, **hyper)
    assert torch.isnan(params[0]).all() and torch.isnan(sums).all()
    for moment in (ms[0], ss[0]):
        assert (~torch.isfinite(moment)).nonzero().flatten().tolist() == [100]
    for actual, expected in zip((params[1], ms[1], ss[1]), clean):
        torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-7)


def train(opt, param, steps, scheduler=None):
    gen = torch.Generator().manual_seed(3)
    for _ in range(steps):
        param.grad = (torch.randn(param.shape, generator=gen) + 0.2).to(param.dtype)
        opt.step()
        if scheduler is not None:
            scheduler.step()


def test_step_lr_scheduler_changes_lr_between_steps():
    """StepLR halving lr every 2 steps gives the trajectory of lr set by hand."""
    p, q = torch.ones(8, requires_grad=True), torch.ones(8, requires_grad=True)
    scheduled = CASMO([p], lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(scheduled, step_size=2, gamma=0.5)
    by_hand = CASMO([q], lr=0.1)
    gen = torch.Generator().manual_seed(3)
    for i in range(6):
        g = torch.randn(8, generator=gen) + 0.2
        p.grad, q.grad = g.clone(), g.clone()
        by_hand.param_groups[0]["lr"] = 0.1 * 0.5 ** (i // 2)
        scheduled.step()
        by_hand.step()
        scheduler.step()
    assert scheduled.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)
    assert torch.equal(p, q)
    constant = torch.ones(8, requires_grad=True)
    train(CASMO([constant], lr=0.1), constant, 6)
    assert not torch.allclose(constant, p)


def test_scheduler_and_optimizer_checkpoint_resume_the_same_run():
    p = torch.ones(8, requires_grad=True)
    opt = CASMO([p], lr=0.1)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    train(opt, p, 3, scheduler)
    saved = (p.detach().clone(), copy.deepcopy(opt.state_dict()), scheduler.state_dict())
    train(opt, p, 3, scheduler)
    q = saved[0].clone().requires_grad_()
    resumed = CASMO([q], lr=0.1)
    resumed_scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(resumed, T_max=10)
    resumed.load_state_dict(saved[1])
    resumed_scheduler.load_state_dict(saved[2])
    train(resumed, q, 3, resumed_scheduler)
    assert resumed.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    assert torch.equal(p, q)


def test_step_hooks_run_around_each_step():
    p = torch.ones(3, requires_grad=True)
    opt = CASMO([p])
    seen = []
    pre = opt.register_step_pre_hook(lambda o, args, kwargs: seen.append(("pre", p.detach().clone())))
    opt.register_step_post_hook(lambda o, args, kwargs: seen.append(("post", p.detach().clone())))
    p.grad = torch.ones(3)
    opt.step()
    assert [name for name, _ in seen] == ["pre", "post"]
    assert torch.equal(seen[0][1], torch.ones(3)) and not torch.equal(seen[1][1], torch.ones(3))
    pre.remove()
    opt.step()
    assert [name for name, _ in seen] == ["pre", "post", "post"]


def test_state_dict_hooks():
    p = torch.ones(3, requires_grad=True)
    opt = CASMO([p])
    p.grad = torch.ones(3)
    opt.step()

    def tag(optimizer, state_dict):
        state_dict["tag"] = "casmo"
        return state_dict

    def scale_lr(optimizer, state_dict):
        state_dict = copy.deepcopy(state_dict)
        state_dict["param_groups"][0]["lr"] *= 10
        return state_dict

    opt.register_state_dict_post_hook(tag)
    saved = opt.state_dict()
    assert saved["tag"] == "casmo" and saved["state"][0]["step"] == 1
    loaded = CASMO([torch.ones(3, requires_grad=True)])
    loaded.register_load_state_dict_pre_hook(scale_lr)
    after = []
    loaded.register_load_state_dict_post_hook(lambda o: after.append(o.param_groups[0]["lr"]))
    loaded.load_state_dict(saved)
    assert after == [pytest.approx(1e-2)] and loaded.param_groups[0]["lr"] == pytest.approx(1e-2)


def noisy_then_quiet(float32_moments, backend):
    """s after a phase of zero-mean noise, and after 200 further steps of zero gradient,
    in which s should decay by beta2 = 0.999 per step."""
    p = torch.zeros(256, dtype=torch.bfloat16, requires_grad=True)
    opt = CASMO([p], lr=1e-4, float32_moments=float32_moments, **backend)
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):
        p.grad = torch.randn(256, generator=gen).sign().to(torch.bfloat16)
        opt.step()
    after_noise = opt.state[p]["s"].float().clone()
    for _ in range(200):
        p.grad = torch.zeros(256, dtype=torch.bfloat16)
        opt.step()
    return opt.state[p], after_noise


@pytest.mark.parametrize("backend", BACKENDS)
def test_bfloat16_s_ratchets_without_float32_moments_and_decays_with_them(backend):
    state, after_noise = noisy_then_quiet(False, backend)
    assert state["m"].dtype == state["s"].dtype == torch.bfloat16
    assert (state["s"].float() >= after_noise).all()  # 0.1% is under half a bf16 ulp
    state, after_noise = noisy_then_quiet(True, backend)
    assert state["m"].dtype == state["s"].dtype == torch.float32
    torch.testing.assert_close(state["s"], after_noise * 0.999**200, rtol=2e-2, atol=0)


def test_float32_moments_step_as_the_float32_reference():
    """The step with float32 moments is the reference's with the moments kept in float32."""
    p = torch.randn(64).to(torch.bfloat16).requires_grad_()
    m, s, twin = torch.zeros(64), torch.zeros(64), p.detach().clone()
    opt = CASMO([p], lr=1e-2, weight_decay=0.01, float32_moments=True, foreach=False)
    for step in range(1, 4):
        g = torch.randn(64).to(torch.bfloat16)
        p.grad = g
        opt.step()
        casmo_step_reference([twin], [g], [m], [s], [step], lr=1e-2, **{**HYPER, "weight_decay": 0.01})
    assert torch.equal(opt.state[p]["m"], m) and torch.equal(opt.state[p]["s"], s)
    assert torch.equal(p.detach(), twin)


def test_float32_moments_survive_a_checkpoint():
    """torch casts loaded state to the parameter's dtype; float32 moments stay float32
    and the resumed run continues the same trajectory."""
    p = torch.randn(32).to(torch.bfloat16).requires_grad_()
    opt = CASMO([p], lr=1e-2, float32_moments=True)
    train(opt, p, 2)
    saved = (p.detach().clone(), copy.deepcopy(opt.state_dict()))
    train(opt, p, 2)
    q = saved[0].clone().requires_grad_()
    resumed = CASMO([q], lr=1e-2, float32_moments=True)
    resumed.load_state_dict(saved[1])
    assert resumed.state[q]["s"].dtype == torch.float32
    assert torch.equal(resumed.state[q]["s"], saved[1]["state"][0]["s"])
    train(resumed, q, 2)
    assert torch.equal(p, q) and torch.equal(opt.state[p]["m"], resumed.state[q]["m"])
