"""Time one optimizer step: CASMO (fused kernel), CASMO (reference) and torch.optim.Adam
(fused, foreach), on the same tensors, for three parameter sets.

    python -m casmo_ext.bench [--device cpu|cuda|all] [--json PATH]

Run it alone on the machine: ratios are only meaningful when nothing else competes
for the cores. The fast optimizers are timed in interleaved rounds (one step of each
per round). Reported: the median step time; the median, over rounds, of its ratio to
fused Adam's step in the same round, and the middle half (quartiles) of those ratios;
the effective bandwidth (the bytes each optimizer must move per step: CASMO 9 tensor
passes, Adam 7, over the time).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time

import torch

from casmo_ext import CASMO, build_info

# The DCGAN generator of train_dcgan.py (z=100, 64 feature maps): conv-transpose
# weights and BatchNorm weights and biases.
DCGAN_GENERATOR_SHAPES = [(100, 512, 4, 4), (512,), (512,), (512, 256, 4, 4), (256,), (256,)]
DCGAN_GENERATOR_SHAPES += [(256, 128, 4, 4), (128,), (128,), (128, 64, 4, 4), (64,), (64,), (64, 3, 4, 4)]
PARAMETER_SETS = {
    "dcgan_generator": DCGAN_GENERATOR_SHAPES,
    "one_16M_tensor": [(16 * 1024 * 1024,)],
    "400_x_256": [(256,)] * 400,
}
# Tensor passes over memory per step: CASMO reads g, m, s and writes m, s (pass 1),
# then reads p, m, s and writes p (pass 2); Adam reads p, g, m, v and writes p, m, v.
PASSES = {"casmo": 9, "adam": 7}
MAX_ROUNDS = 1000
OPTIMIZERS = {
    "casmo_kernel": ("casmo", lambda ps: CASMO(ps, lr=1e-4, fused=True)),
    "casmo_reference": ("casmo", lambda ps: CASMO(ps, lr=1e-4, fused=False)),
    "adam_fused": ("adam", lambda ps: torch.optim.Adam(ps, lr=1e-4, fused=True)),
    "adam_foreach": ("adam", lambda ps: torch.optim.Adam(ps, lr=1e-4, foreach=True)),
}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_params(shapes, device) -> list[torch.Tensor]:
    """The same random parameters and gradients for every optimizer (its own copy)."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    params = [torch.randn(s, generator=gen).to(device).requires_grad_() for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(device)
    return params


def time_rounds(optimizers: dict, device, min_rounds: int, min_seconds: float) -> dict[str, list[float]]:
    """Step times in seconds, per optimizer, in rounds: each round steps every optimizer
    once, the order rotating from round to round. A shared VM's speed drifts by tens of
    percent within seconds; interleaving exposes every optimizer to the same drift, so
    the ratios between them hold even when the absolute times do not."""
    for optimizer in optimizers.values():
        for _ in range(3):
            optimizer.step()
    synchronize(device)
    names = list(optimizers)
    times: dict[str, list[float]] = {name: [] for name in names}
    started = time.perf_counter()
    for round_index in range(MAX_ROUNDS):
        if round_index >= min_rounds and time.perf_counter() - started >= min_seconds:
            break
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            begin = time.perf_counter()
            optimizers[name].step()
            synchronize(device)
            times[name].append(time.perf_counter() - begin)
    return times


def quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) == 1:
        return values[0], values[0], values[0]
    low, middle, high = statistics.quantiles(values, n=4, method="inclusive")
    return low, middle, high


def run(devices, sets, min_rounds: int, min_seconds: float) -> list[dict]:
    rows = []
    for device in devices:
        for set_name in sets:
            shapes = PARAMETER_SETS[set_name]
            numel = sum(torch.Size(s).numel() for s in shapes)
            optimizers = {name: make(make_params(shapes, device)) for name, (_, make) in OPTIMIZERS.items()}
            # The reference takes a second per step on the big sets: it is timed on its own,
            # with fewer rounds, after the interleaved rounds of the fast optimizers.
            reference = {"casmo_reference": optimizers.pop("casmo_reference")}
            times = time_rounds(optimizers, device, min_rounds, min_seconds)
            times.update(time_rounds(reference, device, 3, min_seconds))
            adam = times["adam_fused"]
            for name, (family, _) in OPTIMIZERS.items():
                seconds = statistics.median(times[name])
                if name in optimizers:  # ratios of steps timed in the same round
                    ratio_low, ratio, ratio_high = quartiles([t / a for t, a in zip(times[name], adam)])
                else:
                    ratio_low = ratio = ratio_high = seconds / statistics.median(adam)
                rows.append(
                    {
                        "device": str(device),
                        "set": set_name,
                        "tensors": len(shapes),
                        "elements": numel,
                        "optimizer": name,
                        "steps_timed": len(times[name]),
                        "median_ms": seconds * 1e3,
                        "vs_adam_fused": ratio,
                        "vs_adam_fused_quartiles": [ratio_low, ratio_high],
                        "effective_GBps": PASSES[family] * numel * 4 / 1e9 / seconds,
                    }
                )
    return rows


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    """The machine record every published figure carries: date, versions, CPU, GPU, build.
    The training scripts write it into config.json and benchmark.py into machine.json."""
    return {
        "date": datetime.date.today().isoformat(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "build": build_info(),
    }


def format_table(rows: list[dict]) -> str:
    lines = [
        "| device | set | optimizer | median ms | x fused Adam | middle half | effective GB/s |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        low, high = r["vs_adam_fused_quartiles"]
        lines.append(
            f"| {r['device']} | {r['set']} | {r['optimizer']} | {r['median_ms']:.3f} | "
            f"{r['vs_adam_fused']:.2f} | {low:.2f}–{high:.2f} | {r['effective_GBps']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    parser.add_argument("--sets", nargs="+", choices=list(PARAMETER_SETS), default=list(PARAMETER_SETS))
    parser.add_argument("--min-rounds", type=int, default=30, help="rounds of one step of each optimizer")
    parser.add_argument("--min-seconds", type=float, default=2.0, help="time each set at least this long")
    parser.add_argument("--json", metavar="PATH", help="also write machine info and the rows as JSON")
    args = parser.parse_args()

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is available here")
    devices = [torch.device("cpu")] if args.device in ("cpu", "all") else []
    if args.device in ("cuda", "all") and torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    if not build_info()["cpu_kernel"]:
        parser.error(
            "the compiled kernels are missing: build them with `pip install -e . --no-build-isolation`"
        )

    info = machine()
    print(
        f"# {info['date']}  torch {info['torch']}  {info['cpu']} ({info['cpu_threads']} threads)"
        + (f"  GPU: {info['gpu']}" if info["gpu"] else "")
    )
    if torch.device("cpu") in devices:
        build = info["build"]
        print(
            f"# CPU kernel capability: {build['cpu_kernel_capability']} (torch runs "
            f"{build['torch_cpu_capability']}; set ATEN_CPU_CAPABILITY=avx2 or default to force a lower one)"
        )
    rows = run(devices, args.sets, args.min_rounds, args.min_seconds)
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"machine": info, "rows": rows}, handle, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
