"""What the grid writes from the runs that have a result: per set plot_logs.py's figures
(redrawn only where a set's runs changed) and summary rows, results.md with its captions, the
protocol's endpoints and paired comparisons and the machine record, and each run's published
copy (logs, configuration and grids, no checkpoint) under --publish."""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

import gan_common
import paired_analysis
import run_log
import run_summary
from benchmark_plan import FINISHED, HERE, PARTS, Job, ema_setting, flat, locations, state, stress_options
from run_summary import CONTROL_SUFFIX

ONE_SEED_CAPTION = "one seed: an illustration, not evidence (docs/benchmark_results.md)"


def ema_or_raw_kid(quality: run_summary.Columns) -> np.ndarray:
    """KID of EMA G where the run kept one, else of G."""
    return quality["kid_ema"] if np.isfinite(quality["kid_ema"]).any() else quality["kid"]


def seeds(values: list[int]) -> str:
    if len(values) == 1:
        return f"seed {values[0]}"
    consecutive = values == list(range(values[0], values[-1] + 1))
    return f"seeds {values[0]}-{values[-1]}" if consecutive else "seeds " + ", ".join(map(str, values))


CONTROL_CAPTION = (
    "The control: Adam on both networks, with the learning rate of each network that the CASMO "
    "configuration drives with CASMO multiplied by the mean confidence CASMO logged for it "
    "(control.json), same seeds; shown with the main set's runs."
)


def set_caption(args: argparse.Namespace, name: str, jobs: list[Job]) -> str:
    if name.startswith("toy2d"):
        what = f"Semicircle toy, {args.toy_epochs} epochs"
    else:
        budget = f"{args.dcgan_steps} steps" if args.dcgan_steps else f"{args.dcgan_epochs} epochs"
        what = (
            f"DCGAN on {args.dataset}, subset {args.subset}, batch 16, {budget}, --amp {args.amp}"
            f"{', channels_last' if args.channels_last else ''}, sample quality of {args.eval_samples} "
            f"images every {args.eval_every} steps, {ema_setting(args)[1]}"
        )
    if "-stress" in name:
        what += f", at the stress setting `{shlex.join(stress_options(args))}`"
    what += f", {seeds(sorted({job.seed for job in jobs}))}"
    if name.endswith(CONTROL_SUFFIX):
        return f"{what}. {CONTROL_CAPTION}"
    if name.endswith("-robustness"):
        which = (
            "" if name.startswith("toy2d") else ", of the CASMO configuration with the lowest KID endpoint"
        )
        return f"Robustness sweep{which}: {what} (robustness 0.5: the main set's runs of the same seeds)."
    return f"{what}{', robustness 0.5' if name == 'toy2d' else ''}."


def one_seed(name: str, jobs: list[Job]) -> bool:
    """A DCGAN set of one seed (the demo's): an illustration, whose results say so."""
    return name.startswith("dcgan") and len({job.seed for job in jobs}) == 1


def one_seed_caveat(args: argparse.Namespace, name: str, jobs: list[Job]) -> list[str]:
    """Above a one-seed set's tables: the seed-to-seed spread of KID that the published grid
    (--grid-reference) measured at the set's last evaluated step."""
    qualities = [job.location / "quality.csv" for job in jobs if (job.location / "quality.csv").is_file()]
    step = int(
        max((np.max(run_summary.read_numeric_csv(path)["step"], initial=0) for path in qualities), default=0)
    )
    reference, spreads, missing = args.grid_reference / name, [], []
    for config in sorted({job.config for job in jobs}, key=run_summary.config_rank):
        values = []
        for path in sorted((HERE / reference).glob(f"{config}-s*/quality.csv")):
            quality = run_summary.read_numeric_csv(path)
            kid = ema_or_raw_kid(quality)[quality["step"] == step]
            values += list(kid[np.isfinite(kid)])
        if len(values) == 1:
            spreads.append(f"{config} {values[0]:.4g} (1 seed)")
        elif values:
            spread = f"{min(values):.4g}–{max(values):.4g} (mean {np.mean(values):.4g}, {len(values)} seeds)"
            spreads.append(f"{config} {spread}")
        else:
            missing.append(config)
    measured = f"the published grid in {reference} has no evaluation at step {step} to compare with"
    if spreads:
        measured = (
            f"at step {step}, the published grid in {reference} measured a KID (of EMA G, else of G) of "
            + "; ".join(spreads)
            + (f"; none at that step for {', '.join(missing)}" if missing else "")
        )
    return [
        f"One seed at one budget is an illustration, not evidence: {measured}. Whether CASMO helps "
        "is answered over seeds, with paired comparisons: docs/benchmark_results.md.",
        "",
    ]


# Columns of the results tables: (header, summary.csv column).
TOY_COLUMNS = [
    ("on support (final)", "on_support_final"),
    ("on support (last 3)", "on_support_last3"),
    ("left share (final)", "left_share_final"),
    ("MMD (final)", "mmd_final"),
    ("covered both", "ever_covered"),
    ("first epoch covering both", "first_coverage_epoch"),
    ("D loss (final)", "d_final"),
    ("G loss (final)", "g_final"),
    ("G loss std", "g_std"),
    ("D-dominated share", "d_dominated_share"),
    ("steps/s", "steps_per_sec_median"),
]
DCGAN_COLUMNS = [
    ("D loss (final)", "d_final"),
    ("G loss (final)", "g_final"),
    ("G loss std", "g_std"),
    ("D-dominated share", "d_dominated_share"),
    ("D collapsed", "d_collapsed"),
    ("stabilised", "stabilised"),
    ("wild oscillation", "wild_oscillation"),
    ("steps/s", "steps_per_sec_median"),
]
# With 95% intervals over seeds (run_summary.aggregate's).
DCGAN_QUALITY_COLUMNS = [
    (f"{title}{suffix_title}", f"{column}{suffix}_final")
    for suffix, suffix_title in (("", ""), ("_ema", ", EMA G"))
    for title, column in (
        ("KID", "kid"),
        ("FID", "fid"),
        ("precision", "precision"),
        ("recall", "recall"),
        ("modes", "modes_covered"),
    )
]


def write_results(
    args: argparse.Namespace, sets: dict[str, list[Job]], rows: dict[str, list[dict]], complete: list[str]
) -> Path:
    """results.md: per set the configuration rows of plot_logs.py's summary, then the protocol's
    endpoints and paired comparisons (paired_analysis.py), with the machine record;
    machine.json beside it."""
    record = {**gan_common.environment(), "speed_settings": args.speed_settings}
    lines = results_header(args, record, sets, complete)
    for name, jobs in sets.items():
        configurations = [row for row in rows[name] if row["scope"] == "configuration"]
        lines += [f"## {name}", "", set_caption(args, name, jobs), ""]
        lines += one_seed_caveat(args, name, jobs) if one_seed(name, jobs) else []
        if name.startswith("dcgan"):
            lines += run_summary.markdown_table(configurations, DCGAN_COLUMNS) + [""]
            lines += run_summary.markdown_table(
                configurations, DCGAN_QUALITY_COLUMNS, cell=run_summary.interval_cell
            )
        else:
            lines += run_summary.markdown_table(configurations, TOY_COLUMNS)
        lines += [""]
    compared = {
        name: folders
        for name, folders in locations(sets).items()
        if name.startswith("dcgan") and not name.endswith("-robustness")
    }
    if compared:
        lines += ["## Endpoints and paired comparisons (docs/benchmark_protocol.md)", ""]
        lines += [*paired_analysis.results_sections(compared), ""]
    lines += [
        "Definitions: plot_logs.py's summary.md in each plots folder. *final*: the last evaluation "
        "(quality) or the mean of the last 10% of logged steps (losses); *G loss std*: over all "
        "logged steps.",
        "",
    ]
    path = args.out / "results.md"
    path.write_text("\n".join(lines))
    (args.out / "machine.json").write_text(json.dumps(record, indent=2) + "\n")
    return path


def results_header(
    args: argparse.Namespace, record: dict, sets: dict[str, list[Job]], complete: list[str]
) -> list[str]:
    gpu = f", GPU {record['gpu']}" if record["gpu"] and args.device.startswith("cuda") else ""
    machines = Counter(run_machine(job.location) for job in flat(sets))
    missing = [part for part in PARTS if part not in complete]
    return [
        "# CASMO GAN-stability benchmark: results",
        "",
        f"The grid of docs/benchmark_protocol.md. Parts complete here: {', '.join(complete) or 'none'}; "
        f"not run, or not complete: {', '.join(missing) or 'none'}.",
        f"Written {record['date']} on {record['cpu']} ({record['cpu_cores']} cores){gpu}; Python "
        f"{record['python']}, torch {record['torch']}; command `{record['command']}`. The runs were "
        f"made on: {', '.join(f'{cpu} ({count})' for cpu, count in machines.items()) or 'none'}.",
        f"DCGAN speed settings: --amp {args.amp}, channels_last {args.channels_last} "
        f"({args.speed_settings['why']}).",
        "Losses and checks: mean ± sample std over seeds; sample quality: mean [95% interval over "
        "seeds: bootstrap percentile for precision, recall and modes, which have a range; t for the "
        "others] (plot_logs.py's summary.csv, configuration rows).",
        "",
    ]


def run_machine(run: Path) -> str:
    """The CPU a run was made on, from its config.json."""
    config = json.loads((run / "config.json").read_text()) if (run / "config.json").is_file() else {}
    return config.get("environment", {}).get("cpu", "unknown")


def report_sets(args: argparse.Namespace, sets: dict[str, list[Job]]) -> dict[str, list[dict]]:
    """plot_logs.py's figures and tables per set, into OUT/plots/<set>/, and the set's summary
    rows; a control set and a sweep are drawn with the runs they are compared against."""
    plots, rows, drawings = args.out / "plots", {}, {}
    for name, set_jobs in sets.items():
        folders, compared, group_by = [job.location for job in set_jobs], [], []
        base = sets.get(name.removesuffix(CONTROL_SUFFIX).removesuffix("-robustness"), [])
        if name.endswith(CONTROL_SUFFIX):
            compared = [job.location for job in base]
        elif name.endswith("-robustness"):
            swept, swept_seeds = {job.config for job in set_jobs}, {job.seed for job in set_jobs}
            compared = [job.location for job in base if job.config in swept and job.seed in swept_seeds]
            group_by = ["robustness"]
        runs, _ = run_summary.read_runs(folders + compared, group_by)
        rows[name] = run_summary.summary_rows(run_summary.comparison_sets(runs))
        # The base runs' own figures are drawn with their set, not again beside each control.
        command = [sys.executable, "plot_logs.py", *map(str, folders), "--out", str(plots / name)]
        command += ["--compare-with", *map(str, compared)] if compared else []
        command += ["--group-by", *group_by] if group_by else []
        command += ["--caption", ONE_SEED_CAPTION] if one_seed(name, set_jobs) else []
        drawings[name] = Drawing(command, plots / name, drawing_inputs(command, folders + compared))
    draw_sets(drawings, args.jobs if args.device == "cpu" else os.cpu_count() or 1)
    return rows


@dataclass
class Drawing:
    command: list[str]  # plot_logs.py's, for one set
    folder: Path  # where it draws
    inputs: dict  # what it draws from (drawing_inputs)


DRAWN_FILE = "drawn.json"  # in a set's plots folder: the inputs its figures were drawn from


def drawing_inputs(command: list[str], folders: list[Path]) -> dict:
    """What a set's figures depend on: the command, the scripts' code (plot_logs.py and what it
    imports, and more, to be safe), and every file of its runs by size and modification time."""
    files = {
        str(path): [path.stat().st_size, path.stat().st_mtime_ns]
        for folder in folders
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }
    return {"command": command[1:], "code": code_digest(), "files": files}


@functools.cache
def code_digest() -> str:
    """The SHA-256 of the scripts' sources, read once per process."""
    return hashlib.sha256(b"".join(path.read_bytes() for path in sorted(HERE.glob("*.py")))).hexdigest()


def draw_sets(drawings: dict[str, Drawing], jobs: int) -> None:
    """plot_logs.py for each set whose inputs changed since it was last drawn, `jobs` at a time
    with one thread each (drawing is single-threaded); prints each one's output whole, in the
    sets' order. A 100-run grid redraws only the sets a part changed."""
    todo = {}
    for name, drawing in drawings.items():
        stamp = drawing.folder / DRAWN_FILE
        if stamp.is_file() and json.loads(stamp.read_text()) == drawing.inputs:
            print(f"figures of {name}: its runs are as when drawn, in {drawing.folder}/")
        else:
            stamp.unlink(missing_ok=True)
            todo[name] = drawing
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}

    def draw(drawing: Drawing) -> subprocess.CompletedProcess:
        return subprocess.run(drawing.command, cwd=HERE, env=environment, capture_output=True, text=True)

    sys.stdout.flush()  # plot_logs.py's lines after this script's own
    with ThreadPoolExecutor(jobs) as pool:
        drawn = pool.map(draw, todo.values())
        for name, result in tqdm(zip(todo, drawn), total=len(todo), desc="figures", unit="set"):
            if result.stdout.strip():
                tqdm.write(result.stdout.rstrip("\n"))
            if result.stderr.strip():
                tqdm.write(result.stderr.rstrip("\n"), file=sys.stderr)
            if result.returncode:
                raise run_summary.NotARun(f"plot_logs.py could not draw the runs of {name} (see its message)")
            (todo[name].folder / DRAWN_FILE).write_text(json.dumps(todo[name].inputs) + "\n")


PUBLISHED_FILES = ("config.json", "log.csv", "quality.csv", run_log.STATUS_FILE)


def publish_run(job: Job) -> None:
    """Replaces the run's published copy with what redraws its tables and figures: its
    config.json, log.csv, quality.csv, status.json and final grids, and the first seed's grids
    at the steps compare_samples.png shows; no checkpoint."""
    target = job.published
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    for filename in PUBLISHED_FILES:
        if (job.folder / filename).is_file():
            shutil.copyfile(job.folder / filename, target / filename)
    grids = {
        "final": job.folder / "samples" / "final.png",
        "ema/final": job.folder / "samples" / "ema" / "final.png",
    }
    if job.seed == 0:
        by_step = run_summary.step_grids(job.folder)
        grids |= {f"step_{step:06d}": by_step[step] for step in run_summary.side_by_side_steps(list(by_step))}
    for stem, source in grids.items():
        if source.is_file():  # JPEG: a fraction of the PNG, and the grids are for looking at
            (target / "samples" / stem).parent.mkdir(parents=True, exist_ok=True)
            Image.open(source).convert("RGB").save(target / "samples" / f"{stem}.jpg", quality=90)


def publish_local(args: argparse.Namespace, jobs: list[Job]) -> None:
    """With --publish, publishes again each of `jobs` with a result in OUT: cheap, and a run that
    ended in an earlier command without --publish lands too."""
    for job in jobs if args.publish else []:
        if job.folder.exists() and state(job) in FINISHED:
            publish_run(job)


def write_out(args: argparse.Namespace, sets: dict[str, list[Job]], complete: list[str]) -> Path | None:
    """After a part, or where the grid stops: the figures and results.md of the runs with a
    result so far; with --publish, those runs and results.md in DIR too."""
    finished = {name: [job for job in jobs if state(job) in FINISHED] for name, jobs in sets.items()}
    finished = {name: jobs for name, jobs in finished.items() if jobs}
    if not finished:  # nothing to write, and an earlier results.md stays
        return None
    results = write_results(args, finished, report_sets(args, finished), complete)
    if args.publish:
        publish_local(args, flat(finished))
        for filename in ("results.md", "machine.json"):
            shutil.copyfile(args.out / filename, args.publish / filename)
        print(f"published the runs' logs, configurations and grids, and results.md, in {args.publish}/")
    return results
