"""plot_logs.py on run folders fabricated here after the training scripts' format: toy and DCGAN
runs, several seeds and configurations, different logging intervals, a run cut off mid-line,
and folders that are not runs."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import matplotlib.figure
import matplotlib.pyplot as plt
import numpy as np
import pytest

import plot_logs
import run_log
import run_summary

LOG_COLUMNS = [*run_log.LOG_COLUMNS, "steps_per_sec"]
PER_RUN_FIGURES = ["loss_plot.png", "score_plot.png", "optimizer_plot.png", "grad_norm_plot.png"]
COMPARE_FIGURES = ["compare_loss.png", "compare_scores.png", "compare_grad_norm.png", "comparison_2x2.png"]
COMPARE_FIGURES += ["compare_quality.png"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------
# Fabricating run folders


def make_run(
    folder: Path,
    script: str = "train_toy2d.py",
    g_opt: str = "adam",
    d_opt: str = "adam",
    seed: int = 0,
    log_every: int = 10,
    steps: int = 400,
    columns: dict[str, list[float]] | None = None,
    cut_off: bool = False,
) -> Path:
    """A run folder as the scripts write it. `columns` replaces the random log (its length sets
    the number of rows, logged at steps 0, log_every, ...); `cut_off` leaves a half-written line."""
    folder.mkdir(parents=True)
    args = {"g_opt": g_opt, "d_opt": d_opt, "seed": seed, "epochs": 4, "bs": 64, "log_every": log_every}
    args |= {"robustness": 0.5} | ({"dataset": "shapes"} if script == "train_dcgan.py" else {})
    config = {"script": script, "args": args, "device": "cpu", "environment": {"python": "3"}}
    (folder / "config.json").write_text(json.dumps(config))
    log = columns or random_log(np.random.default_rng(seed), steps // log_every)
    n_rows = len(next(iter(log.values())))
    log = {
        "step": [i * log_every for i in range(n_rows)],
        "epoch": [i * 4 // n_rows for i in range(n_rows)],
        **log,
    }
    for network, optimizer in (("g", g_opt), ("d", d_opt)):
        if optimizer == "adam":  # Adam has no AGAR / confidence: the scripts write empty fields
            log[f"agar_{network}"] = log[f"conf_{network}"] = [""] * n_rows
    write_csv(folder / "log.csv", LOG_COLUMNS, log)
    if cut_off:
        with open(folder / "log.csv", "a") as handle:
            handle.write(f"{n_rows * log_every},3,0.69,1.2")
    if script == "train_toy2d.py":
        write_csv(
            folder / "quality.csv",
            ["epoch", "step", "mmd", "swd", "on_support", "left_share", "right_share", "coverage_ok"],
            toy_quality(),
        )
        points = np.random.default_rng(seed).normal(size=(300, 2))
        write_csv(folder / "real.csv", ["x", "y"], {"x": points[:, 0], "y": points[:, 1]})
        write_csv(folder / "generated.csv", ["x", "y"], {"x": points[:, 0] * 0.8, "y": points[:, 1] * 0.8})
    else:
        names = run_log.DCGAN_QUALITY_COLUMNS
        write_csv(
            folder / "quality.csv",
            names,
            {name: [1, 2, 3, 4] for name in names}
            | {
                "diversity_ratio": [0.5, 0.6, 0.7, 0.8],
                "kid": [9, 7, 5, 3 + seed],
                "recall": [0, 0, 0, seed / 50],
            },
        )
    return folder


def random_log(rng: np.random.Generator, n_rows: int) -> dict[str, list]:
    t = np.linspace(0, 1, n_rows)
    log = {
        "loss_d": 1.3 - 0.6 * t + 0.1 * rng.normal(size=n_rows),
        "loss_g": 0.8 + 1.0 * t + 0.2 * rng.normal(size=n_rows),
        "d_x": np.clip(0.5 + 0.3 * t + 0.05 * rng.normal(size=n_rows), 0, 1),
        "d_g_z": np.clip(0.5 - 0.3 * t + 0.05 * rng.normal(size=n_rows), 0, 1),
        "agar_g": 0.3 + 0.1 * rng.random(n_rows),
        "conf_g": 0.6 + 0.1 * rng.random(n_rows),
        "agar_d": 0.2 + 0.1 * rng.random(n_rows),
        "conf_d": 0.5 + 0.1 * rng.random(n_rows),
        "grad_norm_g": np.exp(rng.normal(size=n_rows)),
        "grad_norm_d": np.exp(rng.normal(size=n_rows) - 1),
    }
    log = {name: list(values) for name, values in log.items()}
    log["steps_per_sec"] = ["" if i % 3 else 100.0 + i for i in range(n_rows)]  # not every row has one
    return log


def toy_quality() -> dict[str, list]:
    return {
        "epoch": [1, 2, 3, 4],
        "step": [100, 200, 300, 400],
        "mmd": [0.5, 0.2, 0.1, 0.05],
        "swd": [0.4, 0.3, 0.2, 0.1],
        "on_support": [0.2, 0.5, 0.8, 0.9],
        "left_share": [0.9, 0.7, 0.6, 0.5],
        "right_share": [0.1, 0.3, 0.4, 0.5],
        "coverage_ok": ["False", "False", "True", "True"],
    }


def write_csv(path: Path, header: list[str], columns: dict[str, list]) -> None:
    n_rows = len(next(iter(columns.values())))
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for i in range(n_rows):
            writer.writerow([columns[name][i] if name in columns else "" for name in header])


def snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    """Every path below `folder`, with each file's modification time and bytes."""
    return {
        str(path): (path.stat().st_mtime_ns, path.read_bytes() if path.is_file() else b"")
        for path in sorted(folder.rglob("*"))
    }


def run_main(argv: list[str]) -> tuple[int, str]:
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        code = plot_logs.main(argv)
    return code, output.getvalue()


def summary_rows(out: Path) -> list[dict[str, str]]:
    with open(out / "summary.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def is_png(path: Path) -> bool:
    import matplotlib.pyplot as plt

    return path.read_bytes()[:8] == PNG_SIGNATURE and plt.imread(path).ndim == 3


# ---------------------------------------------------------------------------------------------
# One plotting of a mixed set of runs, shared by the tests below

TOY_RUNS = {
    "toy_aa_s0": dict(seed=0, log_every=5),
    "toy_aa_s1": dict(seed=1, log_every=10),
    "toy_ca_s0": dict(g_opt="casmo", seed=0, log_every=10),
    "toy_cc_s0": dict(g_opt="casmo", d_opt="casmo", seed=0, cut_off=True),
}
DCGAN_RUNS = {
    "dc_aa_s0": dict(seed=0),
    "dc_ac_s0": dict(d_opt="casmo", seed=0, log_every=8),
    "dc_ac_s1": dict(d_opt="casmo", seed=1, log_every=16),
}
NOT_RUNS = {
    "empty_folder": "no config.json",
    "header_only": "no complete data row",
    "no_config": "no config.json",
}


@pytest.fixture(scope="module", autouse=True)
def low_resolution():
    """The tests read the files, not the pixels, and rendering is most of their time."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(plot_logs, "DPI", 60)
        yield


@pytest.fixture(scope="module")
def plotted(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("runs")
    for name, options in TOY_RUNS.items():
        make_run(root / name, **options)
    for name, options in DCGAN_RUNS.items():
        make_run(root / name, script="train_dcgan.py", **options)
    (root / "empty_folder").mkdir()
    header_only = make_run(root / "header_only")
    (header_only / "log.csv").write_text(",".join(LOG_COLUMNS) + "\n")
    no_config = make_run(root / "no_config")
    (no_config / "config.json").unlink()
    before = snapshot(root)
    out = tmp_path_factory.mktemp("out") / "plots"
    code, printed = run_main([str(path) for path in sorted(root.iterdir())] + ["--out", str(out)])
    return {"root": root, "out": out, "code": code, "printed": printed, "before": before}


def test_every_figure_is_written_as_png(plotted):
    out = plotted["out"]
    assert plotted["code"] == 0
    for name in TOY_RUNS:
        for figure in PER_RUN_FIGURES + ["quality_plot.png", "scatter.png"]:
            assert is_png(out / name / figure), f"{name}/{figure}"
    for name in DCGAN_RUNS:
        for figure in PER_RUN_FIGURES + ["quality_plot.png"]:
            assert is_png(out / name / figure), f"{name}/{figure}"
        assert not (out / name / "scatter.png").exists()
    for prefix in ("toy2d_", "dcgan_"):  # two scripts: compared separately
        for figure in COMPARE_FIGURES:
            assert is_png(out / f"{prefix}{figure}"), prefix + figure
    assert not (out / "comparison_2x2.png").exists()
    assert str(out / "summary.md") in plotted["printed"]


def test_summary_has_a_row_per_configuration_and_per_run(plotted):
    rows = summary_rows(plotted["out"])
    configurations = {
        (row["set"], row["name"], row["seeds"]) for row in rows if row["scope"] == "configuration"
    }
    assert configurations == {
        ("toy2d", "adam_adam", "0,1"),
        ("toy2d", "casmo_adam", "0"),
        ("toy2d", "casmo_casmo", "0"),
        ("dcgan (shapes)", "adam_adam", "0"),
        ("dcgan (shapes)", "adam_casmo", "0,1"),
    }
    assert {row["name"] for row in rows if row["scope"] == "run"} == set(TOY_RUNS) | set(DCGAN_RUNS)
    assert [row["name"] for row in rows if row["set"] == "toy2d"][:3] == [
        "adam_adam",
        "casmo_adam",
        "casmo_casmo",
    ]
    for column in (
        "d_final",
        "g_final",
        "stabilised",
        "g_trend",
        "d_dominated_share",
        "steps_per_sec_median",
    ):
        assert all(row[column] != "" for row in rows), column
    toy = next(row for row in rows if row["name"] == "toy_aa_s0")
    assert float(toy["on_support_final"]) == 0.9
    assert float(toy["on_support_last3"]) == pytest.approx((0.5 + 0.8 + 0.9) / 3)
    assert float(toy["mmd_final"]) == 0.05
    dcgan = next(row for row in rows if row["name"] == "dc_ac_s1")
    assert float(dcgan["diversity_ratio_final"]) == 0.8


def test_configuration_row_is_mean_and_std_over_seeds(plotted):
    rows = summary_rows(plotted["out"])
    seeds = [float(row["d_final"]) for row in rows if row["name"] in ("toy_aa_s0", "toy_aa_s1")]
    config = next(
        row
        for row in rows
        if row["scope"] == "configuration" and row["name"] == "adam_adam" and row["set"] == "toy2d"
    )
    assert float(config["d_final"]) == pytest.approx(np.mean(seeds), rel=1e-5)
    assert float(config["d_final_std"]) == pytest.approx(np.std(seeds, ddof=1), rel=1e-5)
    assert config["d_collapsed"] == "0/2"


def test_summary_md_is_a_markdown_table_with_definitions(plotted):
    text = (plotted["out"] / "summary.md").read_text()
    assert (
        "### toy2d: loss statistics" in text
        and "### dcgan (shapes): convergence checks, quality, speed" in text
    )
    table_rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert any(line.startswith("| **adam_adam** | 0,1 |") and " ± " in line for line in table_rows)
    assert any(line.startswith("| toy_cc_s0 | 0 |") for line in table_rows)
    widths = {line.count("|") for line in text.splitlines()[2:4]}
    assert len(widths) == 1  # the header, separator and rows have the same number of cells
    for threshold in (
        run_summary.D_COLLAPSED_BELOW,
        run_summary.STABLE_MAX_CV,
        run_summary.WILD_OSCILLATION_RATIO,
    ):
        assert str(threshold) in text
    assert "last 10% of logged steps" in text
    assert "### dcgan (shapes): sample quality at the last evaluation" in text and "t-interval" in text


def test_sample_measures_get_a_95_percent_interval_over_seeds(plotted):
    """dc_ac_s0 and dc_ac_s1 end at KID 3 and 4: mean 3.5, t-interval 12.706 x 0.707 / 1.414 either
    side. Their recall, 0 and 0.02, has a range: a bootstrap interval, where a t-interval would
    reach -0.12."""
    rows = summary_rows(plotted["out"])
    config = next(row for row in rows if row["scope"] == "configuration" and row["name"] == "adam_casmo")
    assert float(config["kid_final"]) == 3.5
    half = 12.706 * np.std([3, 4], ddof=1) / np.sqrt(2)
    assert float(config["kid_final_ci95_low"]) == pytest.approx(3.5 - half, rel=1e-3)
    assert float(config["kid_final_ci95_high"]) == pytest.approx(3.5 + half, rel=1e-3)
    assert float(config["recall_final_ci95_low"]) == 0 and float(config["recall_final_ci95_high"]) == 0.02
    text = (plotted["out"] / "summary.md").read_text()
    assert "| **adam_casmo** | 0,1 | 0/2 | 3.50 [-2.85, 9.85] |" in text  # seeds, diverged, KID
    assert "| 0.0100 [0.00, 0.0200] |" in text  # recall
    assert "bootstrap percentile interval" in text


def test_skipped_folders_are_reported_with_the_reason(plotted):
    printed = plotted["printed"]
    for name, reason in NOT_RUNS.items():
        line = next(line for line in printed.splitlines() if line.startswith("skipped") and name in line)
        assert reason in line
    assert not any((plotted["out"] / name).exists() for name in NOT_RUNS)


def test_run_folders_are_not_written_to(plotted):
    assert snapshot(plotted["root"]) == plotted["before"]


def test_cut_off_last_line_is_skipped(plotted):
    rows = summary_rows(plotted["out"])
    run = next(row for row in rows if row["name"] == "toy_cc_s0")
    assert int(run["rows"]) == 40 and float(run["last_step"]) == 390
    assert "toy_cc_s0/log.csv: skipped 1 malformed row" in plotted["printed"]


# ---------------------------------------------------------------------------------------------
# Statistics on logs whose answers are known by hand


def summary_of(tmp_path: Path, **columns) -> dict:
    n_rows = len(next(iter(columns.values())))
    filler = {name: [0.5] * n_rows for name in ("loss_d", "loss_g", "d_x", "d_g_z")}
    run = make_run(tmp_path / "run", columns=filler | {name: list(v) for name, v in columns.items()})
    return run_summary.run_summary(run_summary.load_run(run))


def test_statistics_of_a_falling_d_loss(tmp_path):
    # 20 rows: D loss 1.00, 0.95, ..., 0.05; G loss flat at 2; D(x) near the real label 0.9 from
    # row 10, D(G(z)) below 0.05 from row 15: D won outright on the last 5 rows.
    d_loss = [1.0 - 0.05 * i for i in range(20)]
    summary = summary_of(
        tmp_path, loss_d=d_loss, loss_g=[2.0] * 20, d_x=[0.5] * 10 + [0.8] * 10, d_g_z=[0.5] * 15 + [0.02] * 5
    )
    assert summary["d_initial"] == pytest.approx((1.0 + 0.95) / 2)  # first 10 % = 2 rows
    assert summary["d_final"] == pytest.approx((0.1 + 0.05) / 2)
    assert summary["d_min"] == pytest.approx(0.05) and summary["d_max"] == pytest.approx(1.0)
    assert summary["d_mean"] == pytest.approx(0.525)
    assert summary["d_std"] == pytest.approx(math.sqrt(sum((x - 0.525) ** 2 for x in d_loss) / 20))
    assert summary["g_initial"] == summary["g_final"] == summary["g_std"] + 2.0 == 2.0
    assert summary["d_dominated_share"] == pytest.approx(5 / 20)
    assert summary["d_collapsed"] == "yes"  # 0.075 < 0.1
    assert summary["d_stuck_high"] == "no"
    last4 = np.array([0.2, 0.15, 0.1, 0.05])  # last 20 %: CV 0.447 > 0.2
    assert summary["d_last20_cv"] == pytest.approx(last4.std() / last4.mean())
    assert summary["stabilised"] == "no"
    assert summary["g_trend"] == "flat"
    assert summary["d_oscillation"] == pytest.approx(0.0, abs=1e-12)  # every step changes by -0.05
    assert summary["wild_oscillation"] == "no"
    assert summary["rows"] == 20 and summary["last_step"] == 190


def test_stuck_discriminator_and_rising_generator(tmp_path):
    summary = summary_of(tmp_path, loss_d=[1.4] * 20, loss_g=[1.0 + 0.1 * i for i in range(20)])
    assert summary["d_stuck_high"] == "yes" and summary["d_collapsed"] == "no"
    # last half: rows 10..19, G from 2.0 to 2.9, change 0.9 across a mean of 2.45
    assert summary["g_last_half_change"] == pytest.approx(0.9 / 2.45)
    assert summary["g_trend"] == "rising"
    # "stabilised" only asks for a small spread at the end: G's last 20 % (2.6 .. 2.9) has CV 0.04
    assert summary["g_last20_cv"] == pytest.approx(np.std([2.6, 2.7, 2.8, 2.9]) / 2.75)
    assert summary["d_last20_cv"] == 0 and summary["stabilised"] == "yes"


def test_wild_oscillation_and_falling_generator(tmp_path):
    summary = summary_of(tmp_path, loss_d=[0.2, 1.2] * 10, loss_g=[3.0 - 0.1 * i for i in range(20)])
    assert summary["d_oscillation"] == pytest.approx(np.diff([0.2, 1.2] * 10).std() / 0.7)
    assert summary["wild_oscillation"] == "yes"
    assert summary["g_trend"] == "falling"
    assert summary["d_dominated_share"] == 0.0


def test_missing_columns_give_n_a(tmp_path):
    summary = summary_of(tmp_path, loss_d=[0.7, 0.6], loss_g=["", ""])
    assert summary["g_trend"] == "n/a" and summary["stabilised"] == "n/a"
    assert math.isnan(summary["g_final"])


# ---------------------------------------------------------------------------------------------
# Pieces


def test_mean_with_band_averages_seeds_logged_at_different_intervals():
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    coarse = (np.arange(0, 101, 20.0), np.arange(0, 101, 20.0))  # y = step
    fine = (np.arange(0, 91, 5.0), np.arange(0, 91, 5.0) + 2)  # y = step + 2, stops earlier
    assert plot_logs.draw_mean_with_band(ax, [coarse, fine], "red", "-", "two seeds", log_scale=False)
    steps, mean = ax.lines[0].get_data()
    assert steps[0] == 0 and steps[-1] == 90  # the range both seeds reached
    np.testing.assert_allclose(mean, steps + 1)
    band = ax.collections[0].get_paths()[0].vertices
    assert band[:, 1].max() == pytest.approx(90 + 1 + math.sqrt(2))  # std (ddof 1) of {x, x + 2}
    plt.close(fig)


def test_moving_average_uses_steps_not_rows():
    steps = np.array([0.0, 10.0, 20.0, 21.0])
    averaged = plot_logs.moving_average(steps, np.array([0.0, 1.0, np.nan, 1.0]), tau=10.0)
    keep = math.exp(-1)
    assert averaged[1] == pytest.approx(1 - keep)
    assert averaged[2] == averaged[1]  # an empty field keeps the average
    assert averaged[3] == pytest.approx(averaged[1] * math.exp(-1.1) + 1 - math.exp(-1.1))


def test_a_folder_of_runs_stands_for_its_runs(tmp_path):
    make_run(tmp_path / "runs" / "a")
    make_run(tmp_path / "runs" / "b")
    assert run_summary.expand_run_dirs([tmp_path / "runs"]) == [
        tmp_path / "runs" / "a",
        tmp_path / "runs" / "b",
    ]


def test_runs_compared_with_join_the_tables_and_comparisons_without_their_own_figures(tmp_path):
    control = make_run(tmp_path / "control" / "c", g_opt="adam", steps=50)
    for name in ("adam", "casmo"):
        make_run(tmp_path / "base" / name, g_opt=name, steps=50)
    out = tmp_path / "out"
    code, printed = run_main([str(control), "--compare-with", str(tmp_path / "base"), "--out", str(out)])
    assert code == 0 and "per-run figures: " in printed and "for 1 run(s): c" in printed
    assert sorted(path.name for path in out.iterdir() if path.is_dir()) == ["c"]
    rows = summary_rows(out)
    assert {row["name"] for row in rows if row["scope"] == "run"} == {"c", "adam", "casmo"}
    assert is_png(out / "comparison_2x2.png")


def test_output_inside_a_run_folder_needs_into_run(tmp_path):
    run = make_run(tmp_path / "run", steps=50)
    with pytest.raises(SystemExit, match="--into-run"):
        run_main([str(run), "--out", str(run / "plots")])
    with pytest.raises(SystemExit, match="inside run folder"):
        run_main([str(run), "--out", str(tmp_path)])  # tmp_path/run/ would be the run folder itself
    assert not (run / "plots").exists()
    code, printed = run_main([str(run), "--out", str(run / "plots"), "--into-run"])
    assert code == 0 and (run / "plots" / "comparison_2x2.png").is_file()


def test_no_run_at_all_is_an_error(tmp_path):
    (tmp_path / "nothing").mkdir()
    code, printed = run_main(
        [str(tmp_path / "nothing"), str(tmp_path / "missing"), "--out", str(tmp_path / "o")]
    )
    assert code == 1
    assert "nothing: no config.json" in printed and "missing: does not exist" in printed
    assert not (tmp_path / "o").exists()


def test_seeds_differing_in_a_hyperparameter_are_flagged(tmp_path, capsys):
    runs = [make_run(tmp_path / f"s{seed}", g_opt="casmo", seed=seed, steps=40) for seed in (0, 1)]
    config = json.loads((runs[1] / "config.json").read_text())
    config["args"]["robustness"] = 0.0
    (runs[1] / "config.json").write_text(json.dumps(config))
    loaded = [run_summary.load_run(run) for run in runs]
    run_summary.warn_mixed_hyperparameters(loaded)
    assert "the runs of casmo_adam differ in robustness" in capsys.readouterr().out


def test_figures_and_summary_from_real_short_runs_of_both_scripts(tmp_path):
    """The format contract holds for what the training scripts really write."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    root = Path(__file__).resolve().parent.parent
    commands = [
        ["train_toy2d.py", "--epochs", "2", "--points", "512", "--bs", "64", "--eval-every", "1"]
        + ["--log-every", "1", "--g-opt", "casmo", "--d-opt", "adam", "--out", str(tmp_path / "toy")],
        ["train_dcgan.py", "--dataset", "shapes", "--subset", "64", "--bs", "16", "--epochs", "1"]
        + ["--log-every", "1", "--g-opt", "adam", "--d-opt", "casmo", "--data-root", str(tmp_path / "data")]
        + ["--no-fid"]
        + ["--out", str(tmp_path / "dcgan")],
    ]
    for command in commands:
        result = subprocess.run([sys.executable, *command], cwd=root, env=env, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-2000:]
    out = tmp_path / "plots"
    code, printed = run_main([str(tmp_path / "toy"), str(tmp_path / "dcgan"), "--out", str(out)])
    assert code == 0, printed
    for run, extra in (("toy", ["scatter.png", "quality_plot.png"]), ("dcgan", ["quality_plot.png"])):
        for name in ["loss_plot.png", "score_plot.png", "optimizer_plot.png", "grad_norm_plot.png", *extra]:
            assert is_png(out / run / name), f"{run}/{name}"
    rows = {(row["scope"], row["name"]): row for row in summary_rows(out)}
    toy, dcgan = rows[("run", "toy")], rows[("run", "dcgan")]
    assert float(toy["rows"]) == 16 and float(dcgan["rows"]) == 4
    assert 0.0 <= float(toy["on_support_final"]) <= 1.0
    assert float(dcgan["diversity_ratio_final"]) > 0


def test_first_epoch_covering_both_arcs(tmp_path):
    covered = make_run(tmp_path / "covered", seed=0, steps=40)
    never = make_run(tmp_path / "never", seed=1, steps=40)
    quality = toy_quality() | {"coverage_ok": ["False"] * 4}
    write_csv(never / "quality.csv", list(quality), quality)
    code, printed = run_main([str(covered), str(never), "--out", str(tmp_path / "out")])
    assert code == 0, printed
    rows = {row["name"]: row for row in summary_rows(tmp_path / "out")}
    assert rows["covered"]["first_coverage_epoch"] == "3" and rows["covered"]["ever_covered"] == "yes"
    assert rows["never"]["first_coverage_epoch"] == "" and rows["never"]["ever_covered"] == "no"
    # The mean is over the seeds that covered both arcs; the count says how many did.
    assert rows["adam_adam"]["first_coverage_epoch"] == "3" and rows["adam_adam"]["ever_covered"] == "1/2"


def test_group_by_splits_a_configuration_by_an_argument(tmp_path):
    for seed, robustness in ((0, 0.0), (1, 0.0), (0, 1.0)):
        run = make_run(tmp_path / "runs" / f"r{robustness}-s{seed}", g_opt="casmo", seed=seed, steps=40)
        config = json.loads((run / "config.json").read_text())
        config["args"]["robustness"] = robustness
        (run / "config.json").write_text(json.dumps(config))
    code, printed = run_main(
        [str(tmp_path / "runs"), "--out", str(tmp_path / "out"), "--group-by", "robustness"]
    )
    assert code == 0, printed
    seeds = {
        row["name"]: row["seeds"] for row in summary_rows(tmp_path / "out") if row["scope"] == "configuration"
    }
    assert seeds == {"casmo_adam (robustness=0.0)": "0,1", "casmo_adam (robustness=1.0)": "0"}


def test_a_labelled_run_is_its_own_configuration_and_dcgan_grids_go_side_by_side(tmp_path):
    rng = np.random.default_rng(0)
    for name, g_opt, label in (
        ("adam", "adam", None),
        ("control", "adam", "casmo_adam-control"),
        ("casmo", "casmo", None),
    ):
        run = make_run(tmp_path / "runs" / name, script="train_dcgan.py", g_opt=g_opt)
        if label:
            config = json.loads((run / "config.json").read_text())
            config["args"]["label"] = label
            (run / "config.json").write_text(json.dumps(config))
        (run / "samples").mkdir()
        for step in (100, 200, 300):
            plt.imsave(run / "samples" / f"step_{step:06d}.png", rng.random((16, 16, 3)))
    (tmp_path / "runs" / "casmo" / "samples" / "step_000100.png").unlink()  # not a step of every run
    code, printed = run_main([str(tmp_path / "runs"), "--out", str(tmp_path / "out")])
    assert code == 0, printed
    names = [row["name"] for row in summary_rows(tmp_path / "out") if row["scope"] == "configuration"]
    assert names == [
        "adam_adam",
        "casmo_adam",
        "casmo_adam-control",
    ]  # a control sorts after its configuration
    assert is_png(tmp_path / "out" / "compare_samples.png")
    assert run_summary.step_grids(tmp_path / "runs" / "casmo").keys() == {200, 300}
    assert run_summary.side_by_side_steps(list(range(250, 2001, 250))) == [250, 750, 1500, 2000]


# ---------------------------------------------------------------------------------------------
# Seeds without a value, diverged runs and the caption


CAPTION = "One seed each: no interval."


@contextlib.contextmanager
def saved_titles_and_legends():
    """Records each figure saved meanwhile: its suptitle by file name, and its legends' texts."""
    titles, legends = {}, []
    save = matplotlib.figure.Figure.savefig

    def keep(fig, path, **options):
        titles[Path(path).name] = fig.get_suptitle()
        legends.extend(
            text.get_text() for ax in fig.axes if ax.get_legend() for text in ax.get_legend().get_texts()
        )
        save(fig, path, **options)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(matplotlib.figure.Figure, "savefig", keep)
        yield titles, legends


@pytest.fixture(scope="module")
def with_divergence(tmp_path_factory) -> dict:
    """adam_adam: seed 0 whole, seed 1 without KID, seed 2 diverged at step 150 (its logs end
    there); casmo_adam: seed 0 diverged. The tables with a caption, the diverged seed's figures
    and compare_samples.png (its title kept), drawn as report() does, without the other figures."""
    root = tmp_path_factory.mktemp("diverging")
    rng = np.random.default_rng(0)
    whole = make_run(root / "aa_s0", script="train_dcgan.py", seed=0)
    no_kid = make_run(root / "aa_s1", script="train_dcgan.py", seed=1)
    quality = {name: [1, 2, 3, 4] for name in run_log.DCGAN_QUALITY_COLUMNS} | {"kid": [""] * 4}
    write_csv(no_kid / "quality.csv", run_log.DCGAN_QUALITY_COLUMNS, quality)
    for name, g_opt, seed in (("aa_s2", "adam", 2), ("ca_s0", "casmo", 0)):
        losses = {column: [0.7] * 14 + [math.nan] for column in ("loss_d", "loss_g", "d_x", "d_g_z")}
        run = make_run(root / name, script="train_dcgan.py", g_opt=g_opt, seed=seed, columns=losses)
        write_csv(run / "quality.csv", run_log.DCGAN_QUALITY_COLUMNS, {"step": [100], "kid": [8.0]})
        (run / "status.json").write_text(
            json.dumps({"status": "diverged", "step": 150, "cause": "loss_d nan"})
        )
    for run, steps in ((whole, (100, 200, 300)), (root / "ca_s0", (100,))):
        (run / "samples").mkdir()
        for step in steps:
            plt.imsave(run / "samples" / f"step_{step:06d}.png", rng.random((16, 16, 3)))
    out = tmp_path_factory.mktemp("out")
    runs, skipped = run_summary.read_runs([root], group_by=[])
    sets = run_summary.comparison_sets(runs)
    rows = run_summary.summary_rows(sets)
    run_summary.write_summary_csv(rows, out / "summary.csv")
    run_summary.write_summary_md(rows, sets, out / "summary.md", CAPTION)
    plot_logs.plot_run(next(run for run in runs if run.name == "aa_s2"), out / "aa_s2", smooth=0.02)
    with saved_titles_and_legends() as (titles, _):
        drawn = plot_logs.plot_samples_side_by_side(
            run_summary.by_config(runs), out / "compare_samples.png", "dcgan", CAPTION
        )
    return {"root": root, "out": out, "skipped": skipped, "drawn": drawn, "titles": titles}


def test_a_nan_seed_is_named_instead_of_dropped_silently(with_divergence):
    assert with_divergence["skipped"] == []
    rows = {(row["scope"], row["name"]): row for row in summary_rows(with_divergence["out"])}
    adam = rows[("configuration", "adam_adam")]
    assert adam["seeds"] == "0,1,2" and adam["kid_final_nan_seeds"] == "1"
    assert float(adam["kid_final"]) == pytest.approx((3 + 8) / 2)  # seeds 0 and 2
    assert adam["fid_final_nan_seeds"] == "2"  # the diverged seed logged KID only
    text = (with_divergence["out"] / "summary.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| **adam_adam** |") and "[" in line)
    assert "5.50 [-26.3, 37.3] (seed 1 NaN)" in row


def test_diverged_runs_are_counted_and_still_drawn(with_divergence):
    out = with_divergence["out"]
    rows = {(row["scope"], row["name"]): row for row in summary_rows(out)}
    assert rows[("configuration", "adam_adam")]["diverged"] == "1/3"
    assert rows[("configuration", "casmo_adam")]["diverged"] == "1/1"
    assert (rows[("run", "aa_s2")]["diverged"], rows[("run", "aa_s0")]["diverged"]) == ("yes", "no")
    assert float(rows[("run", "aa_s2")]["last_step"]) == 140
    text = (out / "summary.md").read_text()
    assert text.count("| **adam_adam** | 0,1,2 | 1/3 |") == 3  # the diverged column of every table
    for figure in [*PER_RUN_FIGURES, "quality_plot.png"]:
        assert is_png(out / "aa_s2" / figure), figure
    assert with_divergence["drawn"] and is_png(out / "compare_samples.png")


def test_caption_heads_summary_and_compare_samples(with_divergence):
    assert (with_divergence["out"] / "summary.md").read_text().startswith(f"{CAPTION}\n")
    assert with_divergence["titles"]["compare_samples.png"].endswith(f"\n{CAPTION}")
    assert plot_logs.parse_args(["runs", "--caption", CAPTION]).caption == CAPTION


def test_a_diverged_seed_ends_in_a_cross_and_does_not_cut_the_mean(with_divergence):
    root = with_divergence["root"]
    groups = run_summary.by_config(
        [run_summary.load_run(root / name) for name in ("aa_s0", "aa_s1", "aa_s2")]
    )
    fig, ax = plt.subplots()
    assert plot_logs.draw_compare_panel(
        ax, groups, plot_logs.Panel("D", "loss", (plot_logs.D_LOSS,)), tau=1.0
    )
    mean, line, cross = ax.lines[:3]
    assert mean.get_xdata()[-1] == 390  # the seeds that did not diverge, to their end
    assert line.get_xdata()[-1] == cross.get_xdata()[0] == 140  # seed 2's last logged step
    assert cross.get_marker() == "x" and mean.get_label() == "adam_adam (2 seeds, 1 diverged)"
    plt.close(fig)
    assert (
        plot_logs.final_kid_text(groups["adam_adam"]) == "final KID (1 seed): 3.00\n(seed 1 NaN; 1 diverged)"
    )


def test_compare_samples_names_the_moving_average_only_when_a_run_has_one(tmp_path):
    """With --g-ema 0 the quality log's *_ema fields are empty: no dashed curve is drawn, so
    neither the legend nor the title may promise one."""
    rng = np.random.default_rng(0)
    for g_opt in ("adam", "casmo"):
        run = make_run(tmp_path / g_opt, script="train_dcgan.py", g_opt=g_opt)
        write_csv(
            run / "quality.csv",
            ["step", "kid", "kid_ema"],
            {"step": [100, 200], "kid": [5, 4], "kid_ema": [""] * 2},
        )
        (run / "samples").mkdir()
        plt.imsave(run / "samples" / "step_000200.png", rng.random((16, 16, 3)))
    groups = run_summary.by_config(run_summary.read_runs([tmp_path], group_by=[])[0])
    with saved_titles_and_legends() as (titles, legends):
        assert plot_logs.plot_samples_side_by_side(groups, tmp_path / "compare_samples.png", "dcgan")
    assert "EMA" not in titles["compare_samples.png"]
    assert sorted(legends) == ["adam_adam (1 seed)", "casmo_adam (1 seed)"]
    fig, ax = plt.subplots()
    with_ema = {"adam_adam": groups["adam_adam"]}
    with_ema["adam_adam"][0].quality["kid_ema"] = np.array([6.0, 5.0])
    assert plot_logs.draw_compare_panel(ax, with_ema, plot_logs.DCGAN_MEASURE_PANELS[0], tau=0.0)
    labels = [line.get_label() for line in ax.lines]
    assert "G: solid" in labels and "G moving average: dashed" in labels
    plt.close(fig)
