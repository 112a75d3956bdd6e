"""The GPU acceptance run: everything a GPU can check, in one command, within 8 minutes.

    make gpu-check                          # or: python tools/gpu_check.py [--out DIR]

On one CUDA GPU, in this order, each phase only if the time left fits it: builds the
extension for this GPU only (in place), runs tests/test_cuda.py, `python -m
casmo_ext.bench --device cuda`, times one optimizer step eager, under torch.compile and
replayed from a captured CUDA graph (each checked against eager steps), and the four
DCGAN configurations' steps/s at batch 16 in fp32, bf16 and fp16 with GradScaler (120
steps each on the shapes data). It prints its budget as it goes and writes report.md and
report.json into the folder it names first (runs/gpu-check-<time> by default).
docs/speed.md says what to look at.

Exit status: 0 when every phase that ran passed (phases that did not fit are reported as
skipped), 1 when one failed, 2 at once, with one line, where no CUDA GPU is visible.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parent.parent
BUDGET_S = 480.0
REPORT_RESERVE_S = 5.0  # kept back for writing the report
CONFIGS = ("adam_adam", "casmo_adam", "adam_casmo", "casmo_casmo")
AMP_MODES = ("off", "bf16", "fp16")  # fp16 trains with a GradScaler
DCGAN_STEPS = 120
# Expected seconds per phase on one H100 with 16 cores; a phase starts only if this fits.
ESTIMATES_S = {"build": 150.0, "tests": 90.0, "bench": 45.0, "step": 60.0, "dcgan": 15.0}


class Budget:
    """The run's time: what is spent and left, whether a phase fits, and its timeout."""

    def __init__(self, total_s: float, clock: Callable[[], float] = time.monotonic):
        self.total_s, self.clock = total_s, clock
        self.started = clock()

    def elapsed(self) -> float:
        return self.clock() - self.started

    def left(self) -> float:
        return self.total_s - REPORT_RESERVE_S - self.elapsed()

    def fits(self, estimate_s: float) -> bool:
        return self.left() >= estimate_s

    def timeout(self, estimate_s: float) -> float:
        """A phase may overrun its estimate (twice it, at least a minute more) but never the
        budget: what it leaves is the next phases' time."""
        return max(0.0, min(self.left(), max(2 * estimate_s, estimate_s + 60)))

    def line(self, message: str) -> str:
        return f"[gpu-check {self.elapsed():4.0f} s of {self.total_s:.0f}, {self.left():4.0f} left] {message}"


@dataclass
class Phase:
    name: str
    status: str  # passed, failed, skipped, timed out
    seconds: float = 0.0
    note: str = ""
    output_tail: str = ""


@dataclass
class Report:
    out: Path
    machine: dict = field(default_factory=dict)
    phases: list = field(default_factory=list)
    bench: list = field(default_factory=list)
    step: dict = field(default_factory=dict)
    dcgan: dict = field(default_factory=dict)  # "config amp" -> median steps/s
    elapsed_s: float = 0.0

    def failed(self) -> bool:
        return any(p.status in ("failed", "timed out") for p in self.phases)


def run_phase(budget: Budget, report: Report, name: str, estimate_s: float, command: list, env=None) -> bool:
    """Runs `command` as phase `name` if it fits the budget; records and prints the outcome.
    Returns whether it ran and passed."""
    if not budget.fits(estimate_s):
        report.phases.append(
            Phase(name, "skipped", note=f"needs ~{estimate_s:.0f} s, {budget.left():.0f} left")
        )
        print(budget.line(f"{name}: skipped (needs ~{estimate_s:.0f} s)"), flush=True)
        return False
    print(budget.line(f"{name}: running (~{estimate_s:.0f} s)"), flush=True)
    started = time.monotonic()
    try:
        result = subprocess.run(
            command, cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True,
            timeout=budget.timeout(estimate_s),
        )  # fmt: skip
        status, output = ("passed" if result.returncode == 0 else "failed"), result.stdout + result.stderr
    except subprocess.TimeoutExpired as expired:
        status, output = "timed out", _text(expired.stdout) + _text(expired.stderr)
    phase = Phase(name, status, time.monotonic() - started, output_tail=output[-3000:])
    phase.note = _last_line(output)
    report.phases.append(phase)
    print(budget.line(f"{name}: {status} in {phase.seconds:.0f} s  {phase.note}"), flush=True)
    return status == "passed"


def _text(output) -> str:
    return output.decode(errors="replace") if isinstance(output, bytes) else (output or "")


def _last_line(output: str) -> str:
    lines = [line.strip() for line in output.strip().splitlines() if line.strip()]
    return lines[-1][:160] if lines else ""


def gpu_line() -> Optional[str]:
    """None where a CUDA GPU is visible, else the one line to stop with."""
    try:
        import torch
    except ImportError:
        return "gpu-check: torch is not installed in this Python; nothing was run"
    if not torch.cuda.is_available():
        return "gpu-check: no CUDA GPU visible (torch.cuda.is_available() is False); nothing was run"
    return None


def machine() -> dict:
    import torch

    major, minor = torch.cuda.get_device_capability(0)
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "gpu": torch.cuda.get_device_name(0),
        "capability": f"{major}.{minor}",
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cpu_cores": os.cpu_count(),
    }


def median_steps_per_sec(log_csv: Path) -> Optional[float]:
    """The median of log.csv's steps_per_sec over its rows after the first (which holds
    the warm-up: cuDNN's choices, the first allocations)."""
    if not log_csv.exists():
        return None
    with open(log_csv, newline="") as handle:
        rates = [float(row["steps_per_sec"]) for row in csv.DictReader(handle) if row.get("steps_per_sec")]
    rates = rates[1:] if len(rates) > 1 else rates
    return statistics.median(rates) if rates else None


def bench_summary(rows: list[dict]) -> list[dict]:
    """Per parameter set: the kernel's and fused Adam's median step, the kernel's ratio to
    fused Adam (and its middle half), foreach Adam's ratio."""
    by_set: dict[str, dict] = {}
    for row in rows:
        by_set.setdefault(row["set"], {})[row["optimizer"]] = row
    summary = []
    for set_name, optimizers in by_set.items():
        kernel, adam = optimizers.get("casmo_kernel"), optimizers.get("adam_fused")
        if kernel is None or adam is None:
            continue
        foreach = optimizers.get("adam_foreach")
        summary.append(
            {
                "set": set_name,
                "kernel_ms": kernel["median_ms"],
                "adam_fused_ms": adam["median_ms"],
                "kernel_vs_adam_fused": kernel["vs_adam_fused"],
                "middle_half": kernel["vs_adam_fused_quartiles"],
                "adam_foreach_vs_adam_fused": foreach["vs_adam_fused"] if foreach else None,
            }
        )
    return summary


def phase_table(phases: list[Phase]) -> list[str]:
    lines = ["| phase | status | seconds | note |", "|---|---|---:|---|"]
    for p in phases:
        lines.append(f"| {p.name} | {p.status} | {p.seconds:.0f} | {p.note.replace('|', '/')} |")
    return lines


def results_tables(report: Report) -> list[str]:
    """The bench, step and DCGAN sections of report.md (those that ran)."""
    lines = []
    if report.bench:
        lines += ["", "## Optimizer step (`python -m casmo_ext.bench --device cuda`)", ""]
        lines += ["| set | kernel ms | fused Adam ms | kernel ÷ fused Adam | middle half | foreach ÷ fused |"]
        lines += ["|---|---:|---:|---:|---:|---:|"]
        for b in report.bench:
            foreach = (
                "" if b["adam_foreach_vs_adam_fused"] is None else f"{b['adam_foreach_vs_adam_fused']:.2f}"
            )
            low, high = b["middle_half"]
            lines.append(
                f"| {b['set']} | {b['kernel_ms']:.3f} | {b['adam_fused_ms']:.3f} | "
                f"{b['kernel_vs_adam_fused']:.2f} | {low:.2f}–{high:.2f} | {foreach} |"
            )
    if report.step:
        lines += ["", "## One step of the DCGAN generator's tensors: eager, compiled, graphed", ""]
        lines += ["| mode | ms per step | matches eager | note |", "|---|---:|---|---|"]
        for mode, entry in report.step.items():
            lines.append(
                f"| {mode} | {entry['ms']:.4f} | {entry['matches_eager']} | {entry.get('note', '')} |"
            )
    if report.dcgan:
        lines += [
            "",
            f"## DCGAN steps/s at batch 16 ({DCGAN_STEPS} steps on shapes, median of logged rows)",
            "",
        ]
        lines += ["| config | " + " | ".join(AMP_MODES) + " |", "|---|" + "---:|" * len(AMP_MODES)]
        for config in CONFIGS:
            cells = [report.dcgan.get(f"{config} {amp}") for amp in AMP_MODES]
            lines.append(
                f"| {config} | " + " | ".join("—" if c is None else f"{c:.1f}" for c in cells) + " |"
            )
    return lines


def write_report(report: Report) -> None:
    """report.md (tables, then the output of each phase that did not pass) and report.json."""
    m = report.machine
    lines = [f"# gpu-check {m.get('date', '')}", ""]
    lines.append(f"{m.get('gpu')} (compute capability {m.get('capability')}), torch {m.get('torch')}, ")
    lines.append(
        f"CUDA {m.get('torch_cuda')}, {m.get('cpu_cores')} CPU cores; {report.elapsed_s:.0f} s in all."
    )
    lines += ["", "## Phases", ""] + phase_table(report.phases) + results_tables(report)
    for p in report.phases:
        if p.status in ("failed", "timed out"):
            lines += ["", f"## Output of {p.name} ({p.status}), last lines", "", "```", p.output_tail, "```"]
    report.out.mkdir(parents=True, exist_ok=True)
    (report.out / "report.md").write_text("\n".join(lines) + "\n")
    data = {**asdict(report), "out": str(report.out), "phases": [asdict(p) for p in report.phases]}
    (report.out / "report.json").write_text(json.dumps(data, indent=2) + "\n")


# After the build: setup.py quietly builds the CPU kernel alone where nvcc is missing.
CHECK_BUILT = (
    "import sys, casmo_ext; info = casmo_ext.build_info(); print('build_info:', info); "
    "sys.exit(0 if info['cuda_kernel'] else 'built without the CUDA kernels: is nvcc in CUDA_HOME?')"
)


def build_phase(budget: Budget, report: Report) -> bool:
    """The extension, in place, for this GPU's architecture only."""
    env = {"TORCH_CUDA_ARCH_LIST": report.machine["capability"], "MAX_JOBS": str(os.cpu_count() or 4)}
    env["CUDA_HOME"] = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    script = '"$0" setup.py build_ext --inplace && "$0" -c "$1"'
    command = ["sh", "-c", script, sys.executable, CHECK_BUILT]
    return run_phase(budget, report, "build", ESTIMATES_S["build"], command, env)


def test_and_bench_phases(budget: Budget, report: Report) -> None:
    tests = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_cuda.py"]
    run_phase(budget, report, "tests", ESTIMATES_S["tests"], tests, {"CASMO_EXPECT_CUDA_KERNEL": "1"})
    bench_json = report.out / "bench.json"
    bench = [sys.executable, "-m", "casmo_ext.bench", "--device", "cuda", "--json", str(bench_json)]
    if run_phase(budget, report, "bench", ESTIMATES_S["bench"], bench):
        report.bench = bench_summary(json.loads(bench_json.read_text())["rows"])


def step_phase(budget: Budget, report: Report) -> None:
    step_json = report.out / "step.json"
    command = [sys.executable, str(Path(__file__).with_name("gpu_step_check.py")), str(step_json)]
    if run_phase(budget, report, "step", ESTIMATES_S["step"], command):
        report.step = json.loads(step_json.read_text())


def dcgan_phases(budget: Budget, report: Report) -> None:
    for amp in AMP_MODES:
        for config in CONFIGS:
            g_opt, d_opt = config.split("_")
            run_dir = report.out / "dcgan" / f"{config}-{amp}"
            command = [sys.executable, "train_dcgan.py", "--dataset", "shapes", "--subset", "1024"]
            command += ["--bs", "16", "--max-steps", str(DCGAN_STEPS), "--log-every", "10", "--no-fid"]
            command += ["--g-opt", g_opt, "--d-opt", d_opt, "--amp", amp, "--device", "cuda"]
            command += ["--data-root", "data", "--out", str(run_dir)]
            if run_phase(budget, report, f"dcgan {config} {amp}", ESTIMATES_S["dcgan"], command):
                report.dcgan[f"{config} {amp}"] = median_steps_per_sec(run_dir / "log.csv")


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="report folder (default runs/gpu-check-<time>)"
    )
    parser.add_argument("--budget", type=float, default=BUDGET_S, help="seconds in all, the build included")
    args = parser.parse_args(argv)
    budget = Budget(args.budget)
    stop = gpu_line()
    if stop is not None:
        print(stop)
        return 2
    out = args.out or ROOT / "runs" / f"gpu-check-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    report = Report(out=out, machine=machine())
    out.mkdir(parents=True, exist_ok=True)
    print(budget.line(f"{report.machine['gpu']}: report in {out}"), flush=True)
    if build_phase(budget, report):
        test_and_bench_phases(budget, report)
        step_phase(budget, report)
        dcgan_phases(budget, report)
    report.elapsed_s = budget.elapsed()
    write_report(report)
    print(budget.line(f"{'FAILED' if report.failed() else 'done'}: {out / 'report.md'}"), flush=True)
    return 1 if report.failed() else 0


if __name__ == "__main__":
    sys.exit(main())
