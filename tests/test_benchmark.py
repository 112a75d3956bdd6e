"""benchmark.py: the grid it plans, and a real miniature grid run end to end, then run again
(everything skipped), resumed, and with a run that fails."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import benchmark
import plot_logs
import run_summary
import speed_settings

ROOT = Path(__file__).resolve().parent.parent
TINY = [
    "--toy-seeds",
    "1",
    "--toy-epochs",
    "1",
    "--dcgan-seeds",
    "1",
    "--dcgan-steps",
    "10",
    "--subset",
    "32",
]
TINY += ["--eval-every", "5", "--eval-samples", "32", "--control-configs", "casmo_adam"]
TINY += ["--sweep-robustness", "0", "--dcgan-sweep-robustness", "0", "--sweep-seeds", "1", "--jobs", "2"]


def test_default_grid_is_four_configurations_by_several_seeds(monkeypatch):
    # A CPU with native bf16 (AMX Xeon), where the grid's default is bf16 + channels_last.
    monkeypatch.setattr(speed_settings, "native_bf16", lambda device: (True, "mocked AMX"))
    sets = benchmark.plan(benchmark.parse_args([]))
    assert [len(jobs) for jobs in sets.values()] == [4 * 5, 4 * 3, 2 * 2]
    toy = sets["toy2d"]
    assert {(job.config, job.seed) for job in toy} == {(c, s) for c in benchmark.CONFIGS for s in range(5)}
    assert all(
        "--epochs" in job.command and job.command[job.command.index("--epochs") + 1] == "200" for job in toy
    )
    casmo_casmo = next(job.command for job in sets["dcgan-shapes"] if job.config == "casmo_casmo")
    assert casmo_casmo[casmo_casmo.index("--g-opt") + 1] == "casmo"
    options = " ".join(casmo_casmo)
    for option in ("--max-steps 2000", "--eval-every 250", "--g-ema 0.999", "--amp bf16", "--channels-last"):
        assert option in options
    sweep = {job.command[job.command.index("--robustness") + 1] for job in sets["toy2d-robustness"]}
    assert sweep == {"0.0", "1.0"}


def test_default_grid_is_fp32_on_a_cpu_without_native_bf16(monkeypatch):
    monkeypatch.setattr(speed_settings, "native_bf16", lambda device: (False, "mocked AVX2 EPYC"))
    args = benchmark.parse_args([])
    command = benchmark.plan(args)["dcgan-shapes"][0].command
    assert command[command.index("--amp") + 1] == "off" and "--channels-last" in command
    assert args.speed_settings["chosen"] == {"amp": "off", "channels_last": True}
    assert benchmark.plan(benchmark.parse_args(["--amp", "bf16"]))["dcgan-shapes"][0].command.count(
        "--no-channels-last"
    )


def test_small_grid_and_full_dcgan_budget():
    small = benchmark.parse_args(["--small"])
    assert (small.toy_seeds, small.toy_epochs, small.dcgan_seeds, small.sweep_robustness) == (2, 60, 1, [])
    assert (small.control_configs, small.dcgan_sweep_robustness) == ([], [])
    assert small.out == Path("runs/benchmark-small")
    full = benchmark.plan(
        benchmark.parse_args(["--dataset", "tinyimagenet", "--dcgan-steps", "0", "--device", "cuda"])
    )
    command = full["dcgan-tinyimagenet"][0].command
    assert "--max-steps" not in command and command[command.index("--epochs") + 1] == "50"
    assert benchmark.parse_args(["--device", "cuda"]).jobs == 1


def run_benchmark(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "benchmark.py", *TINY, *arguments],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
    )


@pytest.fixture(scope="module")
def grid(tmp_path_factory, shapes_data_root) -> Path:
    out = tmp_path_factory.mktemp("grid")
    result = run_benchmark(
        "--out", str(out), "--data-root", str(shapes_data_root), "--publish", str(out / "published")
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out


def test_grid_writes_runs_figures_and_results(grid):
    for name in ("toy2d", "dcgan-shapes"):
        for config in benchmark.CONFIGS:
            assert (grid / name / f"{config}-s0" / benchmark.DONE_MARKER).is_file()
        assert (grid / "plots" / name / "comparison_2x2.png").is_file()
    results = (grid / "results.md").read_text()
    for config in benchmark.CONFIGS:
        # A row in the toy table, the DCGAN's two, and again in the control sets' tables.
        assert results.count(f"| **{config}** | 0 |") == 6
    assert (
        "| **casmo_casmo (robustness=0.0)** | 0 |" in results
        and "| **casmo_casmo (robustness=0.5)** | 0 |" in results
    )
    assert "torch 2." in results and (grid / "machine.json").is_file()


def test_the_control_is_adam_at_casmos_mean_step(grid):
    for name, default_lr in (("toy2d", 2e-4), ("dcgan-shapes", 2e-4)):
        casmo = grid / name / "casmo_adam-s0"
        confidence = run_summary.read_numeric_csv(casmo / "log.csv")["conf_g"]
        assert np.isfinite(confidence).sum() > 0
        record = json.loads((grid / f"{name}-control" / "control.json").read_text())["casmo_adam"]
        assert record["lr_g"] == pytest.approx(default_lr * np.nanmean(confidence), rel=1e-12)
        control = json.loads((grid / f"{name}-control" / "casmo_adam-control-s0" / "config.json").read_text())
        args = control["args"]
        assert (args["g_opt"], args["d_opt"], args["label"]) == ("adam", "adam", "casmo_adam-control")
        assert (args["lr_g"], args["lr_d"]) == (pytest.approx(record["lr_g"], rel=1e-12), default_lr)
    results = (grid / "results.md").read_text()
    assert results.count("| **casmo_adam-control** | 0 |") == 3  # toy, DCGAN losses, DCGAN quality
    assert "## dcgan-shapes-robustness" in results and "(robustness=0.0)** | 0 |" in results
    assert (grid / "plots" / "dcgan-shapes-control" / "compare_samples.png").is_file()


def test_published_outputs_redraw_the_same_tables(grid, tmp_path):
    published = grid / "published"
    assert not list(published.rglob("checkpoint.pt")) and (published / "results.md").is_file()
    assert (published / "dcgan-shapes-control" / "control.json").is_file()
    run = published / "dcgan-shapes" / "casmo_adam-s0"
    steps = run_summary.step_grids(grid / "dcgan-shapes" / "casmo_adam-s0")  # fewer than 4: all shown
    expected = {"final.jpg", "ema/final.jpg"} | {f"step_{step:06d}.jpg" for step in steps}
    published_grids = {str(path.relative_to(run / "samples")) for path in (run / "samples").rglob("*.jpg")}
    assert steps and published_grids == expected
    folders = [published / "dcgan-shapes-control", published / "dcgan-shapes"]
    plot_logs.report(plot_logs.parse_args([*map(str, folders), "--out", str(tmp_path / "redrawn")]))
    redrawn = (tmp_path / "redrawn" / "summary.csv").read_text()
    assert redrawn == (grid / "plots" / "dcgan-shapes-control" / "summary.csv").read_text()
    assert (tmp_path / "redrawn" / "compare_samples.png").is_file()


def test_second_run_skips_finished_runs_and_resumes_an_interrupted_one(grid, shapes_data_root):
    # As if stopped after its first epoch's checkpoint, of a grid of 2-epoch toy runs.
    folder = grid / "toy2d" / "casmo_adam-s0"
    shutil.rmtree(folder)
    command = next(
        job.command
        for job in benchmark.plan(benchmark.parse_args(TINY + ["--out", str(grid)]))["toy2d"]
        if job.folder == folder
    )
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True)
    result = run_benchmark("--out", str(grid), "--data-root", str(shapes_data_root), "--toy-epochs", "2")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "8 of 9 runs done before; 1 to run" in result.stdout
    assert "3 of 3 runs done before; 0 to run" in result.stdout  # the controls and the DCGAN sweep
    assert "--resume" in (grid / "logs" / "toy2d-casmo_adam-s0.log").read_text()
    assert (folder / benchmark.DONE_MARKER).is_file()
    epochs = [row.split(",")[0] for row in (folder / "quality.csv").read_text().splitlines()[1:]]
    assert epochs == ["1", "2"]


def test_ctrl_c_stops_the_grid_and_the_same_command_continues_it(tmp_path):
    toy_only = [
        "--toy-seeds",
        "1",
        "--toy-epochs",
        "3",
        "--dcgan-seeds",
        "0",
        "--sweep-robustness",
        "--control-configs",
    ]
    command = [sys.executable, "benchmark.py", *toy_only, "--jobs", "2", "--out", str(tmp_path)]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    grid = subprocess.Popen(
        command, cwd=ROOT, env=environment, start_new_session=True, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 300

    # Mid-run: a log row written (the toy checkpoints only every 10 epochs and when stopped).
    def logging() -> bool:
        return any(len(log.read_text().splitlines()) > 2 for log in tmp_path.glob("toy2d/*/log.csv"))

    while not logging() and time.monotonic() < deadline:
        time.sleep(0.2)
    os.killpg(grid.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the grid and its runs get it
    assert grid.wait(timeout=300) == 130
    assert b"run the same command again" in grid.stderr.read()
    stopped = [folder for folder in tmp_path.glob("toy2d/*") if not (folder / benchmark.DONE_MARKER).exists()]
    assert stopped and all((folder / "checkpoint.pt").is_file() for folder in stopped)
    result = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for folder in stopped:
        assert "--resume" in (tmp_path / "logs" / f"toy2d-{folder.name}.log").read_text()
        steps = [int(row.split(",")[0]) for row in (folder / "log.csv").read_text().splitlines()[1:]]
        assert steps == list(range(10, 3 * 79 + 1, 10))  # every 10th of 3 epochs' steps, each once
        assert (folder / "quality.csv").read_text().splitlines()[-1].startswith("3,")  # the last epoch


def test_a_failing_run_is_reported_with_its_log(tmp_path):
    # --subset 0 is refused by train_dcgan.py itself: the toy runs go on, the DCGAN ones fail.
    dcgan_only = ["--toy-seeds", "0", "--sweep-robustness", "--subset", "0", "--out", str(tmp_path / "out")]
    result = run_benchmark(*dcgan_only, "--dry-run")
    assert result.returncode == 0 and result.stdout.count("start") == 4
    result = run_benchmark(*dcgan_only)
    assert result.returncode == 1
    assert "4 run(s) failed" in result.stdout and "dcgan-shapes-adam_adam-s0.log" in result.stdout
    assert "run the same command again" in result.stdout
    assert "--subset" in (tmp_path / "out" / "logs" / "dcgan-shapes-adam_adam-s0.log").read_text()


def test_missing_data_stops_before_any_run_with_a_message(tmp_path):
    (tmp_path / "empty").mkdir()
    result = run_benchmark(
        "--dataset", "folder", "--data-root", str(tmp_path / "empty"), "--out", str(tmp_path / "out")
    )
    assert result.returncode == 1
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr
    assert not (tmp_path / "out" / "toy2d").exists()
