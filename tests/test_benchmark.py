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
import benchmark_plan
import benchmark_report
import gan_common
import paired_analysis
import plot_logs
import run_log
import run_summary
import sample_quality
import speed_settings
from casmo_ext.bench import cpu_model

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
TINY += ["--parts", "a", "c"]


def test_default_grid_is_the_protocols_parts(monkeypatch):
    # A CPU with native bf16 (AMX Xeon): the grid still runs fp32, one precision for every run.
    monkeypatch.setattr(speed_settings, "native_bf16", lambda device: (True, "mocked AMX"))
    args = benchmark.parse_args(["--stress-options", "--lr-d 8e-4"])
    parts = {part: benchmark_plan.plan(args, part) for part in "abc"}
    assert {part: {name: len(jobs) for name, jobs in sets.items()} for part, sets in parts.items()} == {
        "a": {"dcgan-shapes": 2 * 8},
        "b": {"dcgan-shapes-stress": 2 * 8},
        "c": {"dcgan-shapes": 2 * 5, "toy2d": 4 * 5, "toy2d-robustness": 2 * 2},
    }
    toy = parts["c"]["toy2d"]
    assert {(job.config, job.seed) for job in toy} == {
        (c, s) for c in benchmark_plan.CONFIGS for s in range(5)
    }
    assert all(
        "--epochs" in job.command and job.command[job.command.index("--epochs") + 1] == "200" for job in toy
    )
    casmo_casmo = next(job.command for job in parts["c"]["dcgan-shapes"] if job.config == "casmo_casmo")
    assert casmo_casmo[casmo_casmo.index("--g-opt") + 1] == "casmo"
    options = " ".join(casmo_casmo)
    for option in ("--max-steps 2000", "--eval-every 250", "--eval-samples 1000", "--amp off"):
        assert option in options
    assert "--g-ema-kimg 10 --g-ema-rampup 0.05" in options and "--channels-last" in casmo_casmo
    stress = parts["b"]["dcgan-shapes-stress"][0]
    assert stress.command[-4:] == ["--lr-d", "8e-4", "--out", str(stress.folder)]  # last: it wins
    sweep = {job.command[job.command.index("--robustness") + 1] for job in parts["c"]["toy2d-robustness"]}
    assert sweep == {"0.0", "1.0"}
    # The demo's --g-ema 0: no EMA G; a fixed decay instead of the ramp where one is asked for.
    assert benchmark_plan.ema_setting(benchmark.parse_args(["--g-ema", "0"]))[0] == []
    assert benchmark_plan.ema_setting(benchmark.parse_args(["--g-ema", "0.999"]))[0] == ["--g-ema", "0.999"]
    # Asked for, --amp auto still picks bf16 (and channels_last) where the CPU computes it natively.
    auto = benchmark_plan.plan(benchmark.parse_args(["--amp", "auto"]), "a")["dcgan-shapes"][0].command
    assert auto[auto.index("--amp") + 1] == "bf16" and "--channels-last" in auto


def test_amp_auto_is_fp32_on_a_cpu_without_native_bf16(monkeypatch):
    monkeypatch.setattr(speed_settings, "native_bf16", lambda device: (False, "mocked AVX2 EPYC"))
    args = benchmark.parse_args(["--amp", "auto"])
    command = benchmark_plan.plan(args, "a")["dcgan-shapes"][0].command
    assert command[command.index("--amp") + 1] == "off" and "--channels-last" in command
    assert args.speed_settings["chosen"] == {"amp": "off", "channels_last": True}
    assert benchmark_plan.plan(benchmark.parse_args(["--amp", "bf16"]), "a")["dcgan-shapes"][0].command.count(
        "--no-channels-last"
    )


def test_small_grid_and_full_dcgan_budget():
    small = benchmark.parse_args(["--small"])
    assert (small.toy_seeds, small.toy_epochs, small.dcgan_seeds, small.sweep_robustness) == (2, 60, 1, [])
    assert (small.control_configs, small.dcgan_sweep_robustness, small.parts) == ([], [], ["a", "c"])
    assert small.out == Path("runs/benchmark-small")
    full = benchmark_plan.plan(
        benchmark.parse_args(["--dataset", "tinyimagenet", "--dcgan-steps", "0", "--device", "cuda"]), "a"
    )
    command = full["dcgan-tinyimagenet"][0].command
    assert "--max-steps" not in command and command[command.index("--epochs") + 1] == "50"
    assert benchmark.parse_args(["--device", "cuda"]).jobs == 1


def test_the_parts_run_in_the_protocols_order(tmp_path, capsys):
    options = [
        "--dry-run",
        "--out",
        str(tmp_path),
        "--parts",
        "c",
        "b",
        "a",
        "--stress-options",
        "--subset 256",
    ]
    assert benchmark.main(options) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line for line in lines if line.startswith("part ")] == ["part a:", "part b:", "part c:"]
    sets = [Path(line.split()[-1]).parent.name for line in lines if line.startswith("start")]
    expected = ["dcgan-shapes"] * 16 + ["dcgan-shapes-stress"] * 16 + ["dcgan-shapes"] * 10
    assert sets == expected + ["toy2d"] * 20 + ["toy2d-robustness"] * 4
    assert lines.index("part b:") > max(i for i, line in enumerate(lines) if "part a's controls" in line)


def where(out: Path, published: Path, data_root: Path) -> list[str]:
    """benchmark.py's options of a test grid's folders: runs, published copies, data."""
    return ["--out", str(out), "--publish", str(published), "--data-root", str(data_root)]


def test_part_b_takes_its_setting_from_the_command_or_the_pilot_else_refuses(
    tmp_path, capsys, shapes_data_root
):
    out, published = tmp_path / "out", tmp_path / "published"
    command = ["--parts", "b", *where(out, published, shapes_data_root)]
    assert benchmark.main(command) == 1
    error = capsys.readouterr().err
    assert error.startswith("error: part b needs its stress setting: run `python benchmark.py --pilot` first")
    assert error.count("\n") == 1 and not (out / "dcgan-shapes-stress").exists()
    (published / "pilot").mkdir(parents=True)
    (published / "pilot" / "pilot.json").write_text(json.dumps({"chosen": "S3", "options": "--lr-d 8e-4"}))
    args = benchmark.parse_args(command)
    assert benchmark_plan.plan(args, "b")["dcgan-shapes-stress"][0].command[-4:-2] == ["--lr-d", "8e-4"]
    args = benchmark.parse_args([*command, "--stress-options", "--subset 256"])
    stress = benchmark_plan.plan(args, "b")["dcgan-shapes-stress"][0]
    assert stress.command[-4:-2] == ["--subset", "256"]
    # 2,000 steps of 16 images from 256: 125 epochs, or the default 50 would stop it at 800.
    for stress_command in (stress.command, stress.resume_command):
        assert " --epochs 125 --max-steps 2000" in " ".join(stress_command)
    assert " --epochs 50 --max-steps 2000 " in " ".join(
        benchmark_plan.plan(args, "a")["dcgan-shapes"][0].command
    )


def fake_runs(monkeypatch, exit_codes: dict[Path, int]) -> list[Path]:
    """benchmark.py's processes replaced: each run folder gets a status.json by its exit code
    (0 finished, 3 diverged; default 0); returns the folders started, in order."""
    started, real_run = [], subprocess.run

    def run(command, **options):
        if "--out" not in command:  # not a run: platform's uname, say
            return real_run(command, **options)
        folder = Path(command[command.index("--out") + 1])
        started.append(folder)
        folder.mkdir(parents=True, exist_ok=True)
        code = exit_codes.get(folder, 0)
        status = {0: "finished", 3: "diverged"}.get(code, "stopped")
        status_record = {"status": status, "step": 10, "cause": None, "checkpoint_step": None}
        (folder / run_log.STATUS_FILE).write_text(json.dumps(status_record))
        (folder / "log.csv").write_text("step,loss_d,conf_g,steps_per_sec\n10,0.5,0.25,2.0\n")
        (folder / "config.json").write_text(json.dumps({"script": "train_dcgan.py", "args": {"lr_g": 2e-4}}))
        return subprocess.CompletedProcess(command, code)

    monkeypatch.setattr(subprocess, "run", run)
    return started


def test_a_diverged_run_is_an_outcome_counted_not_run_again_nor_failed(tmp_path, monkeypatch, capsys):
    args = benchmark.parse_args(["--out", str(tmp_path / "out"), "--dcgan-seeds", "2", "--jobs", "1"])
    jobs = benchmark_plan.plan(args, "a")["dcgan-shapes"]  # seed by seed: adam_adam, casmo_adam of 0, then 1
    before, now, finishes, fails = jobs
    before.folder.mkdir(parents=True)
    status = {"status": "diverged", "step": 120, "cause": "loss_d is nan", "checkpoint_step": 100}
    (before.folder / run_log.STATUS_FILE).write_text(json.dumps(status))
    (before.folder / "checkpoint.pt").write_bytes(b"")  # a checkpoint does not make it resumable
    (before.folder / "config.json").write_text("{}")
    assert benchmark_plan.state(before) == "diverged"
    started = fake_runs(monkeypatch, {now.folder: 3, fails.folder: 1})
    (tmp_path / "logs").mkdir()
    ran = benchmark.run_all(jobs, args, tmp_path / "logs", "part a")
    printed = capsys.readouterr().out
    assert sorted(started) == sorted([now.folder, finishes.folder, fails.folder])
    assert "part a: 1 of 4 runs done before; 3 to run, 1 at once (1 diverged, 3 start)" in printed
    assert (
        "diverged: dcgan-shapes/casmo_adam-s0" in printed and "failed: dcgan-shapes/casmo_adam-s1" in printed
    )
    assert benchmark.failures(ran) == [(fails, tmp_path / "logs" / "dcgan-shapes-casmo_adam-s1.log")]
    assert [benchmark_plan.state(job) for job in jobs] == ["diverged", "diverged", "done", "restart"]
    # results.md counts both diverged runs with the finished one; the failed one is left out.
    compared = {}
    monkeypatch.setattr(benchmark_report, "report_sets", lambda args, sets: {name: [] for name in sets})
    monkeypatch.setattr(
        paired_analysis, "results_sections", lambda sets: compared.update(sets) or ["(compared)"]
    )
    results = benchmark_report.write_out(args, {"dcgan-shapes": jobs}, []).read_text()
    assert compared == {"dcgan-shapes": [before.folder, now.folder, finishes.folder]}
    assert (
        "(compared)" in results and "Parts complete here: none; not run, or not complete: a, b, c." in results
    )


def test_no_run_is_added_beside_runs_scored_in_another_feature_space(tmp_path, monkeypatch):
    args = benchmark.parse_args(["--out", str(tmp_path / "out"), "--dcgan-seeds", "1", "--jobs", "1"])
    finished, todo = benchmark_plan.plan(args, "a")["dcgan-shapes"]
    finished.folder.mkdir(parents=True)
    status = {"status": "finished", "step": 10, "cause": None, "checkpoint_step": None}
    (finished.folder / run_log.STATUS_FILE).write_text(json.dumps(status))
    config = {"script": "train_dcgan.py", "args": {}, "feature_space": "shapes-cnn-v1-0123456789"}
    (finished.folder / "config.json").write_text(json.dumps(config))
    started = fake_runs(monkeypatch, {})
    shipped = sample_quality.shapes_feature_space().name
    with pytest.raises(
        gan_common.RunError, match=f"in feature space shapes-cnn-v1-0123456789, this checkout's is {shipped}"
    ):
        benchmark.run_all([finished, todo], args, tmp_path, "part a")
    assert started == []
    (finished.folder / "config.json").write_text(json.dumps(config | {"feature_space": shipped}))
    benchmark.run_all([finished, todo], args, tmp_path, "part a")
    assert started == [todo.folder]


def test_the_pilot_runs_adam_under_each_candidate_and_part_b_takes_its_choice(
    tmp_path, monkeypatch, capsys, shapes_data_root
):
    out, published = tmp_path / "out", tmp_path / "published"
    started = fake_runs(monkeypatch, {})
    monkeypatch.setattr(benchmark, "probe_speed", lambda args: 1.0)
    candidates = {}

    def pilot_table(runs):
        candidates.update(runs)
        return "S2", ["| the pilot's table |"]

    monkeypatch.setattr(paired_analysis, "pilot_table", pilot_table)
    command = ["--pilot", *where(out, published, shapes_data_root)]
    assert benchmark.main(command) == 0
    printed = capsys.readouterr().out
    assert 'part b runs with --stress-options "--lr-g 8e-4 --lr-d 8e-4"' in printed
    assert "9 DCGAN runs to do (pilot: 9): about" in printed
    assert sorted(candidates) == ["S1", "S2", "S3"] and len(started) == 9
    assert candidates["S1"] == [out / "pilot" / "S1" / f"adam_adam-s{seed}" for seed in (100, 101, 102)]
    first = benchmark_plan.plan_pilot(benchmark.parse_args(command))["S1"][0].command
    assert first[first.index("--max-steps") + 1] == "1000" and first[-4:-2] == ["--subset", "256"]
    assert first[first.index("--epochs") + 1] == "63"  # 1,000 steps of 16 from 256 images
    for root in (out, published):
        assert json.loads((root / "pilot" / "pilot.json").read_text()) == {
            "chosen": "S2",
            "options": "--lr-g 8e-4 --lr-d 8e-4",
        }
        assert "| the pilot's table |" in (root / "pilot" / "pilot.md").read_text()
    assert (published / "pilot" / "S3" / "adam_adam-s102" / run_log.STATUS_FILE).is_file()
    # Elsewhere, with the published folder checked out: part b runs with the pilot's choice.
    elsewhere = benchmark.parse_args(["--out", str(tmp_path / "elsewhere"), "--publish", str(published)])
    assert benchmark_plan.stress_options(elsewhere) == ["--lr-g", "8e-4", "--lr-d", "8e-4"]


def test_the_estimate_times_the_runs_to_do_by_a_run_made_here_else_a_probe(tmp_path, monkeypatch):
    args = benchmark.parse_args(["--out", str(tmp_path), "--parts", "a", "b", "--jobs", "2"])
    monkeypatch.setattr(benchmark, "probe_speed", lambda args: 1.25)
    hours = 12 * (2000 / 1.25 + 8 * 15) / 3600  # 16 runs and their 8 controls, 2 at once
    assert benchmark.grid_estimate(args) == (
        f"24 DCGAN runs to do (part a: 24): about {hours:.1f} h on this CPU (1.25 steps/s per run, 2 at "
        "once); the grid stops before part b, which needs its stress setting (--pilot)"
    )
    run = tmp_path / "dcgan-shapes" / "adam_adam-s0"  # made here, at the grid's precision
    run.mkdir(parents=True)
    config = {"script": "train_dcgan.py", "args": {"amp": "off"}, "environment": {"cpu": cpu_model()}}
    (run / "config.json").write_text(json.dumps(config))
    (run / "log.csv").write_text("step,steps_per_sec\n10,0.5\n20,1.0\n30,4.0\n")
    (run / "quality.csv").write_text("step,eval_seconds\n10,30\n")
    (run / benchmark_plan.DONE_MARKER).write_text("")
    monkeypatch.setattr(benchmark, "probe_speed", None)  # not called
    toy_only = benchmark.parse_args(["--out", str(tmp_path / "toy"), "--parts", "c", "--dcgan-seeds", "0"])
    assert benchmark.runs_to_do(toy_only, "c")["dcgan"] == 0  # no DCGAN run to sweep from
    assert benchmark.grid_estimate(toy_only) == "0 DCGAN runs to do, and 39 toy runs (minutes each)"
    hours = 12 * (2000 / 1.0 + 8 * 30) / 3600
    args.parts = ["a"]
    assert benchmark.grid_estimate(args) == (
        f"23 DCGAN runs to do (part a: 23): about {hours:.1f} h on this CPU (1.00 steps/s per run, 2 at once)"
    )


def test_the_probe_times_a_few_steps_of_the_grids_run(tmp_path, monkeypatch):
    monkeypatch.setattr(benchmark, "PROBE_STEPS", 10)  # one logged interval
    args = benchmark.parse_args(["--out", str(tmp_path), "--subset", "32", "--data-root", str(tmp_path)])
    assert 0 < benchmark.probe_speed(args) < 1000


def test_a_one_seed_set_quotes_the_published_grids_spread(tmp_path):
    reference = tmp_path / "reference" / "dcgan-shapes"
    for seed, kid in enumerate([300.0, 340.0, 320.0]):
        (reference / f"adam_adam-s{seed}").mkdir(parents=True)
        (reference / f"adam_adam-s{seed}" / "quality.csv").write_text(
            f"step,kid,kid_ema\n500,1,{kid + 50}\n1000,1,{kid}\n"
        )
    args = benchmark.parse_args(
        [
            "--out",
            str(tmp_path / "demo"),
            "--grid-reference",
            str(tmp_path / "reference"),
            "--dcgan-seeds",
            "1",
        ]
    )
    jobs = benchmark_plan.plan(args, "a")["dcgan-shapes"]
    for job in jobs:
        job.folder.mkdir(parents=True)
        (job.folder / "quality.csv").write_text("step,kid\n500,9\n1000,9\n")
    assert benchmark_report.one_seed("dcgan-shapes", jobs)
    caveat = benchmark_report.one_seed_caveat(args, "dcgan-shapes", jobs)[0]
    assert caveat.startswith("One seed at one budget is an illustration, not evidence: at step 1000,")
    assert "adam_adam 300–340 (mean 320, 3 seeds)" in caveat
    assert "; none at that step for casmo_adam." in caveat
    assert caveat.endswith("docs/benchmark_results.md.")
    shutil.rmtree(reference / "adam_adam-s1")
    shutil.rmtree(reference / "adam_adam-s2")
    caveat = benchmark_report.one_seed_caveat(args, "dcgan-shapes", jobs)[0]
    assert "adam_adam 300 (1 seed); none at that step for casmo_adam." in caveat
    args.grid_reference = tmp_path / "nothing published"
    caveat = benchmark_report.one_seed_caveat(args, "dcgan-shapes", jobs)[0]
    assert "has no evaluation at step 1000 to compare with. Whether CASMO helps" in caveat


def run_benchmark(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "benchmark.py", *TINY, *arguments],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
    )


@pytest.fixture(scope="module")
def part_a(tmp_path_factory, shapes_data_root) -> tuple[Path, subprocess.CompletedProcess, str]:
    """The miniature grid's first command, of all three parts: part a runs, then part b stops
    the grid (no stress setting). Its folder, its outcome and results.md as it left it."""
    out = tmp_path_factory.mktemp("grid")
    result = run_benchmark(*where(out, out / "published", shapes_data_root), "--parts", "a", "b", "c")
    return out, result, (out / "results.md").read_text() if (out / "results.md").is_file() else ""


@pytest.fixture(scope="module")
def grid(part_a, shapes_data_root) -> Path:
    """The same command with TINY's parts, a and c: it continues the grid."""
    out = part_a[0]
    result = run_benchmark(
        "--out", str(out), "--data-root", str(shapes_data_root), "--publish", str(out / "published")
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "part a: 2 of 2 runs done before; 0 to run" in result.stdout
    return out


def test_part_b_without_a_stress_setting_stops_the_grid_with_part_a_written(part_a):
    out, result, results = part_a
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1].startswith("error: part b needs its stress setting")
    assert "Parts complete here: a; not run, or not complete: b, c." in results
    assert "## dcgan-shapes-control" in results and "## toy2d" not in results
    assert "3 DCGAN runs to do (part a: 3): not timed" in result.stdout  # the estimate line
    published = out / "published" / "dcgan-shapes" / "adam_adam-s0"
    assert (published / "log.csv").is_file() and (out / "published" / "results.md").is_file()


def test_grid_writes_runs_figures_and_results(grid):
    for name in ("toy2d", "dcgan-shapes"):
        for config in benchmark_plan.CONFIGS:
            assert (grid / name / f"{config}-s0" / benchmark_plan.DONE_MARKER).is_file()
        assert (grid / "plots" / name / "comparison_2x2.png").is_file()
    results = (grid / "results.md").read_text()
    tables, compared = results.split("## Endpoints and paired comparisons")  # then paired_analysis's
    for config in benchmark_plan.CONFIGS:
        # A row in the toy table, the DCGAN's two, and again in the control sets' tables.
        assert tables.count(f"| **{config}** | 0 |") == 6
    assert (
        "| **casmo_casmo (robustness=0.0)** | 0 |" in tables
        and "| **casmo_casmo (robustness=0.5)** | 0 |" in tables
    )
    assert "torch 2." in results and (grid / "machine.json").is_file()
    assert "Parts complete here: a, c; not run, or not complete: b." in results
    # One seed: the caveat; the published grid (docs/results) has nothing at step 10 to quote.
    caveat = "One seed at one budget is an illustration, not evidence: the published grid in "
    assert results.count(caveat) == 3
    assert results.count("has no evaluation at step 10 to compare with") == 3
    assert compared.strip()  # paired_analysis's sections


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
    results = (grid / "results.md").read_text().split("## Endpoints and paired comparisons")[0]
    assert results.count("| **casmo_adam-control** | 0 |") == 3  # toy, DCGAN losses, DCGAN quality
    assert "## dcgan-shapes-robustness" in results and "(robustness=0.0)** | 0 |" in results
    assert (grid / "plots" / "dcgan-shapes-control" / "compare_samples.png").is_file()
    # Per-run figures of the control's own runs only: the base runs' are drawn with their set.
    for name in ("toy2d", "dcgan-shapes"):
        drawn = [path.name for path in (grid / "plots" / f"{name}-control").iterdir() if path.is_dir()]
        assert drawn == ["casmo_adam-control-s0"]


def test_published_outputs_redraw_the_same_tables(grid, tmp_path):
    published = grid / "published"
    assert not list(published.rglob("checkpoint.pt")) and (published / "results.md").is_file()
    assert (published / "dcgan-shapes-control" / "control.json").is_file()
    run = published / "dcgan-shapes" / "casmo_adam-s0"
    steps = run_summary.step_grids(grid / "dcgan-shapes" / "casmo_adam-s0")  # fewer than 4: all shown
    expected = {"final.jpg", "ema/final.jpg"} | {f"step_{step:06d}.jpg" for step in steps}
    published_grids = {str(path.relative_to(run / "samples")) for path in (run / "samples").rglob("*.jpg")}
    assert steps and published_grids == expected
    local = grid / "dcgan-shapes" / "casmo_adam-s0"
    assert (run / run_log.STATUS_FILE).is_file() == (local / run_log.STATUS_FILE).is_file()
    folders = [published / "dcgan-shapes-control", published / "dcgan-shapes"]
    plot_logs.report(plot_logs.parse_args([*map(str, folders), "--out", str(tmp_path / "redrawn")]))
    redrawn = (tmp_path / "redrawn" / "summary.csv").read_text()
    assert redrawn == (grid / "plots" / "dcgan-shapes-control" / "summary.csv").read_text()
    assert (tmp_path / "redrawn" / "compare_samples.png").is_file()


def test_a_published_run_is_skipped_and_read_where_it_is(grid, tmp_path, monkeypatch, capsys):
    # Another machine: an empty OUT, and the published folder checked out.
    published = tmp_path / "published"
    shutil.copytree(grid / "published" / "toy2d", published / "toy2d")
    finished = {"status": "finished", "step": 79, "cause": None, "checkpoint_step": None}
    for run in (published / "toy2d").iterdir():
        if not (run / run_log.STATUS_FILE).is_file():  # a script that writes no status.json yet
            (run / run_log.STATUS_FILE).write_text(json.dumps(finished))
    args = benchmark.parse_args(TINY + ["--out", str(tmp_path / "out"), "--publish", str(published)])
    toy = benchmark_plan.plan(args, "c")["toy2d"]
    assert {benchmark_plan.state(job) for job in toy} == {"published"}
    assert all(job.location == published / "toy2d" / job.folder.name for job in toy)
    monkeypatch.setattr(subprocess, "run", None)  # nothing may start
    assert benchmark.run_all(toy, args, tmp_path, "part c") == []
    assert "part c: 4 of 4 runs done before; 0 to run, 2 at once (4 published)" in capsys.readouterr().out
    # The control's learning rate from the published log.csv; control.json published as it is written.
    control = benchmark_plan.plan_controls(args, {"toy2d": toy})["toy2d-control"][0]
    confidence = run_summary.read_numeric_csv(published / "toy2d" / "casmo_adam-s0" / "log.csv")["conf_g"]
    lr_g = float(control.command[control.command.index("--lr-g") + 1])
    assert lr_g == pytest.approx(2e-4 * np.nanmean(confidence), rel=1e-12)
    assert (published / "toy2d-control" / "control.json").is_file()
    # Continued on a third machine: the published rates are kept, not computed again.
    shutil.rmtree(tmp_path / "out")
    (published / "toy2d-control" / "control.json").write_text(json.dumps({"casmo_adam": {"lr_g": 1.25e-4}}))
    control = benchmark_plan.plan_controls(args, {"toy2d": toy})["toy2d-control"][0]
    assert control.command[control.command.index("--lr-g") + 1] == "0.000125"


def test_second_run_skips_finished_runs_and_resumes_an_interrupted_one(grid, shapes_data_root):
    # As if stopped after its first epoch's checkpoint, of a grid of 2-epoch toy runs.
    folder = grid / "toy2d" / "casmo_adam-s0"
    shutil.rmtree(folder)
    command = next(
        job.command
        for job in benchmark_plan.plan(benchmark.parse_args(TINY + ["--out", str(grid)]), "c")["toy2d"]
        if job.folder == folder
    )
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True)
    stopped = {"status": "stopped", "step": 79, "cause": "SIGINT", "checkpoint_step": 79}
    (folder / run_log.STATUS_FILE).write_text(json.dumps(stopped))  # what a stopped run says

    def drawn() -> dict[str, int]:
        return {
            name: (grid / "plots" / name / benchmark_report.DRAWN_FILE).stat().st_mtime_ns for name in sets
        }

    sets = ("toy2d", "dcgan-shapes")
    drawn_before = drawn()
    result = run_benchmark("--out", str(grid), "--data-root", str(shapes_data_root), "--toy-epochs", "2")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "part a: 2 of 2 runs done before; 0 to run" in result.stdout
    assert "part c: 6 of 7 runs done before; 1 to run, 2 at once (6 done, 1 resume)" in result.stdout
    # The controls and the DCGAN sweep.
    assert "part c, controls and sweep: 2 of 2 runs done before; 0 to run" in result.stdout
    # Figures: redrawn where a run changed (the toy and its control), else left as drawn.
    for name in ("dcgan-shapes", "dcgan-shapes-control", "dcgan-shapes-robustness", "toy2d-robustness"):
        assert f"figures of {name}: its runs are as when drawn" in result.stdout
    assert "figures of toy2d:" not in result.stdout and "figures of toy2d-control:" not in result.stdout
    drawn_after = drawn()
    assert drawn_after["toy2d"] > drawn_before["toy2d"]
    assert drawn_after["dcgan-shapes"] == drawn_before["dcgan-shapes"]
    assert "--resume" in (grid / "logs" / "toy2d-casmo_adam-s0.log").read_text()
    assert (folder / benchmark_plan.DONE_MARKER).is_file()
    epochs = [row.split(",")[0] for row in (folder / "quality.csv").read_text().splitlines()[1:]]
    assert epochs == ["1", "2"]


def test_ctrl_c_stops_the_grid_and_the_same_command_continues_it(tmp_path, shapes_data_root):
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
    command = [sys.executable, "benchmark.py", *toy_only, "--configs", "adam_adam", "casmo_adam"]
    command += ["--jobs", "2", "--out", str(tmp_path)]  # both runs at once, both stopped mid-run
    command += ["--data-root", str(shapes_data_root)]  # real features computed once per session
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    grid = subprocess.Popen(
        command, cwd=ROOT, env=environment, start_new_session=True, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 300

    # Both mid-run: a log row written by each (the toy checkpoints only every 10 epochs and
    # when stopped; a run stopped before its first step has no checkpoint, and is restarted).
    def logging() -> bool:
        logs = list(tmp_path.glob("toy2d/*/log.csv"))
        return len(logs) == 2 and all(len(log.read_text().splitlines()) > 2 for log in logs)

    while not logging() and time.monotonic() < deadline:
        time.sleep(0.2)
    os.killpg(grid.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the grid and its runs get it
    assert grid.wait(timeout=300) == 130
    assert b"run the same command again" in grid.stderr.read()
    stopped = [
        folder for folder in tmp_path.glob("toy2d/*") if not (folder / benchmark_plan.DONE_MARKER).exists()
    ]
    assert stopped and all((folder / "checkpoint.pt").is_file() for folder in stopped)
    result = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for folder in stopped:
        assert "--resume" in (tmp_path / "logs" / f"toy2d-{folder.name}.log").read_text()
        steps = [int(row.split(",")[0]) for row in (folder / "log.csv").read_text().splitlines()[1:]]
        assert steps == list(range(10, 3 * 79 + 1, 10))  # every 10th of 3 epochs' steps, each once
        assert (folder / "quality.csv").read_text().splitlines()[-1].startswith("3,")  # the last epoch


def test_a_failing_run_is_reported_with_its_log(tmp_path, shapes_data_root):
    # --subset 0 is refused by train_dcgan.py itself: the toy runs go on, the DCGAN ones fail.
    dcgan_only = ["--toy-seeds", "0", "--sweep-robustness", "--subset", "0", "--out", str(tmp_path / "out")]
    dcgan_only += ["--data-root", str(shapes_data_root)]  # real features computed once per session
    result = run_benchmark(*dcgan_only, "--dry-run")
    assert result.returncode == 0 and result.stdout.count("start") == 4
    result = run_benchmark(*dcgan_only)
    assert result.returncode == 1
    # Part a's two runs: the grid stops after the part that failed.
    assert "2 run(s) failed" in result.stdout and "dcgan-shapes-adam_adam-s0.log" in result.stdout
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
