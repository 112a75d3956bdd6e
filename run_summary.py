"""The run folders of train_toy2d.py and train_dcgan.py as data, without matplotlib: reading
them (log.csv and quality.csv as float columns), grouping runs into configurations and
comparison sets, the loss statistics and the convergence checklist, and the summary tables
(summary.csv, summary.md, Markdown rows). plot_logs.py draws its figures from these, and
benchmark.py its results.md.

    runs, skipped = read_runs([Path("runs")], group_by=[])
    rows = summary_rows(comparison_sets(runs))
"""

from __future__ import annotations

import csv
import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

import gan_common
from run_log import SAMPLE_MEASURES, read_status

# Windows of the loss statistics, as fractions of a run's logged rows.
EDGE_FRACTION = 0.10  # "initial" / "final" = mean of the first / last 10 % of logged rows
STABLE_FRACTION = 0.20  # the stability check looks at the last 20 %
TREND_FRACTION = 0.50  # the G loss trend is fitted on the last half

# The convergence checklist (after the training-analysis walkthrough), one threshold each.
D_COLLAPSED_BELOW = 0.1  # final D loss below this: D wins outright, G gets no useful signal
# G's samples spread less than this times the real images' (diversity_ratio): mode collapse. The
# training script's warning and the benchmark protocol's "collapsed" both use it.
COLLAPSE_RATIO = 0.3
D_STUCK_ABOVE = 1.3  # final D loss above this ...
D_STUCK_MAX_CHANGE = 0.1  # ... and within this of its initial value: D never learned
STABLE_MAX_CV = 0.2  # std / |mean| of the last 20 % of D and G loss below this: stabilised
G_TREND_MIN_CHANGE = 0.05  # fitted change over the last half, relative to its mean level; less is "flat"
WILD_OSCILLATION_RATIO = 0.5  # std of row-to-row changes / mean |loss| above this (D or G): wild
ALPHA = 0.05  # 95% intervals
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
# Measures with a range (shares of 0-1, a count of classes): a t-interval of their mean over a few
# seeds can leave it; a bootstrap percentile interval cannot.
BOUNDED_MEASURES = ("precision", "recall", "coverage", "modes_covered")
QUALITY_LAST_N = 3  # quality is also averaged over the last 3 evaluations

# The order in which tables and figures list the configurations; a control follows its own.
CONFIG_ORDER = ("adam_adam", "casmo_adam", "adam_casmo", "casmo_casmo")
CONTROL_SUFFIX = "-control"

# Arguments that may differ between seeds of one configuration without making them different experiments.
NOT_HYPERPARAMETERS = {
    "seed",
    "out",
    "out_dir",
    "run_dir",
    "resume",
    "device",
    "log_every",
    "workers",
    "data_dir",
}
PROGRESS_BAR_FROM = 5  # runs


# ---------------------------------------------------------------------------------------------
# Reading run folders


class NotARun(Exception):
    """A folder that cannot be read as a run; the message says why."""


class Columns(dict):
    """A CSV's columns as float arrays; a column the file lacks reads as all-NaN, so a figure
    or statistic of a column an older script did not log comes out empty instead of failing."""

    def __init__(self, data: dict[str, np.ndarray], n_rows: int):
        super().__init__(data)
        self.n_rows = n_rows

    def __missing__(self, key: str) -> np.ndarray:
        return np.full(self.n_rows, np.nan)


@dataclass
class LoggedRun:
    path: Path
    kind: str  # the script without "train_" and ".py": "toy2d" or "dcgan"
    dataset: str | None
    config: str  # "<g_opt>_<d_opt>"
    seed: object
    args: dict
    log: Columns
    quality: Columns | None
    real: np.ndarray | None
    generated: np.ndarray | None
    status: dict | None  # status.json (run_log.read_status); None for a run made before status files
    name: str = ""  # unique among the runs plotted together; set after loading

    @property
    def steps(self) -> np.ndarray:
        return self.log["step"]

    @property
    def diverged(self) -> bool:
        return is_diverged(self.status)


def is_diverged(status: dict | None) -> bool:
    return status is not None and status["status"] == "diverged"


def expand_run_dirs(paths: list[Path]) -> list[Path]:
    """A folder without config.json or log.csv but with run folders below it stands for those."""
    expanded = []
    for path in paths:
        if not path.exists():
            expanded.append(path)  # reported as skipped, with the reason, like any other
            continue
        children = sorted(child for child in path.iterdir() if looks_like_run(child)) if path.is_dir() else []
        expanded += children if children and not looks_like_run(path) else [path]
    return expanded


def looks_like_run(path: Path) -> bool:
    return (path / "config.json").is_file() or (path / "log.csv").is_file()


def load_runs(paths: list[Path]) -> tuple[list[LoggedRun], list[tuple[Path, str]]]:
    runs, skipped = [], []
    for path in tqdm(paths, desc="reading runs", disable=len(paths) < PROGRESS_BAR_FROM):
        try:
            runs.append(load_run(path))
        except NotARun as reason:
            skipped.append((path, str(reason)))
    assign_unique_names(runs)
    return runs, skipped


def load_run(path: Path) -> LoggedRun:
    config, status = read_config(path), read_run_status(path)
    if not (path / "log.csv").is_file():
        raise NotARun("no log.csv")
    log = read_numeric_csv(path / "log.csv")
    if "step" not in log:
        raise NotARun("log.csv has no step column")
    if log.n_rows == 0:
        stopped = f" (status.json: {status['status']} at step {status.get('step')})" if status else ""
        raise NotARun(f"log.csv has no complete data row{stopped}")
    args = config.get("args", {})
    kind = Path(str(config.get("script", "unknown"))).stem.removeprefix("train_")
    return LoggedRun(
        path=path,
        kind=kind,
        dataset=args.get("dataset") if kind == "dcgan" else None,
        config=config_name(args),
        seed=args.get("seed"),
        args=args,
        log=log,
        quality=read_numeric_csv(path / "quality.csv") if (path / "quality.csv").is_file() else None,
        real=read_points(path / "real.csv"),
        generated=read_points(path / "generated.csv"),
        status=status,
    )


def read_config(path: Path) -> dict:
    """A run folder's config.json; NotARun says why a folder has none that can be read."""
    if not path.exists():
        raise NotARun("does not exist")
    if not path.is_dir():
        raise NotARun("not a folder")
    if not (path / "config.json").is_file():
        raise NotARun("no config.json")
    try:
        return json.loads((path / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise NotARun(f"config.json is not valid JSON ({error})") from None


def read_run_status(path: Path) -> dict | None:
    try:
        return read_status(path)
    except gan_common.RunError as error:
        raise NotARun(str(error)) from None


def config_name(args: dict) -> str:
    """A run's configuration: its --label (a control's "casmo_adam-control"), else "<g_opt>_<d_opt>"."""
    return args.get("label") or f"{args.get('g_opt', '?')}_{args.get('d_opt', '?')}"


def read_numeric_csv(path: Path) -> Columns:
    """Every column as floats ('' is NaN, True/False are 1/0). A row with the wrong number of
    fields or a non-number is skipped and reported: a run still being written ends mid-line."""
    with open(path, newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None) or []
        rows, malformed = [], 0
        for fields in reader:
            if not fields:  # a blank line
                continue
            row = parse_row(fields, len(header))
            if row is None:
                malformed += 1
            else:
                rows.append(row)
    if malformed:
        tqdm.write(
            f"note: {path}: skipped {malformed} malformed row(s) (a run still being written ends mid-line)"
        )
    values = np.array(rows, dtype=float).reshape(len(rows), len(header))
    if "step" in header:  # rows without a step cannot be placed on any axis
        values = values[np.isfinite(values[:, header.index("step")])]
    return Columns({name: values[:, i] for i, name in enumerate(header)}, len(values))


def parse_row(fields: list[str], width: int) -> list[float] | None:
    if len(fields) != width or width == 0:
        return None
    try:
        return [parse_number(field) for field in fields]
    except ValueError:
        return None


def parse_number(text: str) -> float:
    text = text.strip()
    booleans = {"true": 1.0, "false": 0.0, "": math.nan}
    return booleans[text.lower()] if text.lower() in booleans else float(text)


def read_points(path: Path) -> np.ndarray | None:
    if not path.is_file():
        return None
    points = read_numeric_csv(path)
    return np.column_stack([points["x"], points["y"]]) if points.n_rows else None


def assign_unique_names(runs: list[LoggedRun]) -> None:
    """The folder name, widened by its parent's name where two runs share it."""
    counts = Counter(run.path.name for run in runs)
    for run in runs:
        run.name = run.path.name if counts[run.path.name] == 1 else f"{run.path.parent.name}_{run.path.name}"
    seen = Counter()
    for run in runs:  # still equal (same parent name too): number them
        seen[run.name] += 1
        if seen[run.name] > 1:
            run.name = f"{run.name}_{seen[run.name]}"


def comparison_sets(runs: list[LoggedRun]) -> dict[str, list[LoggedRun]]:
    """Runs compared with one another: same script and, for the DCGAN, same dataset. Keyed by the
    prefix of their files: empty when there is one set, else e.g. "toy2d_" / "dcgan_"."""
    keys = sorted({(run.kind, run.dataset or "") for run in runs})
    kinds = Counter(kind for kind, _ in keys)

    def prefix(kind: str, dataset: str) -> str:
        if len(keys) == 1:
            return ""
        return f"{kind}_{dataset}_" if kinds[kind] > 1 else f"{kind}_"

    return {
        prefix(*key): sorted_runs([run for run in runs if (run.kind, run.dataset or "") == key])
        for key in keys
    }


def set_label(run: LoggedRun) -> str:
    return run.kind + (f" ({run.dataset})" if run.dataset else "")


def sorted_runs(runs: list[LoggedRun]) -> list[LoggedRun]:
    return sorted(runs, key=lambda run: (config_rank(run.config), str(run.seed), run.name))


def config_rank(config: str) -> tuple[int, str]:
    optimizers = config.split(" (")[0]  # without the --group-by values
    base = optimizers.removesuffix(CONTROL_SUFFIX)  # a control sorts after its configuration
    return (CONFIG_ORDER.index(base) if base in CONFIG_ORDER else len(CONFIG_ORDER), config)


def by_config(runs: list[LoggedRun]) -> dict[str, list[LoggedRun]]:
    grouped: dict[str, list[LoggedRun]] = {}
    for run in sorted_runs(runs):
        grouped.setdefault(run.config, []).append(run)
    return grouped


def warn_mixed_hyperparameters(runs: list[LoggedRun]) -> None:
    """Seeds of one configuration are averaged; say so when they differ in more than the seed."""
    for config, seeds in by_config(runs).items():
        keys = set().union(*(run.args for run in seeds)) - NOT_HYPERPARAMETERS
        differing = sorted(key for key in keys if len({json.dumps(run.args.get(key)) for run in seeds}) > 1)
        if differing:
            print(
                f"note: the runs of {config} differ in {', '.join(differing)}; "
                "they are still averaged as seeds"
            )


def read_runs(run_dirs: list[Path], group_by: list[str]) -> tuple[list[LoggedRun], list[tuple[Path, str]]]:
    """The readable runs of run_dirs (a folder of run folders stands for them) and the others
    with the reason; with `group_by`, each run's configuration names its values of those
    arguments, so that runs differing in them are not averaged as seeds."""
    runs, skipped = load_runs(expand_run_dirs(run_dirs))
    for run in runs:
        if group_by:
            values = ", ".join(f"{name}={run.args.get(name)}" for name in group_by)
            run.config = f"{run.config} ({values})"
    return runs, skipped


# ---------------------------------------------------------------------------------------------
# Sample grids

SIDE_BY_SIDE_ROWS = 4  # steps shown in compare_samples.png


def step_grids(run_dir: Path) -> dict[int, Path]:
    """The run's sample grids of --sample-every / --eval-every, by step (PNG as the script
    writes them, or JPEG as benchmark.py --publish keeps them)."""
    grids = {}
    for path in [*(run_dir / "samples").glob("step_*.png"), *(run_dir / "samples").glob("step_*.jpg")]:
        step = path.stem.removeprefix("step_")
        if step.isdigit():
            grids[int(step)] = path
    return grids


def side_by_side_steps(steps: list[int]) -> list[int]:
    """The steps compare_samples.png shows: evenly spread, the first and the last included."""
    steps = sorted(steps)
    picks = np.linspace(0, len(steps) - 1, min(SIDE_BY_SIDE_ROWS, len(steps)))
    return sorted({steps[round(index)] for index in picks})


# ---------------------------------------------------------------------------------------------
# Tables

LOSS_STATISTICS = ("initial", "final", "min", "max", "mean", "std")
VERDICTS = (
    "diverged", "d_collapsed", "d_stuck_high", "stabilised", "g_trend", "wild_oscillation", "ever_covered",
)  # fmt: skip
# The DCGAN's sample measures in the tables: all but kid_std.
DCGAN_MEASURES = tuple(name for name in SAMPLE_MEASURES if name != "kid_std")
SUMMARY_QUALITY_COLUMNS = {
    "toy2d": ("on_support", "left_share", "mmd", "precision", "recall", "density", "coverage"),
    "dcgan": ("diversity_ratio", *DCGAN_MEASURES, *(f"{name}_ema" for name in DCGAN_MEASURES)),
}


def run_summary(run: LoggedRun) -> dict[str, object]:
    d_loss, g_loss = run.log["loss_d"], run.log["loss_g"]
    summary: dict[str, object] = {
        "rows": run.log.n_rows,
        "last_step": float(np.nanmax(run.steps)),
        "diverged": "yes" if run.diverged else "no",
    }
    for network, values in (("d", d_loss), ("g", g_loss)):
        summary.update({f"{network}_{name}": value for name, value in loss_statistics(values).items()})
    summary.update(convergence_checks(d_loss, g_loss, run.steps))
    summary["d_dominated_share"] = dominated_share(run)
    summary.update(final_quality(run))
    summary["steps_per_sec_median"] = nan_median(run.log["steps_per_sec"])
    return summary


def loss_statistics(values: np.ndarray) -> dict[str, float]:
    values = values[np.isfinite(values)]
    if not len(values):
        return dict.fromkeys(LOSS_STATISTICS, math.nan)
    edge = edge_rows(len(values), EDGE_FRACTION)
    return {
        "initial": float(values[:edge].mean()),
        "final": float(values[-edge:].mean()),
        "min": float(values.min()),
        "max": float(values.max()),
        "mean": float(values.mean()),
        "std": float(values.std()),
    }


def edge_rows(n_rows: int, fraction: float) -> int:
    return max(1, round(fraction * n_rows))


def convergence_checks(d_loss: np.ndarray, g_loss: np.ndarray, steps: np.ndarray) -> dict[str, object]:
    """The checklist's measurements and their verdicts ("yes"/"no", or "n/a" without data)."""
    d_stats = loss_statistics(d_loss)
    d_cv, g_cv = tail_cv(d_loss), tail_cv(g_loss)
    g_change = tail_relative_change(steps, g_loss)
    d_oscillation, g_oscillation = oscillation(d_loss), oscillation(g_loss)
    return {
        "d_last20_cv": d_cv,
        "g_last20_cv": g_cv,
        "g_last_half_change": g_change,
        "d_oscillation": d_oscillation,
        "g_oscillation": g_oscillation,
        "d_collapsed": verdict(d_stats["final"], d_stats["final"] < D_COLLAPSED_BELOW),
        "d_stuck_high": verdict(
            d_stats["final"],
            d_stats["final"] > D_STUCK_ABOVE
            and abs(d_stats["final"] - d_stats["initial"]) < D_STUCK_MAX_CHANGE,
        ),
        "stabilised": verdict(d_cv + g_cv, d_cv < STABLE_MAX_CV and g_cv < STABLE_MAX_CV),
        "g_trend": g_trend(g_change),
        "wild_oscillation": verdict(
            d_oscillation + g_oscillation, max(d_oscillation, g_oscillation) > WILD_OSCILLATION_RATIO
        ),
    }


def verdict(measured: float, condition: bool) -> str:
    return "n/a" if math.isnan(measured) else "yes" if condition else "no"


def tail_cv(values: np.ndarray) -> float:
    """std / |mean| of the last STABLE_FRACTION of the logged values."""
    values = values[np.isfinite(values)]
    if not len(values):
        return math.nan
    tail = values[-edge_rows(len(values), STABLE_FRACTION) :]
    mean = abs(tail.mean())
    return float(tail.std() / mean) if mean > 0 else math.inf


def tail_relative_change(steps: np.ndarray, values: np.ndarray) -> float:
    """The change a straight line fitted to the last half predicts across it, relative to the
    mean level there: positive is rising."""
    finite = np.isfinite(values)
    steps, values = steps[finite], values[finite]
    half = edge_rows(len(values), TREND_FRACTION)
    steps, values = steps[-half:], values[-half:]
    if len(values) < 2 or steps[-1] == steps[0]:
        return math.nan
    slope = np.polyfit(steps, values, 1)[0]
    level = abs(values.mean())
    return float(slope * (steps[-1] - steps[0]) / level) if level > 0 else math.nan


def g_trend(relative_change: float) -> str:
    if not math.isfinite(relative_change):
        return "n/a"
    if abs(relative_change) < G_TREND_MIN_CHANGE:
        return "flat"
    return "rising" if relative_change > 0 else "falling"


def oscillation(values: np.ndarray) -> float:
    """std of the change from one logged row to the next, relative to the mean |loss|."""
    values = values[np.isfinite(values)]
    level = np.abs(values).mean() if len(values) else 0.0
    return float(np.diff(values).std() / level) if len(values) >= 3 and level > 0 else math.nan


def dominated_share(run: LoggedRun) -> float:
    """The share of logged steps where D won outright (gan_common.d_dominated)."""
    d_x, d_g_z = run.log["d_x"], run.log["d_g_z"]
    logged = np.isfinite(d_x) & np.isfinite(d_g_z)
    if not logged.any():
        return math.nan
    real_label = gan_common.real_label(run.args.get("label_smooth", 0.9), run.args.get("real_label_range"))
    return float(np.mean(gan_common.d_dominated(d_x[logged], d_g_z[logged], real_label)))


def final_quality(run: LoggedRun) -> dict[str, object]:
    """Per quality column: the last evaluation, and for the toy also the mean of the last few
    and the first evaluation at which both semicircles were covered (coverage_ok)."""
    figures = {}
    for column in SUMMARY_QUALITY_COLUMNS.get(run.kind, ()):
        values = run.quality[column] if run.quality is not None else np.array([])
        values = values[np.isfinite(values)]
        figures[f"{column}_final"] = float(values[-1]) if len(values) else math.nan
        if run.kind == "toy2d":
            figures[f"{column}_last{QUALITY_LAST_N}"] = (
                float(values[-QUALITY_LAST_N:].mean()) if len(values) else math.nan
            )
    if run.kind == "toy2d":
        covered = run.quality["epoch"][run.quality["coverage_ok"] == 1] if run.quality is not None else []
        figures["first_coverage_epoch"] = float(covered[0]) if len(covered) else math.nan
        figures["ever_covered"] = "yes" if len(covered) else "no"
    return figures


def nan_median(values: np.ndarray) -> float:
    values = values[np.isfinite(values)]
    return float(np.median(values)) if len(values) else math.nan


def summary_rows(sets: dict[str, list[LoggedRun]]) -> list[dict[str, object]]:
    """Per set: one row per configuration (mean and std over its seeds), then one per run."""
    rows = []
    for runs in sets.values():
        what = set_label(runs[0])
        per_run = [(run, run_summary(run)) for run in runs]
        for config, seeds in by_config(runs).items():
            summaries = [summary for run, summary in per_run if run.config == config]
            rows.append(
                {
                    "set": what,
                    "scope": "configuration",
                    "name": config,
                    "configuration": config,
                    "seeds": ",".join(str(run.seed) for run in seeds),
                    **aggregate(summaries, [run.seed for run in seeds]),
                }
            )
        for run, summary in per_run:
            rows.append(
                {
                    "set": what,
                    "scope": "run",
                    "name": run.name,
                    "configuration": run.config,
                    "seeds": str(run.seed),
                    **summary,
                }
            )
    return rows


def aggregate(summaries: list[dict[str, object]], seeds: list[object]) -> dict[str, object]:
    """Numbers: mean, with the sample std over seeds in "<name>_std" (NaN for one seed) and the
    95% interval of the mean in "<name>_ci95_low" and "_high" (a bootstrap one for the measures
    with a range, see `bounded`; else a t-interval). Verdicts: how many seeds said yes ("2/3"); the
    G trend: the common word or the counts. Where some seeds have no value (a non-finite number,
    a verdict "n/a") and others do, "<name>_nan_seeds" lists them ("1,2"): the mean and the
    counts are of the other seeds."""
    combined: dict[str, object] = {}
    for key in summaries[0]:
        values = [summary[key] for summary in summaries]
        if key == "g_trend":
            counts = Counter(values)
            combined[key] = (
                values[0]
                if len(counts) == 1
                else ", ".join(f"{word} {n}" for word, n in counts.most_common())
            )
            continue
        if key in VERDICTS:
            missing = [value == "n/a" for value in values]
            combined[key] = "n/a" if all(missing) else f"{values.count('yes')}/{len(values) - sum(missing)}"
        else:
            numbers = np.array(values, dtype=float)
            missing = list(~np.isfinite(numbers))
            finite = numbers[np.isfinite(numbers)]
            combined[key] = float(finite.mean()) if len(finite) else math.nan
            combined[f"{key}_std"] = float(finite.std(ddof=1)) if len(finite) > 1 else math.nan
            interval = bootstrap_interval if bounded(key) else t_interval
            combined[f"{key}_ci95_low"], combined[f"{key}_ci95_high"] = interval(finite)
        if any(missing) and not all(missing):
            combined[f"{key}_nan_seeds"] = ",".join(str(seed) for seed, gone in zip(seeds, missing) if gone)
    return combined


def bounded(key: str) -> bool:
    """Whether a summary number ("recall_ema_final") is one of BOUNDED_MEASURES."""
    return key.rsplit("_", 1)[0].removesuffix("_ema") in BOUNDED_MEASURES


def t_interval(values: np.ndarray) -> tuple[float, float]:
    """The 95% t-interval of the mean (n − 1 degrees of freedom); NaN below two values."""
    if len(values) < 2:
        return math.nan, math.nan
    import scipy.stats  # here: the training scripts import this module, and scipy.stats takes a second

    half = scipy.stats.t.ppf(1 - ALPHA / 2, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values))
    return float(values.mean() - half), float(values.mean() + half)


def bootstrap_interval(values: np.ndarray) -> tuple[float, float]:
    """The 95% bootstrap percentile interval of the mean (BOOTSTRAP_RESAMPLES resamples, generator
    BOOTSTRAP_SEED): it stays within the values' range. NaN below two values."""
    if len(values) < 2:
        return math.nan, math.nan
    picks = np.random.default_rng(BOOTSTRAP_SEED).integers(0, len(values), (BOOTSTRAP_RESAMPLES, len(values)))
    low, high = np.percentile(values[picks].mean(axis=1), [50 * ALPHA, 100 - 50 * ALPHA])
    return float(low), float(high)


def write_summary_csv(rows: list[dict[str, object]], path: Path) -> None:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({key: csv_value(value) for key, value in row.items()})


def csv_value(value: object) -> object:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return value


# Markdown columns: (header, summary key). The quality columns depend on the script.
MD_LOSS_COLUMNS = [
    (f"{net} {stat}", f"{net.lower()}_{stat}") for net in ("D", "G") for stat in LOSS_STATISTICS
]
MD_DIVERGED_COLUMN = ("diverged", "diverged")  # in every table: status.json says so
MD_CHECK_COLUMNS = [
    ("D collapsed", "d_collapsed"),
    ("D stuck high", "d_stuck_high"),
    ("stabilised", "stabilised"),
    ("G trend", "g_trend"),
    ("wild oscillation", "wild_oscillation"),
    ("D-dominated share", "d_dominated_share"),
]
MD_QUALITY_COLUMNS = {
    "toy2d": [
        ("on support", "on_support_final"),
        (f"on support, last {QUALITY_LAST_N}", f"on_support_last{QUALITY_LAST_N}"),
        ("left share", "left_share_final"),
        (f"left share, last {QUALITY_LAST_N}", f"left_share_last{QUALITY_LAST_N}"),
        ("MMD", "mmd_final"),
        (f"MMD, last {QUALITY_LAST_N}", f"mmd_last{QUALITY_LAST_N}"),
        ("ever covers both", "ever_covered"),
        ("first epoch covering both", "first_coverage_epoch"),
    ],
    "dcgan": [("diversity ratio", "diversity_ratio_final")],
}
MD_SPEED_COLUMNS = [("steps/s (median)", "steps_per_sec_median")]
# The k-NN and feature-space measures at the last evaluation, with 95% intervals over seeds.
MD_MEASURE_COLUMNS = {
    "toy2d": [(name, f"{name}_final") for name in ("precision", "recall", "density", "coverage")],
    "dcgan": [(name.replace("_", " "), f"{name}_final") for name in DCGAN_MEASURES]
    + [(f"{name.replace('_', ' ')} (EMA G)", f"{name}_ema_final") for name in DCGAN_MEASURES],
}


def write_summary_md(
    rows: list[dict[str, object]], sets: dict[str, list[LoggedRun]], path: Path, caption: str | None = None
) -> None:
    """The tables of every set; `caption`, the file's first line, says what the tables cannot
    (e.g. that the runs are one seed each)."""
    lines = [caption, ""] if caption else []
    for runs in sets.values():
        what = set_label(runs[0])
        set_rows = [row for row in rows if row["set"] == what]
        lines += [f"### {what}: loss statistics", ""]
        lines += markdown_table(set_rows, [MD_DIVERGED_COLUMN, *MD_LOSS_COLUMNS])
        lines += ["", LOSS_CAPTION, "", f"### {what}: convergence checks, quality, speed", ""]
        checks = [MD_DIVERGED_COLUMN, *MD_CHECK_COLUMNS, *MD_QUALITY_COLUMNS.get(runs[0].kind, [])]
        lines += markdown_table(set_rows, checks + MD_SPEED_COLUMNS)
        lines += ["", CHECKS_CAPTION, ""]
        measures = [
            column for column in MD_MEASURE_COLUMNS.get(runs[0].kind, []) if has_values(set_rows, column[1])
        ]
        if measures:
            lines += [f"### {what}: sample quality at the last evaluation", ""]
            lines += markdown_table(set_rows, [MD_DIVERGED_COLUMN, *measures], cell=interval_cell)
            lines += ["", MEASURES_CAPTION, ""]
    path.write_text("\n".join(lines))


def has_values(rows: list[dict[str, object]], key: str) -> bool:
    return any(isinstance(row.get(key), float) and math.isfinite(row[key]) for row in rows)


def markdown_table(rows: list[dict[str, object]], columns: list[tuple[str, str]], cell=None) -> list[str]:
    """Rows as a Markdown table; `cell(row, key)` writes a cell (default: mean ± std)."""
    cell = cell or markdown_cell
    header = ["configuration / run", "seeds"] + [title for title, _ in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        name = f"**{row['name']}**" if row["scope"] == "configuration" else row["name"]
        cells = [name, str(row["seeds"])] + [cell(row, key) for _, key in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown_cell(row: dict[str, object], key: str) -> str:
    value = row.get(key, math.nan)
    if not isinstance(value, float):
        return str(value) + missing_seeds_note(row, key)
    std = row.get(f"{key}_std", math.nan)
    return number(value) + (f" ± {number(std)}" if math.isfinite(std) else "") + missing_seeds_note(row, key)


def interval_cell(row: dict[str, object], key: str) -> str:
    """The mean and its 95% interval over seeds, "0.412 [0.371, 0.453]"."""
    value, low, high = (row.get(key + suffix, math.nan) for suffix in ("", "_ci95_low", "_ci95_high"))
    if not isinstance(value, float) or not math.isfinite(low):
        return markdown_cell(row, key)
    return f"{number(value)} [{number(low)}, {number(high)}]" + missing_seeds_note(row, key)


def missing_seeds_note(row: dict[str, object], key: str) -> str:
    """ " (seed 1 NaN)" / " (seeds 1,2 n/a)" after a configuration's cell whose mean or count
    leaves those seeds out; nothing when every seed has a value."""
    seeds = row.get(f"{key}_nan_seeds")
    if not seeds:
        return ""
    what = "NaN" if isinstance(row.get(key), float) else "n/a"
    return f" (seed{'s' * (',' in seeds)} {seeds} {what})"


def number(value: float) -> str:
    """Three significant digits, trailing zeros kept so a column lines up (1.30, 0.760, 120)."""
    if math.isnan(value):
        return "–"
    return f"{value:.0f}" if 100 <= abs(value) < 1e5 else f"{value:#.3g}"


LOSS_CAPTION = (
    f"Losses as logged (one value per logged step). *initial* / *final*: mean of the first / last "
    f"{EDGE_FRACTION:.0%} of logged steps; *min*, *max*, *mean*, *std*: over all logged steps. "
    "Bold rows: a configuration, mean ± sample std over its seeds; the other rows are single runs. "
    "*diverged*: runs whose status.json says a loss or a weight turned non-finite (their logs end "
    'there); a run without status.json counts as not diverged. "(seed 1 NaN)": the mean leaves out '
    'that seed, whose value is not finite (a check\'s "n/a": it lacked the data).'
)
MEASURES_CAPTION = (
    "The last evaluation in quality.csv. Bold rows: the mean over seeds and, in brackets, its 95% "
    "interval: for precision, recall, coverage and modes covered, which have a range, the bootstrap "
    f"percentile interval ({BOOTSTRAP_RESAMPLES:,} resamples of the seeds, generator seed "
    f"{BOOTSTRAP_SEED}), which cannot leave it; for the others the t-interval (n − 1 degrees of "
    "freedom). The other rows are single runs. DCGAN: KID "
    "and FID in the feature space config.json names (shapes-cnn: the shapes classifier's, not comparable "
    "with Inception FIDs), k-NN precision, recall, density and coverage (k = 3) in the same space, and "
    "on shapes the classes with at least 5 confidently classified samples (modes covered) and the KL "
    "divergence of the generated class histogram from the real one (mode KL); EMA G: the generator's "
    "moving average (--g-ema)."
)
CHECKS_CAPTION = "\n".join(
    [
        "Definitions (configuration rows give how many seeds answered *yes*):",
        f"- *D collapsed*: final D loss < {D_COLLAPSED_BELOW}.",
        f"- *D stuck high*: final D loss > {D_STUCK_ABOVE} and within {D_STUCK_MAX_CHANGE} "
        "of its initial value.",
        f"- *stabilised*: over the last {STABLE_FRACTION:.0%} of logged steps, "
        f"std / |mean| < {STABLE_MAX_CV} for both the D and the G loss.",
        f"- *G trend*: a straight line fitted to the G loss over the last {TREND_FRACTION:.0%} "
        "of logged steps; the change it predicts across that window, relative to the mean there, "
        f"within ±{G_TREND_MIN_CHANGE} is *flat*.",
        "- *wild oscillation*: std of the change between consecutive logged steps, "
        f"relative to the mean |loss|, > {WILD_OSCILLATION_RATIO} for D or G.",
        "- *D-dominated share*: share of logged steps where D won outright: "
        f"D(G(z)) < {gan_common.DOMINANCE_FAKE} and D(x) within {gan_common.DOMINANCE_REAL_MARGIN} "
        "of D's real label (0.9 by default).",
        f"- Quality: the last evaluation in quality.csv; *last {QUALITY_LAST_N}*: "
        f"mean of the last {QUALITY_LAST_N} evaluations. steps/s: median over logged steps.",
        "- Toy only: *ever covers both*: some evaluation had coverage_ok (more than 90% of the samples "
        "on the arcs, each arc holding 35-65% of them); *first epoch covering both*: the earliest such "
        "evaluation, averaged over the seeds that reached it.",
    ]
)
