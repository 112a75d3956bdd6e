"""paired_analysis.py on DCGAN run folders fabricated here (test_plot_logs' helpers): endpoints,
paired statistics and verdicts against values worked out by hand, the pilot's rule, and what
is named when parts were not run."""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
from test_plot_logs import make_run, write_csv

import paired_analysis
import run_log
import run_summary
from paired_analysis import NOT_SEPARATED, SMALLER_STEP, STABILISES, WORSE, verdict

STEPS = [100, 200, 300, 400]  # evaluations of a 400-step run: its KID area is over 200, 300, 400


def make_dcgan(
    folder: Path,
    config: str = "adam_adam",
    seed: int = 0,
    kid_ema: list[float] = (9.0, 7.0, 5.0, 3.0),
    classes: float = 10,
    diversity: float = 0.8,
    status: str | None = None,
    max_steps: int = 400,
    steps: list[int] = STEPS,
) -> Path:
    """A DCGAN run of `config` (a "-control" name becomes a labelled adam_adam run) evaluated at
    `steps`, with EMA G's KID `kid_ema` and `classes` classes at the last evaluation."""
    g_opt, d_opt = config.removesuffix("-control").split("_")
    if config.endswith("-control"):
        g_opt = d_opt = "adam"
    run = make_run(folder, script="train_dcgan.py", g_opt=g_opt, d_opt=d_opt, seed=seed, steps=max(steps))
    config_json = json.loads((run / "config.json").read_text())
    config_json["args"] |= {"max_steps": max_steps, "label": config if config.endswith("-control") else None}
    (run / "config.json").write_text(json.dumps(config_json))
    n = len(steps)
    quality = {name: [0.5] * n for name in run_log.DCGAN_QUALITY_COLUMNS}
    quality |= {
        "step": steps,
        "kid": [400.0] * n,
        "kid_ema": list(kid_ema),
        "diversity_ratio": [diversity] * n,
    }
    quality |= {"modes_covered": [1] * n, "modes_covered_ema": [0] * (n - 1) + [classes]}
    write_csv(run / "quality.csv", run_log.DCGAN_QUALITY_COLUMNS, quality)
    if status:
        (run / run_log.STATUS_FILE).write_text(
            json.dumps({"status": status, "step": max(steps), "cause": None})
        )
    return run


def grid(root: Path, set_name: str, areas: dict[str, list[float]], **options) -> list[Path]:
    """One run per configuration and seed, KID of EMA G flat at the given area."""
    return [
        make_dcgan(root / set_name / f"{config}-s{seed}", config, seed, [area] * 4, **options)
        for config, per_seed in areas.items()
        for seed, area in enumerate(per_seed)
    ]


def table_row(lines: list[str], start: str) -> list[str]:
    row = next(line for line in lines if line.startswith(f"| {start} |"))
    return [cell.strip() for cell in row.strip("|").split("|")]


# ---------------------------------------------------------------------------------------------
# Endpoints of one run


def test_kid_area_is_the_second_half_of_the_planned_budget(tmp_path):
    run = paired_analysis.endpoints(make_dcgan(tmp_path / "r", classes=12))
    assert run["kid_area"] == pytest.approx((7 + 5 + 3) / 3)  # steps 200, 300, 400 of 400
    assert run["classes_final"] == 12 and run["kid_column"] == "kid_ema"
    assert (run["config"], run["seed"], run["status"]) == ("adam_adam", 0, "finished")  # no status.json
    assert not run["failed"]
    pilot = paired_analysis.endpoints(make_dcgan(tmp_path / "p", max_steps=200, steps=[50, 100, 150, 200]))
    assert pilot["kid_area"] == pytest.approx(5.0)  # its own budget: steps 100, 150, 200


def test_a_run_without_ema_columns_uses_raw_g(tmp_path):
    run = make_dcgan(tmp_path / "r")
    quality = {
        "step": STEPS,
        "kid": [8, 6, 4, 2],
        "modes_covered": [1, 2, 3, 5],
        "diversity_ratio": [0.5] * 4,
    }
    write_csv(run / "quality.csv", list(quality), quality)
    result = paired_analysis.endpoints(run)
    assert result["kid_column"] == "kid" and result["kid_area"] == pytest.approx(4.0)
    assert result["classes_final"] == 5


def test_diverged_and_collapsed_runs_fail(tmp_path):
    diverged = paired_analysis.endpoints(make_dcgan(tmp_path / "d", status="diverged", steps=[100]))
    assert diverged["diverged"] and diverged["failed"] and not diverged["collapsed"]
    assert math.isnan(diverged["kid_area"]) and math.isnan(diverged["classes_final"])
    collapsed = paired_analysis.endpoints(make_dcgan(tmp_path / "c", diversity=0.29))
    assert collapsed["collapsed"] and collapsed["failed"] and not collapsed["diverged"]
    d_won = make_run(tmp_path / "w", script="train_dcgan.py", columns={"loss_d": [0.05] * 20})
    assert paired_analysis.endpoints(d_won)["collapsed"]  # final D loss 0.05 < 0.1: D won outright
    assert not paired_analysis.endpoints(make_dcgan(tmp_path / "ok", diversity=0.3))["failed"]


# ---------------------------------------------------------------------------------------------
# Statistics worked out by hand


def test_paired_kid_difference_t_interval_and_wilcoxon(tmp_path):
    # CASMO − Adam per seed: -3, -2, -4; mean -3, sd 1, t(0.975, 2) = 4.3027 → ± 2.4842
    grid(tmp_path, "s", {"adam_adam": [13, 14, 13], "casmo_adam": [10, 12, 9]})
    lines = paired_analysis.results_sections({"s": sorted((tmp_path / "s").iterdir())})
    row = table_row(lines, "casmo_adam − adam_adam | KID area")
    assert row[2:] == ["3", "-3.00 [-5.48, -0.516] (95% t)", "3 of 3", "0.25"]  # Wilcoxon, n = 3: 2/8


def test_bootstrap_interval_stays_in_the_measures_range():
    values = np.array([0.0, 0.0, 36.0])  # classes covered: bounded by 0 and 36
    low, high = run_summary.bootstrap_interval(values)
    assert 0 <= low <= values.mean() <= high <= 36
    assert run_summary.t_interval(values)[0] < 0  # what a t-interval would do here
    picks = np.random.default_rng(0).integers(0, 3, (10_000, 3))  # the protocol's resampling
    assert (low, high) == tuple(np.percentile(values[picks].mean(axis=1), [2.5, 97.5]))
    differences = np.array([-36.0, 36.0, 36.0])
    assert -36 <= run_summary.bootstrap_interval(differences)[0]


def test_wilcoxon_and_intervals_are_n_a_without_enough_pairs():
    assert math.isnan(paired_analysis.wilcoxon_p(np.array([0.0, 0.0, 0.0])))
    assert math.isnan(paired_analysis.wilcoxon_p(np.array([2.0])))
    assert paired_analysis.wilcoxon_p(np.array([1.0, 2.0, 3.0])) == 0.25
    assert all(math.isnan(x) for x in run_summary.bootstrap_interval(np.array([1.0])))
    assert all(math.isnan(x) for x in run_summary.t_interval(np.array([1.0])))


def test_failure_split_is_mcnemar_exact():
    casmo = {seed: {"failed": False} for seed in range(8)}
    adam = {seed: {"failed": seed != 0} for seed in range(8)}  # 7 of 8
    split = paired_analysis.failure_split(casmo, adam)
    assert (split.pairs, split.failed, split.discordant) == (8, (0, 7), (0, 7))
    assert split.p == pytest.approx(2 * 0.5**7) and split.side == "better"
    five = paired_analysis.failure_split(casmo, {seed: {"failed": True} for seed in range(5)})
    assert five.p == pytest.approx(0.0625) and five.side == "same"  # 5 of 5 does not reach 0.05
    assert paired_analysis.clopper_pearson(0, 3) == pytest.approx((0.0, 1 - 0.025 ** (1 / 3)))


# ---------------------------------------------------------------------------------------------
# Verdicts


def test_verdict_rules():
    assert verdict("better", "better", True, None) == STABILISES
    assert verdict("better", "same", True, None) == SMALLER_STEP
    assert verdict("better", "worse", True, None) == WORSE
    assert verdict("same", "worse", True, None) == WORSE
    assert verdict("same", "better", True, None) == NOT_SEPARATED
    assert verdict("better", "better", False, None) != STABILISES  # classes, or failures at the defaults
    # Failures: "a smaller step" also needs the control to separate from the baseline.
    assert verdict("better", "same", False, "better") == SMALLER_STEP
    assert verdict("better", "same", False, "same") == NOT_SEPARATED
    assert "control was not run" in verdict("better", None, True, None)


def test_separated_below_baseline_but_not_control_is_a_smaller_step(tmp_path):
    grid(tmp_path, "dcgan-shapes", {"adam_adam": [20, 21, 19], "casmo_adam": [10, 12, 11]})
    grid(tmp_path, "dcgan-shapes-control", {"casmo_adam-control": [10.5, 11, 12]})
    sets = {name: sorted((tmp_path / name).iterdir()) for name in ("dcgan-shapes", "dcgan-shapes-control")}
    lines = paired_analysis.results_sections(sets)
    assert (
        "- **casmo_adam, dcgan-shapes, KID area: it is a smaller step** "
        "(paired seeds: 3 vs adam_adam and 3 vs casmo_adam-control)." in lines
    )
    assert table_row(lines, "casmo_adam − casmo_adam-control | KID area")[2] == "3"


def test_fewer_failures_under_stress_stabilises(tmp_path):
    seeds = range(8)
    runs = [make_dcgan(tmp_path / f"a{s}", "adam_adam", s, status="diverged", steps=[100]) for s in seeds]
    runs += [make_dcgan(tmp_path / f"c{s}", "casmo_adam", s) for s in seeds]
    control = [make_dcgan(tmp_path / f"k{s}", "casmo_adam-control", s, diversity=0.1) for s in seeds]
    lines = paired_analysis.results_sections({"x-stress": runs, "x-stress-control": control})
    assert any(line.startswith(f"- **casmo_adam, x-stress, failed: {STABILISES}**") for line in lines)
    assert table_row(lines, "adam_adam")[1:3] == ["8", "0,1,2,3,4,5,6,7"]
    assert table_row(lines, "adam_adam")[6:] == ["8/8", "0/8"]  # diverged, collapsed
    assert table_row(lines, "casmo_adam-control")[6:] == ["0/8", "8/8"]
    assert table_row(lines, "casmo_adam vs adam_adam")[1:] == ["8", "0, 8", "0, 8", "0.00781"]
    assert table_row(lines, "casmo_adam − adam_adam | KID area")[2] == "0"  # diverged: no pairs


# ---------------------------------------------------------------------------------------------
# What is named


def test_diverged_seeds_and_missing_parts_are_named(tmp_path):
    runs = grid(tmp_path, "s", {"adam_adam": [20, 21, 19], "casmo_adam": [10, 12]})
    runs.append(make_dcgan(tmp_path / "s" / "casmo_adam-s2", "casmo_adam", 2, status="diverged", steps=[100]))
    runs.append(make_dcgan(tmp_path / "s" / "casmo_adam-s3", "casmo_adam", 3, status="stopped"))
    lines = paired_analysis.results_sections({"s": runs})
    assert "- set s-control: not run" in lines
    assert any("casmo_adam-s3: left out, status.json says stopped" in line for line in lines)
    row = table_row(lines, "casmo_adam")
    assert row[1:3] == ["3", "0,1,2"] and row[3].endswith("(seed 2 diverged)")
    assert row[5].startswith("1/3 ") and row[6] == "1/3"
    assert table_row(lines, "casmo_adam-control")[1] == "not run"
    assert table_row(lines, "casmo_adam − casmo_adam-control | KID area")[2] == "casmo_adam-control not run"
    assert table_row(lines, "casmo_adam − adam_adam | KID area")[2] == "2"  # seed 2 left out
    assert any(
        "casmo_adam, s, KID area: better than the baseline; its control was not run" in line for line in lines
    )


def test_runs_of_one_setting_scored_in_two_feature_spaces_are_refused(tmp_path):
    runs = grid(tmp_path, "s", {"adam_adam": [20, 21], "casmo_adam": [10, 12]})
    for run, space in zip(runs, ["shapes-cnn-v1-aaa", "shapes-cnn-v1-aaa", "shapes-cnn-v1-aaa", None]):
        config = json.loads((run / "config.json").read_text()) | {"feature_space": space}
        (run / "config.json").write_text(json.dumps(config))
    control = grid(tmp_path, "s-control", {"casmo_adam-control": [15]})[0]
    assert paired_analysis.results_sections({"s": runs, "s-control": [control]})  # no space: fits any
    config = json.loads((control / "config.json").read_text()) | {"feature_space": "shapes-cnn-v1-bbb"}
    (control / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        paired_analysis.RunError, match="shapes-cnn-v1-aaa, .*casmo_adam-control-s0 in shapes-cnn-v1-bbb"
    ):
        paired_analysis.results_sections({"s": runs, "s-control": [control]})
    assert paired_analysis.results_sections({"s": runs, "t-control": [control]})  # another setting


# ---------------------------------------------------------------------------------------------
# The pilot


def test_pilot_takes_the_most_failures_then_the_higher_kid_area(tmp_path):
    def candidate(name: str, areas: list[float], failing: int) -> list[Path]:
        return [
            make_dcgan(tmp_path / name / f"s{seed}", seed=100 + seed, kid_ema=[area] * 4,
                       diversity=0.1 if seed < failing else 0.8)
            for seed, area in enumerate(areas)
        ]  # fmt: skip

    chosen, lines = paired_analysis.pilot_table(
        {
            "S1": candidate("S1", [50, 50, 50], 0),
            "S2": candidate("S2", [5, 5, 5], 1),
            "S3": candidate("S3", [9, 9, 9], 1),
        }
    )
    assert chosen == "S3" and "and of those tied with it (S2) the highest mean KID area" in "\n".join(lines)
    assert table_row(lines, "S3")[1:4] == ["3", "100,101,102", "1/3 [0.00840, 0.906]"]
    chosen, lines = paired_analysis.pilot_table(
        {"S1": candidate("S1b", [5, 5], 0), "S2": candidate("S2b", [7, 8], 0), "S3": []}
    )
    assert chosen == "S2" and "no candidate made adam_adam fail" in "\n".join(lines)
    assert table_row(lines, "S3")[1] == "not run"


def test_command_line_prints_the_sections_or_a_one_line_error(tmp_path):
    grid(tmp_path, "dcgan-shapes", {"adam_adam": [20, 21], "casmo_adam": [10, 12]})
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        assert paired_analysis.main([str(tmp_path / "dcgan-shapes")]) == 0
    assert "## dcgan-shapes: primary endpoints and paired comparisons" in output.getvalue()
    (tmp_path / "empty").mkdir()
    errors = io.StringIO()
    with contextlib.redirect_stderr(errors):
        assert paired_analysis.main([str(tmp_path / "empty")]) == 1
    assert errors.getvalue().startswith("error:") and errors.getvalue().count("\n") == 1
