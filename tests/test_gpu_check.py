"""tools/gpu_check.py where no GPU is needed: the one line without a GPU, the budget, the
phases' outcomes, log and benchmark parsing, and the report it writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parent.parent / "tools"
sys.path.insert(0, str(TOOLS))
import gpu_check  # noqa: E402


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_without_a_gpu_it_stops_at_once_with_one_line(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(
        [sys.executable, str(TOOLS / "gpu_check.py"), "--out", str(tmp_path / "report")],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stdout.strip().splitlines() == [
        "gpu-check: no CUDA GPU visible (torch.cuda.is_available() is False); nothing was run"
    ]
    assert not (tmp_path / "report").exists()


def test_budget_spends_and_keeps_back_time_for_the_report():
    clock = FakeClock()
    budget = gpu_check.Budget(480, clock)
    assert budget.left() == 480 - gpu_check.REPORT_RESERVE_S
    assert budget.fits(150) and budget.timeout(150) == 300  # twice the estimate
    assert budget.timeout(20) == 80  # at least a minute more than the estimate
    clock.now += 400
    assert budget.elapsed() == 400 and budget.left() == 75
    assert budget.fits(60) and not budget.fits(90)
    assert budget.timeout(60) == 75  # never past the budget
    clock.now += 100
    assert budget.timeout(10) == 0.0
    assert budget.line("tests: running").startswith("[gpu-check  500 s of 480,  -25 left] tests")


def test_phases_pass_fail_time_out_and_skip(tmp_path):
    clock = FakeClock()
    budget = gpu_check.Budget(480, clock)
    report = gpu_check.Report(out=tmp_path)
    ok = gpu_check.run_phase(budget, report, "ok", 1, [sys.executable, "-c", "print('all good')"])
    bad = gpu_check.run_phase(
        budget, report, "bad", 1, [sys.executable, "-c", "import sys; sys.exit('broken')"]
    )
    budget.timeout = lambda estimate: 0.5
    slow = gpu_check.run_phase(
        budget, report, "slow", 1, [sys.executable, "-c", "import time; time.sleep(30)"]
    )
    clock.now += 470
    skipped = gpu_check.run_phase(budget, report, "late", 60, [sys.executable, "-c", "raise SystemExit(1)"])
    assert (ok, bad, slow, skipped) == (True, False, False, False)
    assert [(p.name, p.status) for p in report.phases] == [
        ("ok", "passed"), ("bad", "failed"), ("slow", "timed out"), ("late", "skipped")
    ]  # fmt: skip
    assert report.phases[0].note == "all good" and report.phases[1].note == "broken"
    assert report.phases[3].note == "needs ~60 s, 5 left" and report.failed()


def test_median_steps_per_sec_leaves_out_the_warm_up_row(tmp_path):
    log = tmp_path / "log.csv"
    log.write_text("step,loss_d,steps_per_sec\n10,1.0,3.0\n20,1.0,100\n30,1.0,120\n40,1.0,110\n")
    assert gpu_check.median_steps_per_sec(log) == 110
    assert gpu_check.median_steps_per_sec(tmp_path / "missing.csv") is None


def bench_row(set_name, optimizer, ms, ratio):
    return {
        "set": set_name, "optimizer": optimizer, "median_ms": ms,
        "vs_adam_fused": ratio, "vs_adam_fused_quartiles": [ratio - 0.05, ratio + 0.05],
    }  # fmt: skip


def sample_report(tmp_path) -> gpu_check.Report:
    report = gpu_check.Report(out=tmp_path / "out", elapsed_s=431.0)
    report.machine = {
        "date": "2026-12-06T18:00:00",
        "gpu": "NVIDIA H100",
        "capability": "9.0",
        "torch": "2.14",
    }
    report.phases = [
        gpu_check.Phase("build", "passed", 120.4),
        gpu_check.Phase("tests", "failed", 60.0, note="1 failed, 20 passed", output_tail="E   assert x | y"),
        gpu_check.Phase("dcgan casmo_casmo fp16", "skipped", note="needs ~15 s, 3 left"),
    ]
    rows = [
        bench_row("one_16M_tensor", "casmo_kernel", 0.233, 1.19),
        bench_row("one_16M_tensor", "adam_fused", 0.194, 1.0),
    ]
    rows.append(bench_row("one_16M_tensor", "adam_foreach", 0.41, 2.14))
    report.bench = gpu_check.bench_summary(rows)
    report.step = {"eager": {"ms": 0.165, "matches_eager": True, "note": "the fused kernel"}}
    report.dcgan = {"adam_adam off": 135.0, "casmo_casmo fp16": None}
    return report


def test_report_writes_markdown_and_json(tmp_path):
    report = sample_report(tmp_path)
    gpu_check.write_report(report)
    markdown = (report.out / "report.md").read_text()
    assert "NVIDIA H100 (compute capability 9.0)" in markdown and "431 s in all" in markdown
    assert "| tests | failed | 60 | 1 failed, 20 passed |" in markdown
    assert "| dcgan casmo_casmo fp16 | skipped | 0 | needs ~15 s, 3 left |" in markdown
    assert "| one_16M_tensor | 0.233 | 0.194 | 1.19 | 1.14–1.24 | 2.14 |" in markdown
    assert "| eager | 0.1650 | True | the fused kernel |" in markdown
    assert "| adam_adam | 135.0 | — | — |" in markdown and "| casmo_casmo | — | — | — |" in markdown
    assert "## Output of tests (failed)" in markdown and "E   assert x | y" in markdown
    data = json.loads((report.out / "report.json").read_text())
    assert [p["status"] for p in data["phases"]] == ["passed", "failed", "skipped"]
    assert data["bench"][0]["kernel_vs_adam_fused"] == pytest.approx(1.19)
    assert data["dcgan"]["adam_adam off"] == 135.0 and data["elapsed_s"] == 431.0


def test_main_runs_every_phase_and_reads_their_outputs(tmp_path, monkeypatch):
    """The whole run with each phase's command replaced by the files it would write: the
    phases in order, the explicit --amp of each DCGAN run, and the report."""
    commands = {}

    def fake_phase(budget, report, name, estimate_s, command, env=None):
        commands[name] = (command, env or {})
        if name == "bench":
            rows = [
                bench_row("dcgan_generator", "casmo_kernel", 0.2, 1.2),
                bench_row("dcgan_generator", "adam_fused", 0.17, 1),
            ]
            (report.out / "bench.json").write_text(json.dumps({"rows": rows}))
        elif name == "step":
            (report.out / "step.json").write_text(json.dumps({"eager": {"ms": 0.2, "matches_eager": True}}))
        elif name.startswith("dcgan"):
            run_dir = Path(command[command.index("--out") + 1])
            run_dir.mkdir(parents=True)
            (run_dir / "log.csv").write_text("step,steps_per_sec\n10,5\n20,120\n")
        report.phases.append(gpu_check.Phase(name, "passed"))
        return True

    monkeypatch.setattr(gpu_check, "gpu_line", lambda: None)
    monkeypatch.setattr(gpu_check, "machine", lambda: {"gpu": "a GPU", "capability": "9.0"})
    monkeypatch.setattr(gpu_check, "run_phase", fake_phase)
    assert gpu_check.main(["--out", str(tmp_path)]) == 0
    assert list(commands)[:4] == ["build", "tests", "bench", "step"] and len(commands) == 4 + 12
    assert commands["build"][1]["TORCH_CUDA_ARCH_LIST"] == "9.0"
    assert commands["tests"][1] == {"CASMO_EXPECT_CUDA_KERNEL": "1"}
    dcgan = commands["dcgan casmo_casmo fp16"][0]
    assert dcgan[dcgan.index("--amp") + 1] == "fp16" and dcgan[dcgan.index("--g-opt") + 1] == "casmo"
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["dcgan"]["adam_casmo bf16"] == 120 and data["bench"][0]["kernel_vs_adam_fused"] == 1.2
    assert "| casmo_adam | 120.0 | 120.0 | 120.0 |" in (tmp_path / "report.md").read_text()
