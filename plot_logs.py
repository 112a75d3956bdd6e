"""Figures and tables for a paper from the run folders of train_toy2d.py and train_dcgan.py.

    python plot_logs.py runs/* --out plots

Per run, in OUT/<run>/: loss_plot.png, score_plot.png, optimizer_plot.png, grad_norm_plot.png,
and, when the run wrote quality.csv, quality_plot.png (plus scatter.png for the 2-D toy).
Across runs, in OUT/: compare_loss.png, compare_scores.png, compare_grad_norm.png and
comparison_2x2.png, where the seeds of one configuration are drawn as mean ± std, and the
tables summary.md and summary.csv. Runs of different scripts (or DCGAN datasets) are compared
separately; their files then carry a prefix such as toy2d_ or dcgan_.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import matplotlib.ticker as ticker
import numpy as np
import scipy.stats
from tqdm import tqdm

import gan_common


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Figures and summary tables from GAN run folders.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "run_dirs",
        nargs="+",
        type=Path,
        metavar="RUN_DIR",
        help="run folders (a folder that holds run folders stands for all of them)",
    )
    parser.add_argument("--out", type=Path, default=Path("plots"), help="folder for figures and tables")
    parser.add_argument(
        "--into-run",
        action="store_true",
        help="allow --out to lie inside a run folder (off: runs stay untouched)",
    )
    parser.add_argument(
        "--group-by",
        nargs="+",
        default=[],
        metavar="ARG",
        help="split each configuration by the values of these run arguments (e.g. robustness), "
        "instead of averaging runs that differ in them as seeds",
    )
    parser.add_argument(
        "--smooth",
        type=float,
        default=0.02,
        help="time constant of the moving average, as a fraction of a run's logged steps",
    )
    return parser.parse_args(argv)


# Windows of the loss statistics, as fractions of a run's logged rows.
EDGE_FRACTION = 0.10  # "initial" / "final" = mean of the first / last 10 % of logged rows
STABLE_FRACTION = 0.20  # the stability check looks at the last 20 %
TREND_FRACTION = 0.50  # the G loss trend is fitted on the last half

# The convergence checklist (after the training-analysis walkthrough), one threshold each.
D_COLLAPSED_BELOW = 0.1  # final D loss below this: D wins outright, G gets no useful signal
D_STUCK_ABOVE = 1.3  # final D loss above this ...
D_STUCK_MAX_CHANGE = 0.1  # ... and within this of its initial value: D never learned
STABLE_MAX_CV = 0.2  # std / |mean| of the last 20 % of D and G loss below this: stabilised
G_TREND_MIN_CHANGE = 0.05  # fitted change over the last half, relative to its mean level; less is "flat"
WILD_OSCILLATION_RATIO = 0.5  # std of row-to-row changes / mean |loss| above this (D or G): wild
QUALITY_LAST_N = 3  # quality is also averaged over the last 3 evaluations

# One colour per configuration, the same in every figure.
CONFIG_ORDER = ("adam_adam", "casmo_adam", "adam_casmo", "casmo_casmo")
CONFIG_COLORS = {
    "adam_adam": "#555555",
    "casmo_adam": "tab:blue",
    "adam_casmo": "tab:orange",
    "casmo_casmo": "tab:green",
    # Adam at a CASMO configuration's mean step (benchmark.py's control runs, --label).
    "casmo_adam-control": "tab:purple",
    "adam_casmo-control": "tab:brown",
    "casmo_casmo-control": "tab:olive",
}
CONTROL_SUFFIX = "-control"
SPARE_COLORS = ("tab:pink", "tab:cyan", "tab:red", "gold")  # none of CONFIG_COLORS'

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

MIN_SMOOTHING_INTERVALS = 3  # the moving average spans at least this many logging intervals
GRID_POINTS = 500  # common step grid on which seeds logged at different intervals are averaged
SCATTER_MAX_POINTS = 4000
PROGRESS_BAR_FROM = 5  # runs
DPI = 150
STYLE = {
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "legend.fontsize": 9,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "axes.grid": True,
    "grid.alpha": 0.3,
}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        gan_common.check_writable_folder(args.out, "--out")
        report(args)
    except (NotARun, gan_common.RunError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


def report(args: argparse.Namespace) -> list[dict[str, object]]:
    """Draws every figure and writes the tables for the runs in args.run_dirs; returns the
    summary rows (summary.csv's). Raises NotARun when no folder is a readable run."""
    candidates = expand_run_dirs(args.run_dirs)
    runs, skipped = load_runs(candidates)
    for run in runs:
        if args.group_by:
            values = ", ".join(f"{name}={run.args.get(name)}" for name in args.group_by)
            run.config = f"{run.config} ({values})"
    for path, reason in skipped:
        print(f"skipped {path}: {reason}")
    if not runs:
        raise NotARun(f"none of the {len(candidates)} folder(s) is a readable run folder")
    out = args.out.resolve()
    if not args.into_run:
        refuse_outputs_inside_runs(out, runs)

    matplotlib.use("Agg")  # files only: the machines the runs come from have no display
    plt.rcParams.update(STYLE)
    out.mkdir(parents=True, exist_ok=True)
    for run in tqdm(runs, desc="per-run figures", disable=len(runs) < PROGRESS_BAR_FROM):
        plot_run(run, out / run.name, args.smooth)

    sets = comparison_sets(runs)
    compare_files = []
    for prefix, set_runs in sets.items():
        warn_mixed_hyperparameters(set_runs)
        compare_files += plot_comparisons(set_runs, out, prefix, args.smooth)
    rows = summary_rows(sets)
    write_summary_csv(rows, out / "summary.csv")
    write_summary_md(rows, sets, out / "summary.md")

    print(f"per-run figures: {out}/<run>/ for {len(runs)} run(s): {', '.join(run.name for run in runs)}")
    print(f"comparison figures: {', '.join(str(path) for path in compare_files)}")
    print(f"tables: {out / 'summary.md'}, {out / 'summary.csv'}")
    return rows


# ---------------------------------------------------------------------------------------------
# Reading run folders


class NotARun(Exception):
    """A folder that cannot be plotted; the message says why."""


class Columns(dict):
    """A CSV's columns as float arrays; a column the file lacks reads as all-NaN, so a figure
    or statistic of a column an older script did not log comes out empty instead of failing."""

    def __init__(self, data: dict[str, np.ndarray], n_rows: int):
        super().__init__(data)
        self.n_rows = n_rows

    def __missing__(self, key: str) -> np.ndarray:
        return np.full(self.n_rows, np.nan)


@dataclass
class Run:
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
    name: str = ""  # unique among the runs plotted together; set after loading

    @property
    def steps(self) -> np.ndarray:
        return self.log["step"]


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


def load_runs(paths: list[Path]) -> tuple[list[Run], list[tuple[Path, str]]]:
    runs, skipped = [], []
    for path in tqdm(paths, desc="reading runs", disable=len(paths) < PROGRESS_BAR_FROM):
        try:
            runs.append(load_run(path))
        except NotARun as reason:
            skipped.append((path, str(reason)))
    assign_unique_names(runs)
    return runs, skipped


def load_run(path: Path) -> Run:
    if not path.exists():
        raise NotARun("does not exist")
    if not path.is_dir():
        raise NotARun("not a folder")
    for required in ("config.json", "log.csv"):
        if not (path / required).is_file():
            raise NotARun(f"no {required}")
    try:
        config = json.loads((path / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise NotARun(f"config.json is not valid JSON ({error})") from None
    log = read_numeric_csv(path / "log.csv")
    if "step" not in log:
        raise NotARun("log.csv has no step column")
    if log.n_rows == 0:
        raise NotARun("log.csv has no complete data row")
    args = config.get("args", {})
    kind = Path(str(config.get("script", "unknown"))).stem.removeprefix("train_")
    return Run(
        path=path,
        kind=kind,
        dataset=args.get("dataset") if kind == "dcgan" else None,
        config=args.get("label") or f"{args.get('g_opt', '?')}_{args.get('d_opt', '?')}",
        seed=args.get("seed"),
        args=args,
        log=log,
        quality=read_numeric_csv(path / "quality.csv") if (path / "quality.csv").is_file() else None,
        real=read_points(path / "real.csv"),
        generated=read_points(path / "generated.csv"),
    )


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


def assign_unique_names(runs: list[Run]) -> None:
    """The folder name, widened by its parent's name where two runs share it."""
    counts = Counter(run.path.name for run in runs)
    for run in runs:
        run.name = run.path.name if counts[run.path.name] == 1 else f"{run.path.parent.name}_{run.path.name}"
    seen = Counter()
    for run in runs:  # still equal (same parent name too): number them
        seen[run.name] += 1
        if seen[run.name] > 1:
            run.name = f"{run.name}_{seen[run.name]}"


def refuse_outputs_inside_runs(out: Path, runs: list[Run]) -> None:
    """Figures must not land in a run folder (it may still be written, and is the record of the
    run) unless asked for with --into-run: neither OUT nor any OUT/<run> may be in one."""
    targets = [out] + [out / run.name for run in runs]
    for run in runs:
        folder = run.path.resolve()
        for target in targets:
            if target == folder or folder in target.parents:
                sys.exit(
                    f"error: output {target} would be inside run folder {folder}; pass --into-run to allow it"
                )


def comparison_sets(runs: list[Run]) -> dict[str, list[Run]]:
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


def set_label(run: Run) -> str:
    return run.kind + (f" ({run.dataset})" if run.dataset else "")


def sorted_runs(runs: list[Run]) -> list[Run]:
    return sorted(runs, key=lambda run: (config_rank(run.config), str(run.seed), run.name))


def config_rank(config: str) -> tuple[int, str]:
    optimizers = config.split(" (")[0]  # without the --group-by values
    base = optimizers.removesuffix(CONTROL_SUFFIX)  # a control sorts after its configuration
    return (CONFIG_ORDER.index(base) if base in CONFIG_ORDER else len(CONFIG_ORDER), config)


def by_config(runs: list[Run]) -> dict[str, list[Run]]:
    grouped: dict[str, list[Run]] = {}
    for run in sorted_runs(runs):
        grouped.setdefault(run.config, []).append(run)
    return grouped


def config_color(config: str) -> str:
    if config in CONFIG_COLORS:
        return CONFIG_COLORS[config]
    return SPARE_COLORS[sum(map(ord, config)) % len(SPARE_COLORS)]


def warn_mixed_hyperparameters(runs: list[Run]) -> None:
    """Seeds of one configuration are averaged; say so when they differ in more than the seed."""
    for config, seeds in by_config(runs).items():
        keys = set().union(*(run.args for run in seeds)) - NOT_HYPERPARAMETERS
        differing = sorted(key for key in keys if len({json.dumps(run.args.get(key)) for run in seeds}) > 1)
        if differing:
            print(
                f"note: the runs of {config} differ in {', '.join(differing)}; "
                "they are still averaged as seeds"
            )


# ---------------------------------------------------------------------------------------------
# Figures


@dataclass(frozen=True)
class Series:
    column: str
    label: str
    color: str = "black"  # per-run figures; comparisons colour by configuration instead
    linestyle: str = "-"


@dataclass(frozen=True)
class Panel:
    title: str
    ylabel: str
    series: tuple[Series, ...]
    xlabel: str = "step"
    log_y: bool = False
    ylim: tuple[float, float] | None = None
    guides: tuple[float, ...] = ()  # horizontal reference lines
    empty_note: str = "nothing logged"
    source: str = "log"  # the file its series come from: "log" or "quality"


G_LOSS = Series("loss_g", "G loss", "tab:blue")
D_LOSS = Series("loss_d", "D loss", "tab:red")
D_REAL = Series("d_x", "D(x), real", "tab:green")
D_FAKE = Series("d_g_z", "D(G(z)), generated", "tab:purple")
G_GRAD = Series("grad_norm_g", "G", "tab:blue")
D_GRAD = Series("grad_norm_d", "D", "tab:red", "--")
G_AGAR = Series("agar_g", "G", "tab:blue")
D_AGAR = Series("agar_d", "D", "tab:red", "--")
G_CONF = Series("conf_g", "G", "tab:blue")
D_CONF = Series("conf_d", "D", "tab:red", "--")

LOSS_PANEL = Panel("Losses", "BCE loss", (G_LOSS, D_LOSS))
SCORE_PANEL = Panel(
    "Discriminator outputs", "D output (probability)", (D_REAL, D_FAKE), ylim=(0, 1), guides=(0.5,)
)
GRAD_PANEL = Panel("Gradient norms", "global L2 norm of the gradient", (G_GRAD, D_GRAD), log_y=True)
AGAR_PANEL = Panel("AGAR", "AGAR", (G_AGAR, D_AGAR))
CONF_PANEL = Panel("Confidence", "confidence", (G_CONF, D_CONF))
NOISE_PANEL = Panel(
    "Gradient noise ratio",
    "1 − ‖EMA(g)‖² / EMA(‖g‖²)",
    (Series("grad_noise_g", "G", "tab:blue"), Series("grad_noise_d", "D", "tab:red", "--")),
    ylim=(0, 1.02),
)


def measure_panel(title: str, ylabel: str, column: str, color: str, **options) -> Panel:
    """A sample-quality measure of G (solid) and of its moving average (dashed, --g-ema)."""
    series = (Series(column, "G", color), Series(f"{column}_ema", "G moving average", color, "--"))
    return Panel(title, ylabel, series, source="quality", **options)


# The DCGAN's sample-quality measures (train_dcgan.SAMPLE_COLUMNS), over steps.
DCGAN_MEASURE_PANELS = (
    measure_panel("KID", "KID (feature space of config.json)", "kid", "tab:red"),
    measure_panel("FID", "FID (feature space of config.json)", "fid", "tab:purple", log_y=True),
    measure_panel(
        "Precision", "share of samples on the real manifold", "precision", "tab:green", ylim=(0, 1.02)
    ),
    measure_panel("Recall", "share of real data the samples cover", "recall", "tab:blue", ylim=(0, 1.02)),
    measure_panel(
        "Coverage", "share of real neighbourhoods with a sample", "coverage", "tab:cyan", ylim=(0, 1.02)
    ),
    measure_panel("Modes covered", "classes (of 36 on shapes)", "modes_covered", "tab:orange"),
)
TOY_MEASURE_PANELS = tuple(
    Panel(title, "share", (Series(column, title, color),), "epoch", ylim=(0, 1.02), source="quality")
    for title, column, color in (("Precision", "precision", "tab:green"), ("Recall", "recall", "tab:blue"))
)

QUALITY_PANELS = {
    "toy2d": (
        Panel(
            "Samples on the data support",
            "share",
            (Series("on_support", "on support", "tab:green"),),
            "epoch",
            ylim=(0, 1.02),
            source="quality",
        ),
        Panel(
            "Mode shares",
            "share of samples",
            (
                Series("left_share", "left mode", "tab:blue"),
                Series("right_share", "right mode", "tab:orange", "--"),
            ),
            "epoch",
            ylim=(0, 1.02),
            guides=(0.5,),
            source="quality",
        ),
        *(
            Panel(
                title,
                name.upper(),
                (Series(name, name.upper(), color),),
                "epoch",
                log_y=True,
                source="quality",
            )
            for title, name, color in (
                ("MMD to real data", "mmd", "tab:red"),
                ("Sliced Wasserstein distance", "swd", "tab:purple"),
            )
        ),
        *TOY_MEASURE_PANELS,
    ),
    "dcgan": (
        Panel(
            "Sample diversity",
            "diversity ratio (generated / real)",
            (Series("diversity_ratio", "diversity ratio", "tab:green"),),
            guides=(1.0,),
            source="quality",
        ),
        Panel(
            "Steps D won outright",
            "share of steps",
            (Series("d_dominated_share", "D-dominated share", "tab:red"),),
            ylim=(0, 1.02),
            source="quality",
        ),
        *DCGAN_MEASURE_PANELS,
    ),
}


def plot_run(run: Run, out_dir: Path, smooth: float) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    tau = smoothing_time([run.steps], smooth)

    def draw(ax, panel):
        return draw_run_panel(ax, run, panel, tau)

    title = f"{run.name}: {run.config}, seed {run.seed}"
    draw_figure(out_dir / "loss_plot.png", f"Losses, {title}", [LOSS_PANEL], draw)
    draw_figure(out_dir / "score_plot.png", f"Discriminator scores, {title}", [SCORE_PANEL], draw)
    draw_figure(out_dir / "grad_norm_plot.png", f"Gradient norms, {title}", [GRAD_PANEL, NOISE_PANEL], draw)
    adam_note = f"no CASMO network in this run (G: {run.args.get('g_opt')}, D: {run.args.get('d_opt')})"
    optimizer_panels = [replace(panel, empty_note=adam_note) for panel in (AGAR_PANEL, CONF_PANEL)]
    draw_figure(out_dir / "optimizer_plot.png", f"CASMO statistics, {title}", optimizer_panels, draw)
    if run.quality is not None and run.kind in QUALITY_PANELS:
        draw_figure(out_dir / "quality_plot.png", f"Sample quality, {title}", QUALITY_PANELS[run.kind], draw)
    if run.real is not None and run.generated is not None:
        plot_scatter(run, out_dir / "scatter.png", title)


def draw_figure(path: Path, title: str, panels: list[Panel], draw) -> None:
    """Panels side by side (two per row), one legend under them; `draw(ax, panel)` draws the
    data of a panel and returns whether there was any."""
    ncols = min(len(panels), 2)
    nrows = math.ceil(len(panels) / ncols)
    figsize = (7, 4) if len(panels) == 1 else (10, 4.2) if nrows == 1 else (10, 3.7 * nrows)
    fig, axes = plt.subplots(nrows, ncols, figsize=figsize, squeeze=False, layout="constrained")
    for ax, panel in zip(axes.flat, panels):
        decorate(ax, panel if len(panels) > 1 else replace(panel, title=title), drew=draw(ax, panel))
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    handles = unique_legend_entries(axes.flat)
    if handles:
        # At most four entries a row: six configuration and line-style entries overflow 10 inches.
        fig.legend(*zip(*handles), loc="outside lower center", ncol=min(len(handles), 4), frameon=False)
    if len(panels) > 1:
        fig.suptitle(title)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def decorate(ax, panel: Panel, drew: bool) -> None:
    ax.set_title(panel.title)
    ax.set_xlabel(panel.xlabel)
    ax.set_ylabel(panel.ylabel)
    if not drew:  # say why the panel is empty instead of showing bare unit axes
        ax.text(0.5, 0.5, panel.empty_note, ha="center", va="center", wrap=True, transform=ax.transAxes)
        ax.set_xticks([])
        ax.set_yticks([])
        return
    for level in panel.guides:
        ax.axhline(level, color="0.5", linewidth=0.8, linestyle=":")
    if panel.log_y:
        ax.set_yscale("log")
        label_log_axis(ax)
    if panel.ylim:
        ax.set_ylim(*panel.ylim)
    if panel.xlabel == "epoch":
        ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))


def label_log_axis(ax) -> None:
    """Plain numbers (0.2, 1, 10) instead of powers of ten, and over less than two decades, where
    few powers of ten are in view, also 2x and 5x labels."""
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}"))
    low, high = ax.get_ylim()
    if high / low < 100:
        ax.yaxis.set_minor_formatter(ticker.FuncFormatter(two_or_five))


def two_or_five(value: float, _) -> str:
    mantissa = round(value / 10 ** math.floor(math.log10(value)))
    return f"{value:g}" if mantissa in (2, 5) else ""


def unique_legend_entries(axes) -> list[tuple]:
    entries = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    return [(handle, label) for label, handle in entries.items()]


def draw_run_panel(ax, run: Run, panel: Panel, tau: float) -> bool:
    """Each series raw (faint) and smoothed (bold); quality panels (per evaluation) with markers."""
    table = run.log if panel.source == "log" else run.quality
    x = table[panel.xlabel]
    drew = False
    for series in panel.series:
        values = table[series.column]
        finite = np.isfinite(values) & (values > 0 if panel.log_y else True)
        if not finite.any():
            continue
        drew = True
        if panel.source == "quality":
            style = dict(color=series.color, linestyle=series.linestyle, label=series.label, markersize=3)
            ax.plot(x[finite], values[finite], marker="o", **style)
            continue
        ax.plot(x[finite], values[finite], color=series.color, alpha=0.25, linewidth=0.7)
        ax.plot(
            x, smoothed(x, values, tau, panel.log_y), color=series.color, linewidth=1.8, label=series.label
        )
    return drew


def plot_scatter(run: Run, path: Path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(6, 5), layout="constrained")
    rng = np.random.default_rng(0)  # a fixed subsample: the figure does not change between calls
    for points, label, color, size in (
        (run.real, "real", "0.6", 4),
        (run.generated, "generated", "tab:blue", 6),
    ):
        shown = points[rng.permutation(len(points))[:SCATTER_MAX_POINTS]]
        ax.scatter(
            shown[:, 0],
            shown[:, 1],
            s=size,
            color=color,
            alpha=0.5,
            label=f"{label} ({len(points)})",
            linewidths=0,
        )
    ax.set_aspect("equal", adjustable="datalim")
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    ax.set_title(f"Final samples, {title}")
    ax.legend(markerscale=3, loc="best")
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def smoothing_time(step_arrays: list[np.ndarray], fraction: float) -> float:
    """The moving average's time constant in steps: `fraction` of the longest run, but at least a
    few logging intervals, so a short run logged coarsely is still smoothed."""
    span = max(steps[-1] - steps[0] for steps in step_arrays)
    interval = max(float(np.median(np.diff(steps))) if len(steps) > 1 else 1.0 for steps in step_arrays)
    return max(fraction * span, MIN_SMOOTHING_INTERVALS * interval, 1.0)


def smoothed(steps: np.ndarray, values: np.ndarray, tau: float, log_scale: bool = False) -> np.ndarray:
    """An exponential moving average whose time constant is in steps, not rows, so runs logged at
    different intervals are smoothed alike. Log-scale data is averaged in log space."""
    if log_scale:
        return np.exp(moving_average(steps, np.log(np.where(values > 0, values, np.nan)), tau))
    return moving_average(steps, values, tau)


def moving_average(steps: np.ndarray, values: np.ndarray, tau: float) -> np.ndarray:
    averaged = np.full(len(values), np.nan)
    average, last_step = math.nan, 0.0
    for i, (step, value) in enumerate(zip(steps, values)):
        if not math.isfinite(value):  # a row that did not log this column keeps the previous average
            averaged[i] = average
            continue
        if math.isnan(average):
            average = value
        else:
            keep = math.exp(-(step - last_step) / tau)
            average = keep * average + (1 - keep) * value
        last_step = step
        averaged[i] = average
    return averaged


def plot_comparisons(runs: list[Run], out: Path, prefix: str, smooth: float) -> list[Path]:
    """The comparison figures of one set of runs (one script, one dataset)."""
    tau = smoothing_time([run.steps for run in runs], smooth)
    groups = by_config(runs)
    what = set_label(runs[0])

    def draw(ax, panel):
        return draw_compare_panel(ax, groups, panel, tau)

    figures = {
        "compare_loss.png": (
            "Losses",
            [
                Panel("Generator loss", "BCE loss", (G_LOSS,)),
                Panel("Discriminator loss", "BCE loss", (D_LOSS,)),
            ],
        ),
        "compare_scores.png": (
            "Discriminator outputs",
            [
                replace(SCORE_PANEL, title="D(x) on real data", series=(D_REAL,)),
                replace(SCORE_PANEL, title="D(G(z)) on generated data", series=(D_FAKE,)),
            ],
        ),
        "compare_grad_norm.png": (
            "Gradient norms",
            [
                replace(GRAD_PANEL, title="Generator", series=(G_GRAD,)),
                replace(GRAD_PANEL, title="Discriminator", series=(replace(D_GRAD, linestyle="-"),)),
            ],
        ),
        "comparison_2x2.png": (
            "Stability of GAN training by optimizer configuration",
            [
                Panel("Generator loss", "BCE loss", (G_LOSS,)),
                Panel("Discriminator loss", "BCE loss", (D_LOSS,)),
                GRAD_PANEL,
                replace(AGAR_PANEL, empty_note="no CASMO network in these runs"),
            ],
        ),
    }
    if runs[0].kind in QUALITY_PANELS and any(run.quality is not None for run in runs):
        figures["compare_quality.png"] = ("Sample quality", list(QUALITY_PANELS[runs[0].kind]))
    written = []
    for filename, (title, panels) in figures.items():
        path = out / f"{prefix}{filename}"
        draw_figure(path, f"{title}: {what}, mean ± std over seeds", panels, draw)
        written.append(path)
    if runs[0].kind == "dcgan" and plot_samples_side_by_side(
        groups, out / f"{prefix}compare_samples.png", what
    ):
        written.append(out / f"{prefix}compare_samples.png")
    return written


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


def plot_samples_side_by_side(groups: dict[str, list[Run]], path: Path, what: str) -> bool:
    """compare_samples.png: per configuration (its first seed), the sample grids at a few steps
    every configuration has, above the configurations' KID curves. False when there are no
    common steps or no KID to draw."""
    firsts = {config: seeds[0] for config, seeds in groups.items()}
    grids = {config: step_grids(run.path) for config, run in firsts.items()}
    common = sorted(set.intersection(*(set(by_step) for by_step in grids.values())))
    kid_panel = DCGAN_MEASURE_PANELS[0]
    if not common or not any(run.quality is not None for seeds in groups.values() for run in seeds):
        return False
    steps = side_by_side_steps(common)
    width = max(2.4 * len(groups), 7)
    fig = plt.figure(figsize=(width, 2.4 * len(steps) + 4), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=(2.4 * len(steps), 4))
    axes = top.subplots(len(steps), len(groups), squeeze=False)
    for column, (config, run) in enumerate(firsts.items()):
        final_kid = np.nanmean(
            [seed.quality["kid"][-1] for seed in groups[config] if seed.quality is not None]
        )
        seeds = len(groups[config])
        mean_of = f"mean of {seeds} seeds" if seeds > 1 else "1 seed"
        title = f"{config}, seed {run.seed}\nfinal KID ({mean_of}): {number(final_kid)}"
        axes[0][column].set_title(title, fontsize=9)
        for row, step in enumerate(steps):
            ax = axes[row][column]
            ax.imshow(plt.imread(grids[config][step]))
            ax.set_xticks([])
            ax.set_yticks([])
            if column == 0:
                ax.set_ylabel(f"step {step}")
    ax = bottom.subplots()
    decorate(ax, kid_panel, drew=draw_compare_panel(ax, groups, kid_panel, tau=0.0))
    ax.legend(*zip(*unique_legend_entries([ax])), fontsize=8, ncol=2)
    fig.suptitle(f"Samples of G and its KID (mean ± std over seeds, dashed: EMA G): {what}")
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return True


def draw_compare_panel(ax, groups: dict[str, list[Run]], panel: Panel, tau: float) -> bool:
    """Every configuration in its colour; with two series in a panel (G, D) the line style tells
    them apart, and a grey sample line per style goes into the legend."""
    drew = False
    for config, seeds in groups.items():
        for series in panel.series:
            curves = [series_curve(run, panel, series, tau) for run in seeds]
            label = f"{config} ({len(seeds)} seed{'s' * (len(seeds) > 1)})"
            drew |= draw_mean_with_band(
                ax, curves, config_color(config), series.linestyle, label, panel.log_y
            )
    if drew and len(panel.series) > 1:
        for series in panel.series:
            ax.plot(
                [],
                [],
                color="0.3",
                linestyle=series.linestyle,
                label=f"{series.label}: {linestyle_name(series.linestyle)}",
            )
    return drew


def series_curve(run: Run, panel: Panel, series: Series, tau: float) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of a series in one run: a log column smoothed, a quality column as evaluated."""
    if panel.source == "quality":
        table = run.quality if run.quality is not None else Columns({}, 0)
        return table[panel.xlabel], table[series.column]
    return run.steps, smoothed(run.steps, run.log[series.column], tau, panel.log_y)


def linestyle_name(linestyle: str) -> str:
    return {"-": "solid", "--": "dashed", ":": "dotted"}.get(linestyle, linestyle)


def draw_mean_with_band(
    ax, curves: list[tuple[np.ndarray, np.ndarray]], color: str, linestyle: str, label: str, log_scale: bool
) -> bool:
    """Seeds of one configuration as their mean with a ±std band. Seeds logged at different
    intervals are interpolated onto a common grid over the steps all of them reached (log-scale
    data in log space); a single seed is drawn as it is. Returns False when there is no data."""
    curves = [(steps[np.isfinite(values)], values[np.isfinite(values)]) for steps, values in curves]
    curves = [(steps, np.log(values) if log_scale else values) for steps, values in curves if len(steps)]
    if not curves:
        return False
    if len(curves) == 1:
        grid, mean, std = curves[0][0], curves[0][1], None
    else:
        start, stop = max(steps[0] for steps, _ in curves), min(steps[-1] for steps, _ in curves)
        grid = np.linspace(start, stop, GRID_POINTS) if stop > start else np.array([start])
        stacked = np.array([np.interp(grid, steps, values) for steps, values in curves])
        mean, std = stacked.mean(axis=0), stacked.std(axis=0, ddof=1)
    back = np.exp if log_scale else np.asarray
    ax.plot(grid, back(mean), color=color, linestyle=linestyle, linewidth=1.8, label=label)
    if std is not None:
        ax.fill_between(grid, back(mean - std), back(mean + std), color=color, alpha=0.18, linewidth=0)
    return True


# ---------------------------------------------------------------------------------------------
# Tables

LOSS_STATISTICS = ("initial", "final", "min", "max", "mean", "std")
VERDICTS = ("d_collapsed", "d_stuck_high", "stabilised", "g_trend", "wild_oscillation", "ever_covered")
DCGAN_MEASURES = ("kid", "fid", "precision", "recall", "density", "coverage", "modes_covered", "mode_kl")
QUALITY_COLUMNS = {
    "toy2d": ("on_support", "left_share", "mmd", "precision", "recall", "density", "coverage"),
    "dcgan": ("diversity_ratio", *DCGAN_MEASURES, *(f"{name}_ema" for name in DCGAN_MEASURES)),
}


def run_summary(run: Run) -> dict[str, object]:
    d_loss, g_loss = run.log["loss_d"], run.log["loss_g"]
    summary: dict[str, object] = {"rows": run.log.n_rows, "last_step": float(np.nanmax(run.steps))}
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


def dominated_share(run: Run) -> float:
    """The share of logged steps where D won outright (gan_common.d_dominated)."""
    d_x, d_g_z = run.log["d_x"], run.log["d_g_z"]
    logged = np.isfinite(d_x) & np.isfinite(d_g_z)
    if not logged.any():
        return math.nan
    real_label = gan_common.real_label(run.args.get("label_smooth", 0.9), run.args.get("real_label_range"))
    return float(np.mean(gan_common.d_dominated(d_x[logged], d_g_z[logged], real_label)))


def final_quality(run: Run) -> dict[str, object]:
    """Per quality column: the last evaluation, and for the toy also the mean of the last few
    and the first evaluation at which both semicircles were covered (coverage_ok)."""
    figures = {}
    for column in QUALITY_COLUMNS.get(run.kind, ()):
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


def summary_rows(sets: dict[str, list[Run]]) -> list[dict[str, object]]:
    """Per set: one row per configuration (mean and std over its seeds), then one per run."""
    rows = []
    for runs in sets.values():
        what = set_label(runs[0])
        per_run = [(run, run_summary(run)) for run in runs]
        for config, seeds in by_config(runs).items():
            summaries = [summary for run, summary in per_run if run.config == config]
            seeds_text = ",".join(str(run.seed) for run in seeds)
            rows.append(
                {
                    "set": what,
                    "scope": "configuration",
                    "name": config,
                    "configuration": config,
                    "seeds": seeds_text,
                    **aggregate(summaries),
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


def aggregate(summaries: list[dict[str, object]]) -> dict[str, object]:
    """Numbers: mean, with the sample std over seeds in "<name>_std" (NaN for one seed).
    Verdicts: how many seeds said yes ("2/3"); the G trend: the common word or the counts."""
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
        elif key in VERDICTS:
            combined[key] = f"{values.count('yes')}/{len(values)}"
        else:
            numbers = np.array(values, dtype=float)
            finite = numbers[np.isfinite(numbers)]
            combined[key] = float(finite.mean()) if len(finite) else math.nan
            combined[f"{key}_std"] = float(finite.std(ddof=1)) if len(finite) > 1 else math.nan
            combined[f"{key}_ci95"] = t_interval_half_width(finite)
    return combined


def t_interval_half_width(values: np.ndarray) -> float:
    """Half the width of the 95% t-interval of the mean over seeds (NaN for one seed)."""
    if len(values) < 2:
        return math.nan
    return float(scipy.stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values)))


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


def write_summary_md(rows: list[dict[str, object]], sets: dict[str, list[Run]], path: Path) -> None:
    lines = []
    for runs in sets.values():
        what = set_label(runs[0])
        set_rows = [row for row in rows if row["set"] == what]
        lines += [f"### {what}: loss statistics", ""]
        lines += markdown_table(set_rows, MD_LOSS_COLUMNS)
        lines += ["", LOSS_CAPTION, "", f"### {what}: convergence checks, quality, speed", ""]
        lines += markdown_table(
            set_rows, MD_CHECK_COLUMNS + MD_QUALITY_COLUMNS.get(runs[0].kind, []) + MD_SPEED_COLUMNS
        )
        lines += ["", CHECKS_CAPTION, ""]
        measures = [
            column for column in MD_MEASURE_COLUMNS.get(runs[0].kind, []) if has_values(set_rows, column[1])
        ]
        if measures:
            lines += [f"### {what}: sample quality at the last evaluation", ""]
            lines += markdown_table(set_rows, measures, cell=interval_cell) + ["", MEASURES_CAPTION, ""]
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
        return str(value)
    std = row.get(f"{key}_std", math.nan)
    return number(value) + (f" ± {number(std)}" if math.isfinite(std) else "")


def interval_cell(row: dict[str, object], key: str) -> str:
    """The mean and its 95% t-interval over seeds, "0.412 [0.371, 0.453]"."""
    value, half = row.get(key, math.nan), row.get(f"{key}_ci95", math.nan)
    if not isinstance(value, float) or not math.isfinite(half):
        return markdown_cell(row, key)
    return f"{number(value)} [{number(value - half)}, {number(value + half)}]"


def number(value: float) -> str:
    """Three significant digits, trailing zeros kept so a column lines up (1.30, 0.760, 120)."""
    if math.isnan(value):
        return "–"
    return f"{value:.0f}" if 100 <= abs(value) < 1e5 else f"{value:#.3g}"


LOSS_CAPTION = (
    f"Losses as logged (one value per logged step). *initial* / *final*: mean of the first / last "
    f"{EDGE_FRACTION:.0%} of logged steps; *min*, *max*, *mean*, *std*: over all logged steps. "
    "Bold rows: a configuration, mean ± sample std over its seeds; the other rows are single runs."
)
MEASURES_CAPTION = (
    "The last evaluation in quality.csv. Bold rows: the mean over seeds and, in brackets, its 95% "
    "t-interval (scipy.stats.t, n − 1 degrees of freedom); the other rows are single runs. DCGAN: KID "
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


if __name__ == "__main__":
    sys.exit(main())
