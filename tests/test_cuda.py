"""The real CUDA kernels, through the optimizer (skipped without a GPU), and a check
that the build compiled them where CI expects it to."""

from __future__ import annotations

import contextlib
import copy
import os

import pytest
import torch
from closeness import assert_matches_reference

from casmo_ext import CASMO, build_info

needs_cuda = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not build_info()["cuda_kernel"], reason="built without the CUDA kernels"),
]

# Sizes around the GPU's chunk (65536 elements) and its round of loads (512 threads x 4),
# and an empty tensor.
SIZES = [(0,), (1,), (257,), (2049,), (65535,), (65537,), (3, 70001), (128, 64)]


def cuda_test(fn):
    for mark in needs_cuda:
        fn = mark(fn)
    return fn


@contextlib.contextmanager
def no_host_sync():
    """Raises on any operation that waits for the GPU inside the block."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def make_params(dtype, seed=0, sizes=SIZES):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen).to(dtype=dtype, device="cuda") for shape in sizes]


def make_grads(params, step, seed=0):
    gen = torch.Generator().manual_seed(1000 * seed + step)
    return [(0.3 + torch.randn(p.shape, generator=gen)).to(dtype=p.dtype, device="cuda") for p in params]


def run(optimizer_kwargs, dtype, num_steps=3, seed=0, grad_sign=1.0):
    params = [torch.nn.Parameter(p) for p in make_params(dtype, seed)]
    optimizer = CASMO(params, **optimizer_kwargs)
    for step in range(1, num_steps + 1):
        for p, g in zip(params, make_grads(params, step, seed)):
            p.grad = g * grad_sign
        optimizer.step()
    return params, optimizer


@cuda_test
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fused_matches_reference(dtype):
    kwargs = dict(lr=1e-2, weight_decay=0.01)
    fused, fused_opt = run({**kwargs, "fused": True}, dtype)
    reference, reference_opt = run({**kwargs, "fused": False}, dtype)
    for i, (p, q) in enumerate(zip(fused, reference)):
        assert_matches_reference(p, q, dtype, f"p[{i}]")
        fused_state, reference_state = fused_opt.state[p], reference_opt.state[q]
        for key in ("m", "s"):
            assert_matches_reference(fused_state[key], reference_state[key], dtype, f"{key}[{i}]")
    got, want = fused_opt.group_metrics(), reference_opt.group_metrics()
    for key in ("agar", "confidence"):
        assert got[key] == pytest.approx(want[key], rel=1e-5 if dtype == torch.float32 else 2e-3)


@cuda_test
def test_bitwise_deterministic():
    first, first_opt = run({"fused": True}, torch.float32)
    second, second_opt = run({"fused": True}, torch.float32)
    for p, q in zip(first, second):
        assert torch.equal(p, q)
        assert torch.equal(first_opt.state[p]["s"], second_opt.state[q]["s"])
    assert first_opt.group_metrics() == second_opt.group_metrics()


@cuda_test
def test_no_host_sync_in_step():
    for capturable in (False, True):
        params = [torch.nn.Parameter(p) for p in make_params(torch.float32)]
        lr = torch.tensor(1e-3, device="cuda") if capturable else 1e-3
        optimizer = CASMO(params, lr=lr, capturable=capturable, fused=True)
        for p, g in zip(params, make_grads(params, 1)):
            p.grad = g
        optimizer.step()  # creates the state
        with no_host_sync():
            optimizer.step()


def step_eager_and_replay(eager, eager_opt, graphed, graph, steps, seed):
    """Eager steps and replays of a captured step, with the same gradients."""
    for step in steps:
        for p, q, g in zip(eager, graphed, make_grads(eager, step, seed=seed)):
            p.grad = g.clone()
            q.grad.copy_(g)
        eager_opt.step()
        graph.replay()
    torch.cuda.synchronize()


@cuda_test
def test_capturable_step_in_a_cuda_graph():
    """A graphed capturable step replays to the same result as eager steps."""
    lr_value = 2e-3
    eager = [torch.nn.Parameter(p) for p in make_params(torch.float32, seed=3)]
    graphed = [torch.nn.Parameter(p.detach().clone()) for p in eager]
    eager_opt = CASMO(eager, lr=torch.tensor(lr_value, device="cuda"), capturable=True, fused=True)
    lr_tensor = torch.tensor(lr_value, device="cuda")
    graphed_opt = CASMO(graphed, lr=lr_tensor, capturable=True, fused=True)
    for p in graphed:
        p.grad = torch.zeros_like(p)

    # Warm up on a side stream (creates the state), then undo it: the warm-up step's
    # gradients were zero, but it moved the step counts and moments.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        graphed_opt.step()
    torch.cuda.current_stream().wait_stream(side)
    for p in graphed:
        state = graphed_opt.state[p]
        state["step"].zero_()
        state["m"].zero_()
        state["s"].zero_()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graphed_opt.step()

    step_eager_and_replay(eager, eager_opt, graphed, graph, range(1, 4), seed=3)
    for p, q in zip(eager, graphed):
        assert torch.equal(p, q)
        assert graphed_opt.state[q]["step"].item() == 3

    # lr is read from its tensor at replay time.
    lr_tensor.fill_(0.0)
    before = [q.detach().clone() for q in graphed]
    graph.replay()
    for q, old in zip(graphed, before):
        assert torch.equal(q, old)  # no weight decay and lr 0: nothing moves


@cuda_test
def test_capture_of_a_non_capturable_step_is_refused():
    params = [torch.nn.Parameter(p) for p in make_params(torch.float32, sizes=[(64,)])]
    optimizer = CASMO(params, fused=True)
    params[0].grad = torch.ones_like(params[0])
    optimizer.step()  # creates the state, outside the capture
    torch.cuda.synchronize()
    graph, side = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    with torch.cuda.stream(side):
        graph.capture_begin()
        try:  # raised inside the capture, which then ends cleanly (and empty)
            with pytest.raises(RuntimeError, match="capturable=True"):
                optimizer.step()
        finally:
            graph.capture_end()


@cuda_test
@pytest.mark.parametrize("fused", [True, False])
def test_lr_tensor_on_another_device(fused):
    """An lr tensor on the CPU steps CUDA parameters as its value does (non-capturable),
    and capturable refuses it clearly."""
    with_tensor, _ = run({"lr": torch.tensor(1e-2), "fused": fused}, torch.float32)
    with_float, _ = run({"lr": 1e-2, "fused": fused}, torch.float32)
    for p, q in zip(with_tensor, with_float):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="lr tensor on the parameters' device"):
        run({"lr": torch.tensor(1e-2), "capturable": True, "fused": fused}, torch.float32)


@cuda_test
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_gradient_spoils_its_tensor_only(bad):
    """As on every other backend (docs/casmo_spec.md, tests/test_torch_optim.py)."""
    params = [torch.nn.Parameter(p) for p in make_params(torch.float32, sizes=[(70001,), (300,)])]
    optimizer = CASMO(params, robustness=0.0, fused=True)
    for p, g in zip(params, make_grads(params, 1)):
        p.grad = g
    params[0].grad[12345] = bad
    optimizer.step()
    assert torch.isnan(params[0]).all() and torch.isfinite(params[1]).all()
    assert (~torch.isfinite(optimizer.state[params[0]]["m"])).sum().item() == 1


@cuda_test
def test_maximize_and_foreach_on_cuda():
    up, _ = run({"maximize": True, "fused": True}, torch.float32)
    down, _ = run({"fused": True}, torch.float32, grad_sign=-1.0)
    foreach, _ = run({"fused": False, "foreach": True}, torch.float32, grad_sign=-1.0)
    for p, q, r in zip(up, down, foreach):
        assert torch.equal(p, q)
        assert_matches_reference(r, q, torch.float32, "foreach")


@cuda_test
def test_float32_moments_of_bfloat16_parameters():
    wide, wide_opt = run({"float32_moments": True}, torch.bfloat16)
    loop, loop_opt = run({"float32_moments": True, "foreach": False}, torch.bfloat16)
    for p, q in zip(wide, loop):
        assert wide_opt.state[p]["s"].dtype == torch.float32
        assert_matches_reference(p, q, torch.bfloat16, "p")
        assert_matches_reference(wide_opt.state[p]["s"], loop_opt.state[q]["s"], torch.float32, "s")


@cuda_test
def test_tensor_over_2_pow_31_elements():
    """int64 indexing: with a constant gradient and zero moments every element gets
    the same update, so the last elements must match the first ones."""
    n = 2**31 + 4099
    if torch.cuda.mem_get_info()[0] < 5 * n * 2:
        pytest.skip("not enough free GPU memory for four bf16 tensors of 2^31 elements")
    param = torch.nn.Parameter(torch.ones(n, dtype=torch.bfloat16, device="cuda"))
    param.grad = torch.full_like(param, 0.5)
    optimizer = CASMO([param], lr=0.25, fused=True)
    optimizer.step()
    head, tail = param[:4096], param[-4096:]
    assert (tail != 1.0).all()
    assert torch.equal(head, tail)
    del optimizer, param
    torch.cuda.empty_cache()


def amp_train(fused, steps, scaler=None, autocast=True):
    """A small model trained under fp16 autocast (or in float32), with or without a
    GradScaler."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 8)).cuda()
    opt = CASMO(model.parameters(), lr=1e-3, weight_decay=0.01, fused=fused)
    gen = torch.Generator(device="cuda").manual_seed(1)
    for _ in range(steps):
        x, y = (
            torch.randn(32, 64, device="cuda", generator=gen),
            torch.randn(32, 8, device="cuda", generator=gen),
        )
        opt.zero_grad()
        with torch.autocast("cuda", dtype=torch.float16, enabled=autocast):
            loss = torch.nn.functional.mse_loss(model(x).float(), y)
        (loss if scaler is None else scaler.scale(loss)).backward()
        if scaler is None:
            opt.step()
        else:
            scaler.step(opt)
            scaler.update()
    return model, opt


@cuda_test
@pytest.mark.parametrize("fused", [True, False])
def test_grad_scaler_equals_unscaled_in_float32(fused):
    """What the scaler promises: in float32 (no underflow to rescue), training with it is
    training without it. Under fp16 autocast the two may differ: without a scaler small
    fp16 gradients underflow, and CASMO's gate ignores the gradients' scale."""
    scaled, scaled_opt = amp_train(fused, 5, torch.amp.GradScaler("cuda", init_scale=2.0**12), autocast=False)
    plain, plain_opt = amp_train(fused, 5, autocast=False)
    for p, q in zip(scaled.parameters(), plain.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-5)
        torch.testing.assert_close(scaled_opt.state[p]["m"], plain_opt.state[q]["m"], rtol=0, atol=1e-5)
    assert scaled_opt.group_metrics()["agar"] == pytest.approx(plain_opt.group_metrics()["agar"], rel=1e-4)
    assert all(type(state["step"]) is int for state in scaled_opt.state_dict()["state"].values())


@cuda_test
@pytest.mark.parametrize("fused", [True, False])
def test_grad_scaler_fp16_autocast_steps_with_the_unscaled_gradients(fused):
    """Under fp16 autocast every step is taken (the scale grows), and after scaler.step
    p.grad is the scaled gradient times 1/scale, as with torch's fused Adam."""
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**12, growth_interval=2)
    model, opt = amp_train(fused, 4, scaler)
    assert scaler.get_scale() == 2.0**14
    assert all(opt.state[p]["step"] == 4 for p in model.parameters())
    x = torch.randn(32, 64, device="cuda", generator=torch.Generator(device="cuda").manual_seed(2))
    opt.zero_grad()
    with torch.autocast("cuda", dtype=torch.float16):
        scaler.scale(model(x).float().square().mean()).backward()
    scaled = [p.grad.clone() for p in model.parameters()]
    scaler.step(opt)
    for p, grad in zip(model.parameters(), scaled):
        assert torch.equal(p.grad, grad * (1.0 / 2.0**14)) and torch.isfinite(p).all()


@cuda_test
def test_first_scaler_step_after_int_steps_waits_for_nothing():
    """Int step counts (steps without a scaler) become device tensors at the first
    GradScaler step: made on the device, not copied from host memory (a sync)."""
    model, opt = amp_train(True, 2)
    for p in model.parameters():
        p.grad = torch.ones_like(p) * 1024
    opt.grad_scale = torch.tensor(1024.0, device="cuda")
    opt.found_inf = torch.tensor(0.0, device="cuda")
    with no_host_sync():
        opt.step()
    assert all(opt.state[p]["step"].item() == 3 for p in model.parameters())


@cuda_test
def test_capturable_run_resumed_from_int_steps_is_captured():
    """A checkpoint with int steps loaded for a capturable group: the first step can be
    captured at once, and the graph advances the steps it loaded."""
    eager, eager_opt = run({"fused": True}, torch.float32, num_steps=2, seed=4)
    saved = copy.deepcopy(eager_opt.state_dict())  # loading would alias its state tensors
    saved["param_groups"][0]["capturable"] = True
    graphed = [torch.nn.Parameter(p.detach().clone()) for p in eager]
    graphed_opt = CASMO(graphed, capturable=True, fused=True)
    graphed_opt.load_state_dict(saved)
    for q in graphed:
        q.grad = torch.zeros_like(q)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graphed_opt.step()
    step_eager_and_replay(eager, eager_opt, graphed, graph, (3, 4), seed=4)
    for p, q in zip(eager, graphed):
        assert torch.equal(p, q) and graphed_opt.state[q]["step"].item() == 4


@cuda_test
def test_grad_scaler_skips_an_inf_step_without_a_host_sync():
    model, opt = amp_train(True, 2, torch.amp.GradScaler("cuda", init_scale=2.0**10))
    before = [
        (p.detach().clone(), opt.state[p]["m"].clone(), opt.state[p]["step"].clone())
        for p in model.parameters()
    ]
    metrics = opt.group_metrics()
    for p in model.parameters():
        p.grad = torch.full_like(p, float("inf"))
    opt.grad_scale = torch.tensor(1024.0, device="cuda")
    opt.found_inf = torch.tensor(1.0, device="cuda")
    with no_host_sync():
        opt.step()
    for p, (old_p, old_m, old_step) in zip(model.parameters(), before):
        assert torch.equal(p, old_p) and torch.equal(opt.state[p]["m"], old_m)
        assert torch.equal(opt.state[p]["step"], old_step) and old_step.item() == 2
    assert opt.group_metrics() == metrics
    assert opt.state_dict()["state"][0]["step"] == 2


@cuda_test
def test_custom_op_opcheck_on_cuda():
    gen = torch.Generator(device="cuda").manual_seed(0)
    ps, gs, ms = ([torch.randn(n, device="cuda", generator=gen) for n in (70001, 5)] for _ in range(3))
    ss = [m.abs() for m in ms]
    steps = [torch.tensor(3.0, device="cuda") for _ in ps]
    scale, found_inf = torch.tensor(4.0, device="cuda"), torch.tensor(0.0, device="cuda")
    hyper = (0.9, 0.999, 1e-8, 0.01, 0.1, 0.5, 0.1)
    args = (ps, gs, ms, ss, [], steps, 1e-2, None, *hyper, scale, found_inf)
    torch.library.opcheck(torch.ops.casmo_ext.step_.default, args)


@cuda_test
@pytest.mark.parametrize("capturable", [False, True])
def test_compiled_step_on_cuda_is_one_graph(capturable):
    from torch._dynamo.testing import CompileCounter

    eager, eager_opt = run({"fused": True, "capturable": capturable}, torch.float32, num_steps=6)
    torch._dynamo.reset()
    counter = CompileCounter()
    params = [torch.nn.Parameter(p) for p in make_params(torch.float32)]
    optimizer = CASMO(params, fused=True, capturable=capturable)
    compiled_step = torch.compile(optimizer.step, backend=counter)
    for step in range(1, 7):
        for p, g in zip(params, make_grads(params, step)):
            p.grad = g
        compiled_step()
    assert counter.frame_count == 1
    for p, q in zip(params, eager):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_cuda_kernel_was_built_where_expected():
    if os.environ.get("CASMO_EXPECT_CUDA_KERNEL") != "1":
        pytest.skip("set CASMO_EXPECT_CUDA_KERNEL=1 where the build must include the CUDA kernels")
    assert build_info()["cuda_kernel"] is True
