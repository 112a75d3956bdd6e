"""CASMO under torch.amp.GradScaler, on the CPU: the step unscales the gradients itself
(the scaler's `grad_scale`) and skips a step with an inf gradient (its `found_inf`),
on every backend, and the emulated CUDA kernels do the same."""

from __future__ import annotations

import copy

import pytest
import torch
from backends import BACKENDS, needs_emulation, needs_kernel

from casmo_ext import CASMO, _kernels


def make_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def batch(step):
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(8, 12, generator=gen), torch.randn(8, 3, generator=gen)


def loss_of(model, step):
    x, y = batch(step)
    return torch.nn.functional.mse_loss(model(x), y)


def train(backend, steps, scaler=None, clip=None):
    model = make_model()
    opt = CASMO(model.parameters(), lr=1e-2, weight_decay=0.01, **backend)
    for step in range(steps):
        opt.zero_grad()
        loss = loss_of(model, step)
        if scaler is None:
            loss.backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            continue
        scaler.scale(loss).backward()
        if clip is not None:
            scaler.unscale_(opt)  # the step then gets grad_scale=None and only found_inf
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        scaler.step(opt)
        scaler.update()
    return model, opt


def assert_same_training(a, b, atol):
    (model_a, opt_a), (model_b, opt_b) = a, b
    for p, q in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=atol)
        for key in ("m", "s"):
            torch.testing.assert_close(opt_a.state[p][key], opt_b.state[q][key], rtol=0, atol=atol)
        assert opt_a.state[p]["step"] == opt_b.state[q]["step"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_scaler_training_equals_unscaled_training(backend):
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=2)
    scaled = train(backend, 6, scaler)
    assert scaler.get_scale() > 2.0**12  # it grew (no step was skipped), so the scale varied
    assert_same_training(scaled, train(backend, 6), atol=1e-5)
    assert scaled[1].group_metrics()["agar"] == pytest.approx(train(backend, 6)[1].group_metrics()["agar"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_scaler_after_unscale_and_clipping(backend):
    """After the user's unscale_, the scaler passes no grad_scale: not unscaled twice."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    assert_same_training(train(backend, 4, scaler, clip=0.05), train(backend, 4, clip=0.05), atol=1e-5)


def snapshot(model, opt):
    state = [
        {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in opt.state[p].items()}
        for p in model.parameters()
    ]
    return [p.detach().clone() for p in model.parameters()], state, opt.group_metrics()


@pytest.mark.parametrize("backend", BACKENDS)
def test_inf_gradient_step_is_skipped_leaving_everything(backend):
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    model, opt = train(backend, 3, scaler)
    before = snapshot(model, opt)
    opt.zero_grad()
    scaler.scale(loss_of(model, 3)).backward()
    next(model.parameters()).grad[0, 0] = float("inf")
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 2.0**9  # the scaler saw the inf
    after = snapshot(model, opt)
    for p, q in zip(before[0], after[0]):
        assert torch.equal(p, q)
    for saved, now in zip(before[1], after[1]):
        assert saved["step"] == now["step"] == 3
        assert torch.equal(saved["m"], now["m"]) and torch.equal(saved["s"], now["s"])
    assert after[2] == before[2] and before[2]["agar"] is not None
    opt.zero_grad()
    scaler.scale(loss_of(model, 4)).backward()
    scaler.step(opt)
    assert all(opt.state[p]["step"] == 4 for p in model.parameters())
    assert not torch.equal(next(model.parameters()), before[0][0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_skipped_first_step_changes_nothing(backend):
    """A first step skipped: the new state is zeros at step 0 and the metrics stay None."""
    p = torch.nn.Parameter(torch.ones(5))
    opt = CASMO([p], **backend)
    p.grad = torch.full((5,), float("nan"))
    opt.grad_scale, opt.found_inf = torch.tensor(8.0), torch.tensor(1.0)
    opt.step()
    assert torch.equal(p, torch.ones(5)) and opt.state[p]["step"] == 0
    assert not opt.state[p]["m"].any() and opt.group_metrics() == {"agar": None, "confidence": None}


def test_nan_guard_leaves_non_finite_gradients_to_the_scaler():
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    model = make_model()
    opt = CASMO(model.parameters(), nan_guard=True)
    scaler.scale(loss_of(model, 0)).backward()
    next(model.parameters()).grad[0, 0] = float("nan")
    scaler.step(opt)  # no RuntimeError: the scaler skips this step
    assert all(opt.state[p]["step"] == 0 for p in model.parameters())
    model.zero_grad()
    loss_of(model, 0).backward()
    next(model.parameters()).grad[0, 0] = float("nan")
    with pytest.raises(RuntimeError, match="Non-finite"):
        opt.step()


def test_bad_found_inf_is_refused_clearly():
    p = torch.nn.Parameter(torch.ones(3))
    opt = CASMO([p])
    p.grad = torch.ones(3)
    opt.found_inf = 1.0
    with pytest.raises(TypeError, match="found_inf must be a one-element tensor"):
        opt.step()


def test_state_dict_steps_stay_ints_under_a_scaler():
    scaler = torch.amp.GradScaler("cpu")
    model, opt = train(dict(), 2, scaler)
    saved = copy.deepcopy(opt.state_dict())
    assert all(type(s["step"]) is int and s["step"] == 2 for s in saved["state"].values())


HYPER = (0.9, 0.999, 1e-8, 0.01, 0.1, 0.5, 0.1)  # beta1 ... rel_floor, the kernels' order


def kernel_tensors(sizes, seed):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(n, generator=gen) for n in sizes]
    return params, [p.abs() * 0.1 for p in params], [p.abs() * 0.01 for p in params]


def op_step(ps, gs, ms, ss, grad_scale=None, found_inf=None):
    return torch.ops.casmo_ext.step_(
        ps, gs, ms, ss, [3.0] * len(ps), [], 1e-2, None, *HYPER, grad_scale, found_inf
    )


def emulated_step(ps, gs, ms, ss, grad_scale=None, found_inf=None):
    return _kernels._C.cuda_emulated_step(
        ps, gs, ms, ss, [3.0] * len(ps), [], 1e-2, None, *HYPER, 64, grad_scale, found_inf
    )


@pytest.mark.parametrize(
    "step_fn",
    [
        pytest.param(op_step, marks=needs_kernel, id="kernel"),
        pytest.param(emulated_step, marks=needs_emulation, id="emulated"),
    ],
)
def test_kernels_unscale_and_skip(step_fn):
    sizes = [300, 7, 0]
    grads = [torch.randn(n) for n in sizes]
    plain, scaled, skipped = kernel_tensors(sizes, 0), kernel_tensors(sizes, 0), kernel_tensors(sizes, 0)
    expected = step_fn(*plain[:1], grads, *plain[1:])
    scaled_grads = [g * 512 for g in grads]
    sums = step_fn(*scaled[:1], scaled_grads, *scaled[1:], grad_scale=torch.tensor(512.0))
    torch.testing.assert_close(sums, expected, rtol=1e-6, atol=0)
    for actual, wanted in zip(sum(scaled, []), sum(plain, [])):
        torch.testing.assert_close(actual, wanted, rtol=1e-6, atol=1e-7)
    assert all(torch.equal(g, wanted) for g, wanted in zip(scaled_grads, grads))  # unscaled in place
    scale, found_inf = torch.tensor(512.0), torch.tensor(1.0)
    inf_grads = [g * float("inf") for g in grads]
    inf_before = [g.clone() for g in inf_grads]
    sums = step_fn(*skipped[:1], inf_grads, *skipped[1:], grad_scale=scale, found_inf=found_inf)
    assert torch.equal(sums, torch.zeros(2, dtype=torch.float64))
    for actual, original in zip(sum(skipped, []), sum(kernel_tensors(sizes, 0), [])):
        assert torch.equal(actual, original)
    for actual, original in zip(inf_grads, inf_before):  # a skipped step leaves the gradients
        torch.testing.assert_close(actual, original, rtol=0, atol=0, equal_nan=True)


class RecordsCopies(torch.Tensor):
    """A tensor that records the non_blocking flag of each copy of it by .to()."""

    non_blocking: list = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is torch.Tensor.to:
            cls.non_blocking.append((kwargs or {}).get("non_blocking", False))
        return super().__torch_function__(func, types, args, kwargs or {})


@pytest.mark.parametrize("backend", BACKENDS)
def test_scaler_values_reach_cpu_parameters_by_a_blocking_copy(backend, monkeypatch):
    """A CUDA GradScaler with CPU parameters: the step reads grad_scale and found_inf on the
    host at once, so their copies to the CPU must have landed (a non-blocking copy from a
    GPU may not have). Here on CPU tensors, the copies' flag is what can be checked."""
    monkeypatch.setattr(RecordsCopies, "non_blocking", [])
    p = torch.nn.Parameter(torch.ones(5))
    opt = CASMO([p], **backend)
    p.grad = torch.full((5,), 8.0)
    opt.grad_scale = torch.tensor(8.0).as_subclass(RecordsCopies)
    opt.found_inf = torch.tensor(0.0).as_subclass(RecordsCopies)
    opt.step()
    assert len(RecordsCopies.non_blocking) >= 2 and not any(RecordsCopies.non_blocking)
    assert opt.state[p]["step"] == 1


@pytest.mark.parametrize("maximize", [False, True], ids=["minimize", "maximize"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_scaler_step_leaves_the_true_gradients(backend, maximize):
    """As torch's fused Adam: after scaler.step, p.grad is the unscaled gradient (what norm
    logging and gradient-noise measures read), and a skipped step leaves it as it was."""
    model = make_model()
    twin = copy.deepcopy(model)
    opt = CASMO(model.parameters(), maximize=maximize, **backend)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(loss_of(model, 0)).backward()
    loss_of(twin, 0).backward()
    scaler.step(opt)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=0)
    scaler.update()
    opt.zero_grad()
    scaler.scale(loss_of(model, 1)).backward()
    next(model.parameters()).grad[0, 0] = float("inf")
    scaled = [p.grad.clone() for p in model.parameters()]
    scaler.step(opt)
    for p, before in zip(model.parameters(), scaled):
        assert torch.equal(p.grad, before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_stepped_as_copies_are_unscaled_too(backend):
    """A gradient laid out unlike its parameter is stepped as a copy; it is unscaled all
    the same."""
    p = torch.nn.Parameter(torch.ones(4, 6))
    opt = CASMO([p], **backend)
    grad = torch.arange(24.0).reshape(6, 4).t()
    p.grad = grad * 64
    assert p.grad.stride() != p.stride()
    opt.grad_scale, opt.found_inf = torch.tensor(64.0), torch.tensor(0.0)
    opt.step()
    assert torch.equal(p.grad, grad)
