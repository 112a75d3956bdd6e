"""The analysis docs/benchmark_protocol.md fixes, from run folders: each run's primary endpoints
(KID area, classes covered at the end, failed), each configuration's summary of them, the
paired comparisons of every CASMO configuration with adam_adam and with its own control, the
protocol's verdict on each, and the pilot's choice of the stress setting. benchmark.py writes
results.md from results_sections and pilot_table; for published run folders:

    python paired_analysis.py docs/results/dcgan-shapes docs/results/dcgan-shapes-control

A set "X" and the set "X-control" form one setting; runs of one seed are paired.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.stats

import run_summary
from gan_common import RunError
from run_summary import (
    ALPHA,  # also the p below which a failure split separates
    BOOTSTRAP_RESAMPLES,
    BOOTSTRAP_SEED,
    CONTROL_SUFFIX,
    Columns,
    NotARun,
    bootstrap_interval,
    number,
    t_interval,
)

BASELINE = "adam_adam"
STRESS_MARK = "stress"  # a setting whose name holds it is the stress setting (dcgan-shapes-stress)
FINAL_STATUSES = ("finished", "diverged")  # a run still running or stopped has no endpoints yet
# The answers of the protocol's "What would count as which answer".
STABILISES, SMALLER_STEP, WORSE, NOT_SEPARATED = (
    "CASMO stabilises training",
    "it is a smaller step",
    "CASMO is worse",
    "not separated",
)


# ---------------------------------------------------------------------------------------------
# Per run


def endpoints(run_dir: Path) -> dict:
    """A run's primary endpoints. kid_area: the mean KID of EMA G (of raw G where the run logged
    no EMA columns; kid_column says which) over the evaluations at steps ≥ half the run's
    planned final step (max_steps); classes_final: EMA G's classes covered (modes_covered) at
    the last evaluation; both NaN for a diverged run. collapsed: raw G's diversity ratio at the
    last evaluation below COLLAPSE_RATIO, or D won outright (final D loss below
    D_COLLAPSED_BELOW); failed: diverged or collapsed. No status.json counts as finished.
    NotARun says why a folder cannot be read."""
    run_dir = Path(run_dir)
    config = run_summary.read_config(run_dir)
    args = config.get("args", {})
    status = run_summary.read_run_status(run_dir)
    log, quality = read_table(run_dir / "log.csv"), read_table(run_dir / "quality.csv")
    suffix = "_ema" if np.isfinite(quality["kid_ema"]).any() else ""
    diverged = run_summary.is_diverged(status)
    planned = args.get("max_steps") or (float(np.nanmax(log["step"])) if log.n_rows else math.nan)
    second_half = quality[f"kid{suffix}"][quality["step"] >= planned / 2]
    kid_area = float(second_half.mean()) if len(second_half) and not diverged else math.nan
    mode_collapsed = last_value(quality, "diversity_ratio") < run_summary.COLLAPSE_RATIO
    d_won = run_summary.loss_statistics(log["loss_d"])["final"] < run_summary.D_COLLAPSED_BELOW
    collapsed = not diverged and (mode_collapsed or d_won)
    return {
        "path": run_dir,
        "config": run_summary.config_name(args),
        "seed": args.get("seed"),
        "status": status["status"] if status else "finished",
        "kid_area": kid_area,
        "kid_column": f"kid{suffix}",
        "feature_space": config.get("feature_space"),
        "classes_final": math.nan if diverged else last_value(quality, f"modes_covered{suffix}"),
        "diverged": diverged,
        "collapsed": bool(collapsed),
        "failed": bool(diverged or collapsed),
    }


def read_table(path: Path) -> Columns:
    """A CSV's columns; a file the run never wrote (it diverged first) reads as no rows."""
    return run_summary.read_numeric_csv(path) if path.is_file() else Columns({}, 0)


def last_value(table: Columns, column: str) -> float:
    """The column at the last row (the final evaluation); NaN without rows. NaN compares False,
    so a check on a value the run did not log says no."""
    return float(table[column][-1]) if table.n_rows else math.nan


def read_endpoints(paths: list[Path], notes: list[str]) -> list[dict]:
    """The endpoints of the runs in `paths` that ended; the others go into `notes` with why."""
    runs = []
    for path in run_summary.expand_run_dirs(list(paths)):
        try:
            run = endpoints(path)
        except NotARun as reason:
            notes.append(f"{path}: skipped, {reason}")
            continue
        if run["status"] in FINAL_STATUSES:
            runs.append(run)
        else:
            notes.append(f"{path}: left out, status.json says {run['status']}")
    return runs


# ---------------------------------------------------------------------------------------------
# Statistics


def wilcoxon_p(differences: np.ndarray) -> float:
    """The two-sided Wilcoxon signed-rank p; NaN (shown "n/a") below two pairs or when every
    difference is zero, where the test has nothing to rank."""
    if len(differences) < 2 or not differences.any():
        return math.nan
    return float(scipy.stats.wilcoxon(differences).pvalue)


def clopper_pearson(failed: int, runs: int) -> tuple[float, float]:
    interval = scipy.stats.binomtest(failed, runs).proportion_ci(1 - ALPHA, method="exact")
    return interval.low, interval.high


@dataclass(frozen=True)
class Measure:
    """A primary endpoint with a value per run, and how its mean gets its interval."""

    key: str  # in endpoints()
    title: str
    lower_is_better: bool
    interval: Callable[[np.ndarray], tuple[float, float]]
    interval_name: str
    decides_stabilising: bool  # the protocol's "stabilises" rests on it (KID area, not classes)


MEASURES = (
    Measure("kid_area", "KID area", True, t_interval, "95% t", decides_stabilising=True),
    Measure("classes_final", "classes at the end", False, bootstrap_interval, "95% bootstrap", False),
)


@dataclass
class Difference:
    """CASMO − other, per seed that both have a value of the measure for."""

    measure: Measure
    differences: np.ndarray
    low: float
    high: float

    @property
    def better(self) -> int:
        """Seeds in which CASMO was better."""
        return int(np.sum(self.differences < 0 if self.measure.lower_is_better else self.differences > 0))

    @property
    def side(self) -> str:
        """ "better" / "worse": the interval lies on CASMO's better / worse side of zero."""
        if self.high < 0 or self.low > 0:
            return "better" if (self.high < 0) == self.measure.lower_is_better else "worse"
        return "same"


def paired_difference(measure: Measure, casmo: dict, other: dict) -> Difference:
    seeds = [seed for seed in casmo if seed in other]
    pairs = [(casmo[seed][measure.key], other[seed][measure.key]) for seed in seeds]
    differences = np.array([a - b for a, b in pairs if math.isfinite(a) and math.isfinite(b)])
    return Difference(measure, differences, *measure.interval(differences))


@dataclass
class FailureSplit:
    """Failures of CASMO and of the other configuration over the seeds both ran."""

    pairs: int
    failed: tuple[int, int]  # (CASMO, other)
    discordant: tuple[int, int]  # seeds where only CASMO / only the other failed
    p: float  # exact two-sided binomial (McNemar) on the discordant seeds; NaN without any

    @property
    def side(self) -> str:
        if not self.p < ALPHA:
            return "same"
        return "better" if self.discordant[0] < self.discordant[1] else "worse"


def failure_split(casmo: dict, other: dict) -> FailureSplit:
    seeds = [seed for seed in casmo if seed in other]
    flags = [(casmo[seed]["failed"], other[seed]["failed"]) for seed in seeds]
    only = (sum(a and not b for a, b in flags), sum(b and not a for a, b in flags))
    p = scipy.stats.binomtest(only[0], sum(only)).pvalue if sum(only) else math.nan
    return FailureSplit(len(seeds), (sum(a for a, _ in flags), sum(b for _, b in flags)), only, p)


def verdict(
    vs_baseline: str, vs_control: str | None, may_stabilise: bool, control_vs_baseline: str | None
) -> str:
    """The protocol's answer from the sides ("better", "worse", "same") of CASMO against the
    baseline and against its control (None: the control was not run). `may_stabilise`: the
    endpoint and setting are ones "stabilises" rests on. `control_vs_baseline`: for failures,
    where "a smaller step" also needs the control to separate from the baseline; None otherwise.
    An interval on the worse side of zero against either makes "worse" before anything else."""
    if "worse" in (vs_baseline, vs_control):
        return WORSE
    if vs_control is None:
        if vs_baseline == "better":
            return "better than the baseline; its control was not run, so a smaller step is not ruled out"
        return f"{NOT_SEPARATED} (its control was not run)"
    if vs_baseline == vs_control == "better":
        return (
            STABILISES
            if may_stabilise
            else "better than both (the protocol's *stabilises* does not rest on this)"
        )
    if vs_baseline == "better" and vs_control == "same" and control_vs_baseline in (None, "better"):
        return SMALLER_STEP
    return NOT_SEPARATED


# ---------------------------------------------------------------------------------------------
# results.md's sections


def results_sections(sets: dict[str, list[Path]], baseline: str = BASELINE) -> list[str]:
    """Markdown lines for results.md: per setting (a set and its "-control" set) the primary
    endpoints per configuration, the paired comparisons of each CASMO configuration with
    `baseline` and with its control, and the protocol's verdicts. What was not run is named."""
    lines = []
    for name in dict.fromkeys(set_name.removesuffix(CONTROL_SUFFIX) for set_name in sets):
        notes, runs = [], []
        for set_name in (name, f"{name}{CONTROL_SUFFIX}"):
            if set_name in sets:
                runs += read_endpoints(sets[set_name], notes)
            else:
                notes.append(f"set {set_name}: not run")
        check_one_feature_space(runs)
        configs = by_config(runs)
        lines += [f"## {name}: primary endpoints and paired comparisons", ""]
        lines += [f"- {note}" for note in notes] + ([""] if notes else [])
        lines += endpoint_table(configs, listed_configs(configs, baseline)) + [""]
        lines += comparison_tables(name, configs, baseline)
    return lines


def check_one_feature_space(runs: list[dict]) -> None:
    """The runs of one setting are compared by KID, which only means something within one
    feature space; runs without one (diverged before any evaluation) fit any."""
    first: dict[str, Path] = {}
    for run in runs:
        if run["feature_space"] is not None:
            first.setdefault(run["feature_space"], run["path"])
    if len(first) > 1:
        (space_a, path_a), (space_b, path_b) = list(first.items())[:2]
        raise RunError(
            f"{path_a} was scored in feature space {space_a}, {path_b} in {space_b}: their KIDs cannot be "
            "compared; pass runs scored in one feature space"
        )


def by_config(runs: list[dict]) -> dict[str, dict[object, dict]]:
    """configuration → seed → endpoints, in the order of the seeds; two runs of one configuration
    and seed are an error."""
    configs: dict[str, dict[object, dict]] = {}
    for run in sorted(runs, key=lambda run: run["seed"] if isinstance(run["seed"], int) else -1):
        seeds = configs.setdefault(run["config"], {})
        if run["seed"] in seeds:
            raise RunError(
                f"{seeds[run['seed']]['path']} and {run['path']} are both {run['config']} "
                f"seed {run['seed']}; pass one of them"
            )
        seeds[run["seed"]] = run
    return configs


def casmo_configs(names: set[str], baseline: str) -> list[str]:
    """The configurations compared with the baseline: all but it and the controls."""
    return sorted(
        (name for name in names if name != baseline and not name.endswith(CONTROL_SUFFIX)),
        key=run_summary.config_rank,
    )


def listed_configs(configs: dict, baseline: str) -> list[str]:
    """The baseline, every configuration that ran, and each CASMO configuration's control and
    each control's configuration, run or not."""
    names = {baseline, *configs}
    names |= {f"{name}{CONTROL_SUFFIX}" for name in casmo_configs(names, baseline)}
    names |= {name.removesuffix(CONTROL_SUFFIX) for name in names}
    return sorted(names, key=run_summary.config_rank)


def endpoint_table(configs: dict[str, dict], names: list[str]) -> list[str]:
    lines = [
        "| configuration | runs | seeds | KID area, mean [95% t] | classes at the end, mean "
        "[95% bootstrap] | failed, k/n [95% Clopper-Pearson] | diverged | collapsed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    raw_g = []
    for name in names:
        runs = list(configs.get(name, {}).values())
        if not runs:
            lines.append(f"| {name} | not run | | | | | | |")
            continue
        raw_g += [f"{name} seed {run['seed']}" for run in runs if run["kid_column"] == "kid"]
        cells = [name, *run_cells(runs), *(mean_cell(runs, measure) for measure in MEASURES)]
        cells += outcome_cells(runs)
        lines.append("| " + " | ".join(cells) + " |")
    return lines + ["", endpoint_caption(raw_g)]


def mean_cell(runs: list[dict], measure: Measure) -> str:
    """The mean over the runs with a value and its interval, naming the seeds without one."""
    values = np.array([run[measure.key] for run in runs], dtype=float)
    finite = values[np.isfinite(values)]
    text = f"{number(finite.mean())} {interval_text(*measure.interval(finite))}" if len(finite) else "–"
    return text + missing_note(runs, measure.key)


def missing_note(runs: list[dict], key: str) -> str:
    """For the runs without a value, " (seed 3 diverged; seeds 1,4 NaN)"; nothing when all have one."""
    by_reason: dict[str, list[str]] = {}
    for run in runs:
        if not math.isfinite(run[key]):
            by_reason.setdefault(reason(run), []).append(str(run["seed"]))
    notes = [f"seed{'s' * (len(seeds) > 1)} {','.join(seeds)} {why}" for why, seeds in by_reason.items()]
    return f" ({'; '.join(notes)})" if notes else ""


def reason(run: dict) -> str:
    return "diverged" if run["diverged"] else "NaN"


def interval_text(low: float, high: float) -> str:
    return f"[{number(low)}, {number(high)}]" if math.isfinite(low) else "[n/a]"


def endpoint_caption(raw_g: list[str]) -> str:
    caption = (
        "*KID area*: the mean KID of EMA G, as quality.csv logs it, over the evaluations at steps ≥ half "
        "the run's max_steps; *classes at the end*: EMA G's classes covered at the last evaluation; a "
        "diverged run has neither (the seeds without a value are named). *failed*: diverged (status.json) "
        f"or collapsed: raw G's diversity ratio at the last evaluation < {run_summary.COLLAPSE_RATIO}, or "
        f"the mean D loss of the last {run_summary.EDGE_FRACTION:.0%} of logged steps < "
        f"{run_summary.D_COLLAPSED_BELOW}. Runs still running or stopped are left out."
    )
    return caption + (f" Raw G's KID and classes (no EMA columns): {', '.join(raw_g)}." if raw_g else "")


def comparison_tables(name: str, configs: dict[str, dict], baseline: str) -> list[str]:
    """The paired differences, the failure splits and a verdict per CASMO configuration and
    primary endpoint."""
    casmos = casmo_configs({config.removesuffix(CONTROL_SUFFIX) for config in configs}, baseline)
    pairs = [(casmo, other) for casmo in casmos for other in (baseline, f"{casmo}{CONTROL_SUFFIX}")]
    if not casmos:
        return [f"No CASMO configuration ran in {name}: no comparison.", ""]
    lines = [
        "Paired differences, CASMO − other, over the seeds both ran (a diverged run has no value):",
        "",
        "| comparison | endpoint | pairs | mean difference [interval] | seeds CASMO better | Wilcoxon p |",
        "|---|---|---|---|---|---|",
    ]
    for casmo, other in pairs:
        for measure in MEASURES:
            lines.append(difference_row(casmo, other, measure, configs))
    lines += ["", "Failures, over the seeds both ran:", ""]
    lines += [
        "| comparison | pairs | failed (first, second) | discordant: only first, only second failed "
        "| exact binomial p |",
        "|---|---|---|---|---|",
    ]
    for casmo, other in pairs:
        lines.append(failure_row(casmo, other, configs))
        if other != baseline and configs.get(other):  # "a smaller step" asks how the control fared
            lines.append(failure_row(other, baseline, configs))
    lines += ["", 'Verdicts (docs/benchmark_protocol.md, "What would count as which answer"):', ""]
    for casmo in casmos:
        lines += verdict_lines(name, casmo, configs, baseline)
    return lines + ["", COMPARISON_CAPTION, ""]


def not_run(*names: str) -> str:
    return ", ".join(f"{name} not run" for name in names)


def difference_row(casmo: str, other: str, measure: Measure, configs: dict) -> str:
    title = f"{casmo} − {other}"
    missing = [name for name in (casmo, other) if not configs.get(name)]
    if missing:
        return f"| {title} | {measure.title} | {not_run(*missing)} | | | |"
    difference = paired_difference(measure, configs[casmo], configs[other])
    n = len(difference.differences)
    mean = signed(difference.differences.mean()) if n else "–"
    interval = f"{interval_text(difference.low, difference.high)} ({measure.interval_name})"
    cells = [title, measure.title, str(n), f"{mean} {interval}", f"{difference.better} of {n}"]
    return "| " + " | ".join([*cells, p_text(wilcoxon_p(difference.differences))]) + " |"


def failure_row(first: str, second: str, configs: dict) -> str:
    title = f"{first} vs {second}"
    missing = [name for name in (first, second) if not configs.get(name)]
    if missing:
        return f"| {title} | {not_run(*missing)} | | | |"
    split = failure_split(configs[first], configs[second])
    cells = [title, str(split.pairs), "{}, {}".format(*split.failed), "{}, {}".format(*split.discordant)]
    return "| " + " | ".join([*cells, p_text(split.p)]) + " |"


def verdict_lines(name: str, casmo: str, configs: dict, baseline: str) -> list[str]:
    """One line per primary endpoint: the verdict, the setting, the seeds it rests on."""
    control = f"{casmo}{CONTROL_SUFFIX}"
    missing = [config for config in (casmo, baseline) if not configs.get(config)]
    if missing:
        return [f"- {casmo}, {name}: no verdict ({not_run(*missing)})."]
    others = [other for other in (baseline, control) if configs.get(other)]
    lines = []
    for measure in MEASURES:
        against = [paired_difference(measure, configs[casmo], configs[other]) for other in others]
        answer = verdict(*sides(against), measure.decides_stabilising, None)
        pairs = [len(difference.differences) for difference in against]
        lines.append(verdict_line(casmo, name, measure.title, answer, pairs, others))
    splits = [failure_split(configs[casmo], configs[other]) for other in others]
    control_side = failure_split(configs[control], configs[baseline]).side if control in others else None
    answer = verdict(*sides(splits), STRESS_MARK in name, control_side)
    lines.append(verdict_line(casmo, name, "failed", answer, [split.pairs for split in splits], others))
    return lines


def sides(comparisons: list) -> tuple[str, str | None]:
    """The side of CASMO against the baseline and against its control (None: not run)."""
    return comparisons[0].side, comparisons[1].side if len(comparisons) > 1 else None


def verdict_line(
    casmo: str, name: str, endpoint: str, answer: str, pairs: list[int], others: list[str]
) -> str:
    counts = " and ".join(f"{n} vs {other}" for n, other in zip(pairs, others))
    return f"- **{casmo}, {name}, {endpoint}: {answer}** (paired seeds: {counts})."


def signed(value: float) -> str:
    return f"+{number(value)}" if value > 0 else number(value)


def p_text(p: float) -> str:
    return f"{p:.3g}" if math.isfinite(p) else "n/a"


COMPARISON_CAPTION = (
    "*Interval*: KID area, the 95% t-interval of the mean difference (n − 1 degrees of freedom); classes, "
    f"the 95% bootstrap percentile interval ({BOOTSTRAP_RESAMPLES:,} resamples of the seeds, generator "
    f"seed {BOOTSTRAP_SEED}); n/a below two pairs. *Better*: a lower KID area, more classes. *Wilcoxon p*: "
    "two-sided signed-rank test (scipy); n/a below two pairs or when every difference is zero. *Exact "
    "binomial p*: two-sided, on the seeds where only one of the two failed (McNemar); n/a when there is "
    'none. The control against the baseline enters the failure verdict only ("a smaller step" needs both '
    "to separate from it). Verdicts: *worse* when an interval lies on CASMO's worse side of zero or it "
    f"fails more often with p < {ALPHA} against either; *stabilises* when it is better than both (KID "
    "area in any setting, failures in the stress setting only); *a smaller step* when it is better than "
    "the baseline and not separated from its control; *not separated* otherwise."
)


# ---------------------------------------------------------------------------------------------
# The pilot


def pilot_table(run_dirs_by_candidate: dict[str, list[Path]]) -> tuple[str, list[str]]:
    """The protocol's choice of the stress setting from the pilot's adam_adam runs per candidate:
    the most failed runs; a tie goes to the higher mean KID area (no area ranks lowest); with no
    failure at all, the highest mean KID area. Returns the chosen candidate and markdown lines:
    the table per candidate and a line saying why it was chosen."""
    notes: list[str] = []
    runs = {candidate: read_endpoints(paths, notes) for candidate, paths in run_dirs_by_candidate.items()}
    ran = {candidate: candidate_runs for candidate, candidate_runs in runs.items() if candidate_runs}
    if not ran:
        raise RunError("no candidate has a finished pilot run; run benchmark.py --pilot first")
    check_one_feature_space([run for candidate_runs in ran.values() for run in candidate_runs])

    def failed(candidate: str) -> int:
        return sum(run["failed"] for run in ran[candidate])

    def mean_area(candidate: str) -> float:
        areas = [run["kid_area"] for run in ran[candidate] if math.isfinite(run["kid_area"])]
        return float(np.mean(areas)) if areas else -math.inf

    chosen = max(ran, key=lambda candidate: (failed(candidate), mean_area(candidate)))
    lines = [
        "| candidate | runs | seeds | failed, k/n [95% Clopper-Pearson] | diverged | collapsed | "
        "KID area, mean [95% t] |",
        "|---|---|---|---|---|---|---|",
    ]
    for candidate, candidate_runs in runs.items():
        lines.append(pilot_row(candidate, candidate_runs))
    if failed(chosen):
        why = f"the most failed pilot runs, {failed(chosen)} of {len(ran[chosen])}"
        tied = [other for other in ran if other != chosen and failed(other) == failed(chosen)]
        why += f", and of those tied with it ({', '.join(tied)}) the highest mean KID area" if tied else ""
    else:
        why = "the highest mean KID area: no candidate made adam_adam fail in any pilot seed"
    lines += ["", f"The stress setting: **{chosen}**, {why}.", ""]
    return chosen, lines + [f"- {note}" for note in notes] + ([""] if notes else [])


def run_cells(runs: list[dict]) -> list[str]:
    """A table row's run count and seeds."""
    return [str(len(runs)), ",".join(str(run["seed"]) for run in runs)]


def outcome_cells(runs: list[dict]) -> list[str]:
    """A table row's failed k/n with its Clopper-Pearson interval, then diverged and collapsed k/n."""
    failed = sum(run["failed"] for run in runs)
    return [
        f"{failed}/{len(runs)} {interval_text(*clopper_pearson(failed, len(runs)))}",
        f"{sum(run['diverged'] for run in runs)}/{len(runs)}",
        f"{sum(run['collapsed'] for run in runs)}/{len(runs)}",
    ]


def pilot_row(candidate: str, runs: list[dict]) -> str:
    if not runs:
        return f"| {candidate} | not run | | | | | |"
    cells = [candidate, *run_cells(runs), *outcome_cells(runs), mean_cell(runs, MEASURES[0])]
    return "| " + " | ".join(cells) + " |"


# ---------------------------------------------------------------------------------------------
# Command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="The benchmark protocol's endpoints, paired comparisons and verdicts, as markdown, "
        "for folders of run folders (one set each, named by the folder: dcgan-shapes, dcgan-shapes-control)."
    )
    parser.add_argument("sets", nargs="+", type=Path, metavar="SET_DIR", help="a folder of run folders")
    parser.add_argument("--baseline", default=BASELINE, help="the configuration CASMO is compared with")
    args = parser.parse_args(argv)
    sets = {}
    try:
        for folder in args.sets:
            runs = run_summary.expand_run_dirs([folder])
            if not folder.is_dir() or not any(map(run_summary.looks_like_run, runs)):
                raise RunError(
                    f"{folder} holds no run folders; pass folders such as docs/results/dcgan-shapes"
                )
            if folder.name in sets:
                raise RunError(f"two sets are named {folder.name}; pass each set once")
            sets[folder.name] = runs
        print("\n".join(results_sections(sets, args.baseline)))
    except RunError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
