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
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import matplotlib.ticker as ticker
import numpy as np
from tqdm import tqdm

import gan_common
import run_summary
from run_summary import PROGRESS_BAR_FROM, Columns, LoggedRun, NotARun, by_config, number, set_label


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
    parser.add_argument(
        "--compare-with",
        nargs="+",
        default=[],
        type=Path,
        metavar="RUN_DIR",
        help="runs to compare with and tabulate, without their per-run figures (those of a main "
        "set a control is compared with, drawn where that set is drawn)",
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
    parser.add_argument(
        "--caption",
        metavar="TEXT",
        help="a line added to compare_samples.png's title and to the head of summary.md "
        "(e.g. that each configuration is one seed)",
    )
    return parser.parse_args(argv)


# One colour per configuration, the same in every figure.
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
SPARE_COLORS = ("tab:pink", "tab:cyan", "tab:red", "gold")  # none of CONFIG_COLORS'

MIN_SMOOTHING_INTERVALS = 3  # the moving average spans at least this many logging intervals
GRID_POINTS = 500  # common step grid on which seeds logged at different intervals are averaged
SCATTER_MAX_POINTS = 4000
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
    runs, skipped = run_summary.read_runs([*args.run_dirs, *args.compare_with], args.group_by)
    for path, reason in skipped:
        print(f"skipped {path}: {reason}")
    if not runs:
        raise NotARun(f"none of the {len(runs) + len(skipped)} folder(s) is a readable run folder")
    out = args.out.resolve()
    if not args.into_run:
        refuse_outputs_inside_runs(out, runs)

    matplotlib.use("Agg")  # files only: the machines the runs come from have no display
    plt.rcParams.update(STYLE)
    out.mkdir(parents=True, exist_ok=True)
    own = {path.resolve() for path in run_summary.expand_run_dirs(args.run_dirs)}
    drawn = [run for run in runs if run.path.resolve() in own]
    for run in tqdm(drawn, desc="per-run figures", disable=len(drawn) < PROGRESS_BAR_FROM):
        plot_run(run, out / run.name, args.smooth)

    sets = run_summary.comparison_sets(runs)
    compare_files = []
    for prefix, set_runs in sets.items():
        run_summary.warn_mixed_hyperparameters(set_runs)
        compare_files += plot_comparisons(set_runs, out, prefix, args.smooth, args.caption)
    rows = run_summary.summary_rows(sets)
    run_summary.write_summary_csv(rows, out / "summary.csv")
    run_summary.write_summary_md(rows, sets, out / "summary.md", args.caption)

    print(f"per-run figures: {out}/<run>/ for {len(drawn)} run(s): {', '.join(run.name for run in drawn)}")
    print(f"comparison figures: {', '.join(str(path) for path in compare_files)}")
    print(f"tables: {out / 'summary.md'}, {out / 'summary.csv'}")
    return rows


# ---------------------------------------------------------------------------------------------
# LoggedRun folders


def refuse_outputs_inside_runs(out: Path, runs: list[LoggedRun]) -> None:
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


def config_color(config: str) -> str:
    if config in CONFIG_COLORS:
        return CONFIG_COLORS[config]
    return SPARE_COLORS[sum(map(ord, config)) % len(SPARE_COLORS)]


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


# The DCGAN's sample-quality measures (run_log.SAMPLE_MEASURES), over steps.
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


def plot_run(run: LoggedRun, out_dir: Path, smooth: float) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    tau = smoothing_time([run.steps], smooth)

    def draw(ax, panel):
        return draw_run_panel(ax, run, panel, tau)

    title = f"{run.name}: {run.config}, seed {run.seed}"
    if run.diverged:
        title += f", diverged at step {run.status.get('step')}"
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


def draw_run_panel(ax, run: LoggedRun, panel: Panel, tau: float) -> bool:
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


def plot_scatter(run: LoggedRun, path: Path, title: str) -> None:
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


def plot_comparisons(
    runs: list[LoggedRun], out: Path, prefix: str, smooth: float, caption: str | None = None
) -> list[Path]:
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
        groups, out / f"{prefix}compare_samples.png", what, caption
    ):
        written.append(out / f"{prefix}compare_samples.png")
    return written


def plot_samples_side_by_side(
    groups: dict[str, list[LoggedRun]], path: Path, what: str, caption: str | None = None
) -> bool:
    """compare_samples.png: per configuration (its first seed), the sample grids at a few steps
    every configuration has (of the runs that did not diverge; a diverged run's later cells
    say so), above the configurations' KID curves. False when there are no such steps or no
    KID to draw."""
    firsts = {config: seeds[0] for config, seeds in groups.items()}
    grids = {config: run_summary.step_grids(run.path) for config, run in firsts.items()}
    whole = [set(grids[config]) for config, run in firsts.items() if not run.diverged]
    common = sorted(set.intersection(*whole) if whole else set.union(*map(set, grids.values())))
    kid_panel = DCGAN_MEASURE_PANELS[0]
    if not common or not any(run.quality is not None for seeds in groups.values() for run in seeds):
        return False
    steps = run_summary.side_by_side_steps(common)
    width = max(2.4 * len(groups), 7)
    fig = plt.figure(figsize=(width, 2.4 * len(steps) + 4), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=(2.4 * len(steps), 4))
    axes = top.subplots(len(steps), len(groups), squeeze=False)
    for column, (config, run) in enumerate(firsts.items()):
        axes[0][column].set_title(f"{config}, seed {run.seed}\n{final_kid_text(groups[config])}", fontsize=9)
        for row, step in enumerate(steps):
            ax = axes[row][column]
            if step in grids[config]:
                ax.imshow(plt.imread(grids[config][step]))
            else:
                stopped = f"diverged at step {run.status.get('step')}" if run.diverged else "no sample"
                ax.text(0.5, 0.5, stopped, ha="center", va="center", transform=ax.transAxes)
            ax.set_xticks([])
            ax.set_yticks([])
            if column == 0:
                ax.set_ylabel(f"step {step}")
    ax = bottom.subplots()
    decorate(ax, kid_panel, drew=draw_compare_panel(ax, groups, kid_panel, tau=0.0))
    ax.legend(*zip(*unique_legend_entries([ax])), fontsize=8, ncol=2)
    with_ema = any(
        run.quality is not None and np.isfinite(run.quality["kid_ema"]).any()
        for seeds in groups.values()
        for run in seeds
    )
    title = f"Samples of G and its KID (mean ± std over seeds{', dashed: EMA G' if with_ema else ''}): {what}"
    fig.suptitle(title + (f"\n{caption}" if caption else ""))
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return True


def final_kid_text(seeds: list[LoggedRun]) -> str:
    """The configuration's KID at the last evaluation, the mean over its seeds that did not
    diverge, naming the seeds without a value and counting the diverged ones."""
    kept = [run for run in seeds if not run.diverged]
    last = {
        run.seed: run.quality["kid"][-1] if run.quality is not None and run.quality.n_rows else math.nan
        for run in kept
    }
    finite = [value for value in last.values() if math.isfinite(value)]
    notes = [f"seed {seed} NaN" for seed, value in last.items() if not math.isfinite(value)]
    notes += [f"{len(seeds) - len(kept)} diverged"] if len(kept) < len(seeds) else []
    mean_of = f"mean of {len(finite)} seeds" if len(finite) > 1 else f"{len(finite)} seed"
    text = f"final KID ({mean_of}): {number(float(np.mean(finite)) if finite else math.nan)}"
    return text + (f"\n({'; '.join(notes)})" if notes else "")


def draw_compare_panel(ax, groups: dict[str, list[LoggedRun]], panel: Panel, tau: float) -> bool:
    """Every configuration in its colour: the mean ± std of its seeds that did not diverge, and
    each diverged seed as a thin line ending in × where it stopped. With two series in a panel
    (G, D) the line style tells them apart, and a grey sample line per style goes into the legend."""
    any_diverged = False
    drawn = set()  # the series with data in some configuration
    for config, seeds in groups.items():
        kept = [run for run in seeds if not run.diverged]
        diverged = [run for run in seeds if run.diverged]
        label = f"{config} ({len(kept)} seed{'s' * (len(kept) != 1)}"
        label += f", {len(diverged)} diverged)" if diverged else ")"
        for series in panel.series:
            curves = [series_curve(run, panel, series, tau) for run in kept]
            style = (config_color(config), series.linestyle)
            labelled = draw_mean_with_band(ax, curves, *style, label, panel.log_y)
            for run in diverged:  # the label goes on the first line drawn, once
                curve = series_curve(run, panel, series, tau)
                ended = draw_diverged_run(ax, curve, *style, None if labelled else label, panel.log_y)
                labelled |= ended
                any_diverged |= ended
            if labelled:
                drawn.add(series)
    if any_diverged:
        ax.plot([], [], color="0.3", marker="x", linestyle="none", label="diverged run: ends at ×")
    if len(drawn) > 1:
        for series in (series for series in panel.series if series in drawn):
            ax.plot(
                [],
                [],
                color="0.3",
                linestyle=series.linestyle,
                label=f"{series.label}: {linestyle_name(series.linestyle)}",
            )
    return bool(drawn)


def series_curve(run: LoggedRun, panel: Panel, series: Series, tau: float) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of a series in one run: a log column smoothed, a quality column as evaluated."""
    if panel.source == "quality":
        table = run.quality if run.quality is not None else Columns({}, 0)
        return table[panel.xlabel], table[series.column]
    return run.steps, smoothed(run.steps, run.log[series.column], tau, panel.log_y)


def draw_diverged_run(
    ax, curve: tuple[np.ndarray, np.ndarray], color: str, linestyle: str, label: str | None, log_scale: bool
) -> bool:
    """One diverged seed's curve as it was logged, thin, with × at its last finite value."""
    steps, values = curve
    shown = np.isfinite(values) & (values > 0 if log_scale else True)
    if not shown.any():
        return False
    steps, values = steps[shown], values[shown]
    ax.plot(steps, values, color=color, linestyle=linestyle, linewidth=0.9, label=label)
    ax.plot(steps[-1:], values[-1:], color=color, marker="x", markersize=8, linestyle="none")
    return True


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


if __name__ == "__main__":
    sys.exit(main())
