"""One CASMO step of the DCGAN generator's tensors on a GPU, three ways: eager (the fused
kernel), under torch.compile, and replayed from a captured CUDA graph (capturable). Each
runs STEPS steps from the same start with the same gradients and is compared with the
eager steps; writes {mode: {ms, matches_eager, max_abs_diff, note}} as JSON.

    python tools/gpu_step_check.py OUT.json      (a phase of tools/gpu_check.py)
"""

from __future__ import annotations

import json
import sys
import time

import torch

from casmo_ext import CASMO
from casmo_ext.bench import DCGAN_GENERATOR_SHAPES, make_params

STEPS = 20  # per mode: warm-up included, all compared with eager
TIMED = 200  # steps (or replays) timed after those


def optimizer(capturable: bool):
    params = make_params(DCGAN_GENERATOR_SHAPES, torch.device("cuda"))
    lr = torch.tensor(1e-4, device="cuda") if capturable else 1e-4
    return params, CASMO(params, lr=lr, fused=True, capturable=capturable)


def ms_per_call(call, count: int = TIMED) -> float:
    """Milliseconds per call, from CUDA events around `count` calls."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(count):
        call()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / count


def compared(params, reference, ms: float, note: str = "") -> dict:
    diff = max((p - q).abs().max().item() for p, q in zip(params, reference))
    return {"ms": ms, "matches_eager": diff <= 1e-6, "max_abs_diff": diff, "note": note}


def eager() -> tuple[list, float]:
    params, opt = optimizer(capturable=False)
    for _ in range(STEPS):
        opt.step()
    reference = [p.detach().clone() for p in params]
    return reference, ms_per_call(opt.step)


def compiled(reference) -> dict:
    params, opt = optimizer(capturable=False)
    step = torch.compile(opt.step)
    started = time.perf_counter()
    step()
    torch.cuda.synchronize()
    compile_s = time.perf_counter() - started
    for _ in range(STEPS - 1):
        step()
    result = compared(params, reference, 0.0, f"first call (compiling) {compile_s:.1f} s")
    result["ms"] = ms_per_call(step)
    return result


def graphed(reference) -> dict:
    """Three eager warm-up steps on a side stream (they create the state), one step
    captured, then replays: STEPS steps in all."""
    params, opt = optimizer(capturable=True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for _ in range(STEPS - 3):
        graph.replay()
    torch.cuda.synchronize()
    counts = {opt.state[p]["step"].item() for p in params}
    result = compared(params, reference, 0.0, f"step counts after the replays: {sorted(counts)}")
    result["matches_eager"] = result["matches_eager"] and counts == {float(STEPS)}
    result["ms"] = ms_per_call(graph.replay)
    return result


def main() -> None:
    reference, eager_ms = eager()
    results = {
        "eager": {"ms": eager_ms, "matches_eager": True, "max_abs_diff": 0.0, "note": "the fused kernel"}
    }
    failures = []
    for mode, check in (("torch.compile", compiled), ("CUDA graph", graphed)):
        try:
            results[mode] = check(reference)
        except Exception as error:  # reported, and the other mode still runs
            results[mode] = {
                "ms": float("nan"),
                "matches_eager": False,
                "note": f"{type(error).__name__}: {error}",
            }
        if not results[mode]["matches_eager"]:
            failures.append(mode)
        print(mode, results[mode], flush=True)
    with open(sys.argv[1], "w") as handle:
        json.dump(results, handle, indent=2)
    if failures:
        sys.exit(f"gpu_step_check: {', '.join(failures)} did not match the eager steps")


if __name__ == "__main__":
    main()
