"""The GAN-stability benchmark in one command: the four optimizer configurations (adam_adam,
casmo_adam, adam_casmo, casmo_casmo) over several seeds, on the semicircle toy and the
DCGAN; then, from their results, the control (Adam at each CASMO configuration's mean
step) and robustness sweeps; then plot_logs.py's figures and one results table with the
machine, versions and date it was measured on.

    python benchmark.py                  # the CPU grid (about 4 hours on 2 cores)
    python benchmark.py --small          # a quick look (about 20 minutes on 2 cores)
    python benchmark.py --dataset tinyimagenet --subset 20000 --dcgan-steps 0 --eval-every 1250 \
        --device cuda                    # the full DCGAN (50 epochs, evaluated each epoch)

Runs go to OUT/<set>/<configuration>-s<seed>/, each its own process (one thread on the CPU,
so its numbers do not depend on the core count). A finished run is skipped and an
interrupted one resumed, so the command can be stopped and started again. Each run's console
output is in OUT/logs/. The figures and tables are in OUT/plots/; the results in OUT/results.md;
with --publish DIR, what redraws them without the checkpoints.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import gan_common
import gan_data
import run_summary
import sample_quality
import speed_settings
from run_summary import CONTROL_SUFFIX

CONFIGS = ("adam_adam", "casmo_adam", "adam_casmo", "casmo_casmo")
DEFAULT_ROBUSTNESS = 0.5  # CASMO's default, which the main grid uses
DONE_MARKER = "benchmark_done"  # written into a run folder once its script exited cleanly
HERE = Path(__file__).parent  # the scripts' folder, where every run starts


class ControlError(Exception):
    """The runs a control is derived from are missing or unreadable."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("runs/benchmark"), help="folder of the grid")
    parser.add_argument(
        "--small",
        action="store_true",
        help="a quick look: 2 toy seeds of 60 epochs, 1 DCGAN seed of 150 steps, no sweep "
        "(its own default --out, runs/benchmark-small)",
    )
    add_grid_args(parser)
    add_dcgan_args(parser)
    add_derived_args(parser)
    machine = parser.add_argument_group("where and how")
    machine.add_argument("--device", default="cpu", help="device of every run (cpu, cuda, cuda:1, ...)")
    machine.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="runs side by side (default: the number of CPU cores on the CPU, 1 on a GPU)",
    )
    machine.add_argument(
        "--publish",
        type=Path,
        default=None,
        metavar="DIR",
        help="also copy what redraws every table and figure into DIR (logs, configs, grids as "
        "JPEG; no checkpoints), e.g. docs/results",
    )
    machine.add_argument("--dry-run", action="store_true", help="list the runs and what would happen to each")
    args = parser.parse_args(argv)
    if args.small:
        apply_small(args, parser)
    for name in COUNTS:
        if getattr(args, name) < 0 or (name.endswith("epochs") and getattr(args, name) == 0):
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.jobs is None:
        args.jobs = (os.cpu_count() or 1) if args.device == "cpu" else 1
    # Resolved once, so every DCGAN run of the grid uses one precision.
    args.speed_settings = speed_settings.resolve(args, torch.device(args.device))
    return args


# Options that count something and must not be negative (epochs: positive).
COUNTS = (
    "toy_seeds",
    "dcgan_seeds",
    "sweep_seeds",
    "toy_epochs",
    "dcgan_epochs",
    "eval_every",
    "eval_samples",
)
# --small: these values, for every option left at its default.
SMALL = dict(
    toy_seeds=2, toy_epochs=60, dcgan_seeds=1, dcgan_steps=150, eval_every=50, control_configs=[],
    sweep_robustness=[], dcgan_sweep_robustness=[],
)  # fmt: skip


def add_grid_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--toy-seeds", type=int, default=5, help="seeds 0..N-1 of every toy configuration")
    parser.add_argument("--toy-epochs", type=int, default=200)
    parser.add_argument("--dcgan-seeds", type=int, default=3, help="seeds 0..N-1 of each DCGAN configuration")
    parser.add_argument(
        "--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS, help="the main grid's"
    )


def add_dcgan_args(parser: argparse.ArgumentParser) -> None:
    dcgan = parser.add_argument_group("DCGAN data, length, evaluation and speed (every run alike)")
    dcgan.add_argument("--dataset", choices=gan_data.DATASETS, default="shapes", help="the DCGAN's --dataset")
    dcgan.add_argument("--data-root", type=Path, default=Path("data"), help="the DCGAN's --data-root")
    dcgan.add_argument("--subset", type=int, default=2048, help="the DCGAN's --subset")
    dcgan.add_argument(
        "--dcgan-steps", type=int, default=2000, help="the DCGAN's --max-steps (0: run all --dcgan-epochs)"
    )
    dcgan.add_argument("--dcgan-epochs", type=int, default=50, help="the DCGAN's --epochs")
    dcgan.add_argument("--eval-every", type=int, default=250, help="steps between sample-quality evaluations")
    dcgan.add_argument("--eval-samples", type=int, default=1000, help="images per evaluation")
    dcgan.add_argument("--g-ema", type=float, default=0.999, help="decay of the EMA generator (0: none)")
    dcgan.add_argument(
        "--amp",
        choices=("auto", "off", "bf16"),
        default="auto",
        help="the DCGAN's --amp, one for the whole grid (auto: bf16 where --device computes it natively)",
    )
    dcgan.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the DCGAN's --channels-last (default: chosen for --device with --amp)",
    )


def add_derived_args(parser: argparse.ArgumentParser) -> None:
    derived = parser.add_argument_group("the control and the robustness sweeps")
    derived.add_argument(
        "--control-configs",
        nargs="*",
        default=["casmo_adam", "adam_casmo", "casmo_casmo"],
        choices=CONFIGS[1:],
        help="configurations that get the control (Adam at their mean CASMO step), on the toy and the DCGAN",
    )
    derived.add_argument(
        "--sweep-robustness",
        type=float,
        nargs="*",
        default=[0.0, 1.0],
        help="robustness values run besides the default 0.5 for the toy's sweep (none: no sweep)",
    )
    derived.add_argument("--sweep-configs", nargs="*", default=["casmo_casmo"], choices=CONFIGS)
    derived.add_argument("--sweep-seeds", type=int, default=2, help="seeds 0..N-1 of every sweep point")
    derived.add_argument(
        "--dcgan-sweep-robustness",
        type=float,
        nargs="*",
        default=[0.0, 1.0],
        help="robustness values run besides 0.5 on the DCGAN, for the CASMO configuration with the "
        "lowest final KID (EMA G), --sweep-seeds seeds (none: no sweep)",
    )


def apply_small(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """--small's values for the options left at their defaults, and its own default --out."""
    for name, value in SMALL.items():
        if getattr(args, name) == parser.get_default(name):
            setattr(args, name, value)
    if args.out == parser.get_default("out"):
        args.out = Path("runs/benchmark-small")


@dataclass
class Job:
    folder: Path  # the run folder
    command: list[str]  # starts the run
    resume_command: list[str]  # continues it from its checkpoint to the same budget
    config: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.folder.parent.name}/{self.folder.name}"


def optimizers(config: str) -> list[str]:
    g_opt, d_opt = config.split("_")
    return ["--g-opt", g_opt, "--d-opt", d_opt]


def toy_job(args: argparse.Namespace, folder: Path, config: str, seed: int, *options: str) -> Job:
    python = sys.executable
    command = [python, "train_toy2d.py", *optimizers(config), "--seed", str(seed), *options]
    command += ["--epochs", str(args.toy_epochs), "--device", args.device, "--out", str(folder)]
    resume = [python, "train_toy2d.py", "--resume", str(folder), "--epochs", str(args.toy_epochs)]
    return Job(folder, command, resume, config, seed)


def dcgan_job(args: argparse.Namespace, folder: Path, config: str, seed: int, *options: str) -> Job:
    python = sys.executable
    command = [python, "train_dcgan.py", *optimizers(config), "--seed", str(seed), *options]
    command += ["--dataset", args.dataset, "--data-root", str(args.data_root), "--subset", str(args.subset)]
    command += ["--amp", args.amp, "--channels-last" if args.channels_last else "--no-channels-last"]
    command += ["--eval-every", str(args.eval_every), "--eval-samples", str(args.eval_samples)]
    command += ["--g-ema", str(args.g_ema)] if args.g_ema else []
    command += ["--sample-every", str(args.eval_every), "--log-every", "10", "--device", args.device]
    budget = ["--epochs", str(args.dcgan_epochs)]
    budget += ["--max-steps", str(args.dcgan_steps)] if args.dcgan_steps else []
    command += [*budget, "--out", str(folder)]
    resume = [python, "train_dcgan.py", "--resume", str(folder), *budget]
    return Job(folder, command, resume, config, seed)


def plan(args: argparse.Namespace) -> dict[str, list[Job]]:
    """The runs that need no other run's result, keyed by their set's folder name."""
    robustness = ["--robustness", str(DEFAULT_ROBUSTNESS)]
    sets: dict[str, list[Job]] = {"toy2d": [], dcgan_set(args): []}
    for config in args.configs:
        for seed in range(args.toy_seeds):
            sets["toy2d"].append(
                toy_job(args, args.out / "toy2d" / f"{config}-s{seed}", config, seed, *robustness)
            )
        for seed in range(args.dcgan_seeds):
            folder = args.out / dcgan_set(args) / f"{config}-s{seed}"
            sets[dcgan_set(args)].append(dcgan_job(args, folder, config, seed))
    if args.sweep_robustness:
        sets["toy2d-robustness"] = [
            toy_job(
                args,
                args.out / "toy2d-robustness" / f"{config}-r{value:g}-s{seed}",
                config,
                seed,
                "--robustness",
                str(value),
            )
            for value in args.sweep_robustness
            for config in args.sweep_configs
            for seed in range(args.sweep_seeds)
        ]
    return {name: jobs for name, jobs in sets.items() if jobs}


def dcgan_set(args: argparse.Namespace) -> str:
    return f"dcgan-{args.dataset}"


# The control: Adam with the learning rate of each CASMO-driven network scaled by the
# mean confidence CASMO gave it, so that its mean step size matches CASMO's.


def control_learning_rates(jobs: list[Job], config: str) -> dict[str, float]:
    """For each network `config` drives with CASMO, the runs' lr times their mean logged
    confidence (over all logged steps of a run, then over seeds)."""
    rates = {}
    runs = [job.folder for job in jobs if job.config == config]
    for network, optimizer in zip("gd", config.split("_")):
        if optimizer != "casmo":
            continue
        logs = [run_summary.read_numeric_csv(run / "log.csv") for run in runs]
        confidences = [float(np.nanmean(log[f"conf_{network}"])) for log in logs]
        lrs = {json.loads((run / "config.json").read_text())["args"][f"lr_{network}"] for run in runs}
        if len(lrs) != 1 or not all(np.isfinite(confidences)):
            raise ControlError(
                f"the control of {config} needs its runs' one lr_{network} and a finite mean "
                f"conf_{network} in log.csv; found lr {sorted(lrs)}, confidence {confidences}"
            )
        rates[f"lr_{network}"] = lrs.pop() * float(np.mean(confidences))
        rates[f"conf_{network}"] = float(np.mean(confidences))
        rates[f"conf_{network}_per_seed"] = confidences
    return rates


def plan_controls(args: argparse.Namespace, sets: dict[str, list[Job]]) -> dict[str, list[Job]]:
    """Per set with controlled configurations, its control set: adam_adam at each CASMO
    configuration's mean step, same seeds. The learning rates are kept in the set's
    control.json, so a resumed control runs with the rates it started with."""
    controls = {}
    for name, make_job in (("toy2d", toy_job), (dcgan_set(args), dcgan_job)):
        jobs = sets.get(name, [])
        configs = [config for config in args.control_configs if any(job.config == config for job in jobs)]
        if not configs:
            continue
        folder = args.out / f"{name}{CONTROL_SUFFIX}"
        record_path = folder / "control.json"
        record = json.loads(record_path.read_text()) if record_path.is_file() else {}
        for config in configs:
            if config not in record:  # a resumed control keeps the rates it started with
                record[config] = control_learning_rates(jobs, config)
        folder.mkdir(parents=True, exist_ok=True)
        gan_common.atomic_write_text(record_path, json.dumps(record, indent=2) + "\n")
        controls[folder.name] = []
        for config in configs:
            rates = record[config]
            options = ["--label", config + CONTROL_SUFFIX]
            options += [
                item
                for key in ("lr_g", "lr_d")
                if key in rates
                for item in (f"--{key.replace('_', '-')}", repr(rates[key]))
            ]
            for job in jobs:
                if job.config == config:
                    control = make_job(
                        args,
                        folder / f"{config}{CONTROL_SUFFIX}-s{job.seed}",
                        "adam_adam",
                        job.seed,
                        *options,
                    )
                    control.config = config + CONTROL_SUFFIX
                    controls[folder.name].append(control)
    return controls


def state(job: Job) -> str:
    """ "done", "resume", "start" or "restart" (a folder left without a checkpoint)."""
    if (job.folder / DONE_MARKER).is_file():
        return "done"
    if (job.folder / "checkpoint.pt").is_file():
        return "resume"
    return "restart" if job.folder.exists() else "start"


def prepare_data(args: argparse.Namespace) -> None:
    """Downloads and decodes the DCGAN's images once, before runs start side by side (each
    would otherwise download the same archive): every seed's subset lands in the cache the
    runs read. The same for the feature space of the sample-quality measures."""
    if args.dataset != "shapes":
        for seed in range(args.dcgan_seeds):
            gan_data.load_images(args.dataset, args.data_root, args.subset, seed, workers=os.cpu_count() or 1)
    # The feature space too: the shapes classifier is trained once, here, not by every run.
    sample_quality.feature_space_for(args.dataset, args.data_root)


def run(job: Job, log_dir: Path, threads: int) -> tuple[Job, int, Path]:
    what = state(job)
    log_path = log_dir / f"{job.folder.parent.name}-{job.folder.name}.log"
    if what == "done":
        return job, 0, log_path
    if what == "restart":  # stopped before its first checkpoint: nothing to resume
        shutil.rmtree(job.folder)
    command = job.resume_command if what == "resume" else job.command
    environment = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    with open(log_path, "a") as log:
        log.write(f"\n$ {' '.join(command)}\n")
        log.flush()
        returncode = subprocess.run(
            command, stdout=log, stderr=subprocess.STDOUT, env=environment, cwd=HERE
        ).returncode
    if returncode == 0:
        (job.folder / DONE_MARKER).write_text(time.strftime("%Y-%m-%d %H:%M:%S\n"))
    return job, returncode, log_path


def run_all(jobs: list[Job], args: argparse.Namespace, log_dir: Path) -> list[tuple[Job, Path]]:
    """Runs every job not yet done, `args.jobs` at a time; returns the failed ones."""
    todo = [job for job in jobs if state(job) != "done"]
    print(f"{len(jobs) - len(todo)} of {len(jobs)} runs done before; {len(todo)} to run, {args.jobs} at once")
    threads = 1 if args.device == "cpu" else max(1, (os.cpu_count() or 1) // args.jobs)
    failed = []
    pool = ThreadPoolExecutor(args.jobs)
    try:
        with tqdm(total=len(todo), unit="run") as bar:
            for future in as_completed([pool.submit(run, job, log_dir, threads) for job in todo]):
                job, returncode, log_path = future.result()
                bar.update()
                if returncode != 0:
                    failed.append((job, log_path))
                    tqdm.write(f"failed: {job.name} (exit code {returncode}); its output: {log_path}")
    finally:
        # On Ctrl-C the runs got it too and are saving their checkpoints: wait for them,
        # and start no other.
        pool.shutdown(wait=True, cancel_futures=True)
    return failed


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
# With 95% t-intervals over seeds.
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


def seeds(count: int) -> str:
    return "seed 0" if count == 1 else f"seeds 0-{count - 1}"


def set_caption(args: argparse.Namespace, name: str) -> str:
    dcgan = (
        f"DCGAN on {args.dataset}, subset {args.subset}, batch 16, "
        + (f"{args.dcgan_steps} steps" if args.dcgan_steps else f"{args.dcgan_epochs} epochs")
        + f", --amp {args.amp}{', channels_last' if args.channels_last else ''}, sample quality of "
        f"{args.eval_samples} images every {args.eval_every} steps"
        + (f", EMA G (decay {args.g_ema})" if args.g_ema else "")
    )
    control = (
        "The control: Adam on both networks, with the learning rate of each network that the "
        "CASMO configuration drives with CASMO multiplied by the mean confidence CASMO logged for "
        "it (control.json), same seeds; shown with the main grid's runs."
    )
    captions = {
        "toy2d": f"Semicircle toy, {args.toy_epochs} epochs, {seeds(args.toy_seeds)}, robustness 0.5.",
        dcgan_set(args): f"{dcgan}, {seeds(args.dcgan_seeds)}.",
        f"toy2d{CONTROL_SUFFIX}": f"Semicircle toy. {control}",
        f"{dcgan_set(args)}{CONTROL_SUFFIX}": f"{dcgan}. {control}",
        "toy2d-robustness": f"Robustness sweep on the toy, {args.toy_epochs} epochs, "
        f"{seeds(args.sweep_seeds)} (robustness 0.5: the main grid's runs of the same seeds).",
        f"{dcgan_set(args)}-robustness": f"Robustness sweep on the DCGAN ({dcgan}), the CASMO configuration "
        f"with the lowest final KID of EMA G, {seeds(args.sweep_seeds)} (0.5: the main grid's runs).",
    }
    return captions[name]


def write_results(args: argparse.Namespace, sets: dict[str, list[Job]], rows: dict[str, list[dict]]) -> Path:
    """results.md: per set, the configuration rows of plot_logs.py's summary, with the machine
    record; machine.json beside it."""
    record = {**gan_common.environment(), "speed_settings": args.speed_settings}
    gpu = f", GPU {record['gpu']}" if record["gpu"] and args.device.startswith("cuda") else ""
    lines = [
        "# CASMO GAN-stability benchmark: results",
        "",
        f"Measured {record['date']} on {record['cpu']} ({record['cpu_cores']} cores){gpu}; "
        f"Python {record['python']}, torch {record['torch']}; command `{record['command']}`.",
        f"DCGAN speed settings: --amp {args.amp}, channels_last {args.channels_last} "
        f"({args.speed_settings['why']}).",
        "Losses and checks: mean ± sample std over seeds; sample quality: mean [95% t-interval "
        "over seeds] (plot_logs.py's summary.csv, configuration rows).",
        "",
    ]
    for name in sets:
        configurations = [row for row in rows[name] if row["scope"] == "configuration"]
        lines += [f"## {name}", "", set_caption(args, name), ""]
        if name.startswith("dcgan"):
            lines += run_summary.markdown_table(configurations, DCGAN_COLUMNS) + [""]
            lines += run_summary.markdown_table(
                configurations, DCGAN_QUALITY_COLUMNS, cell=run_summary.interval_cell
            )
        else:
            lines += run_summary.markdown_table(configurations, TOY_COLUMNS)
        lines += [""]
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


def plan_dcgan_sweep(args: argparse.Namespace, sets: dict[str, list[Job]]) -> dict[str, list[Job]]:
    """The DCGAN's robustness sweep, for the CASMO configuration of the main grid with the
    lowest mean final KID of its EMA generator (of G without --g-ema)."""
    jobs = [job for job in sets.get(dcgan_set(args), []) if "casmo" in job.config]
    if not args.dcgan_sweep_robustness or not jobs:
        return {}
    column = "kid_ema" if args.g_ema else "kid"

    def final_kid(config: str) -> float:
        runs = [job.folder for job in jobs if job.config == config]
        return float(np.mean([run_summary.read_numeric_csv(run / "quality.csv")[column][-1] for run in runs]))

    best = min(sorted({job.config for job in jobs}), key=final_kid)
    name = f"{dcgan_set(args)}-robustness"
    return {
        name: [
            dcgan_job(
                args, args.out / name / f"{best}-r{value:g}-s{seed}", best, seed, "--robustness", str(value)
            )
            for value in args.dcgan_sweep_robustness
            for seed in range(args.sweep_seeds)
        ]
    }


def run_phases(args: argparse.Namespace, log_dir: Path) -> dict[str, list[Job]] | None:
    """The main grid, then what is derived from it (controls, the DCGAN sweep); the sets
    run, or None when a run failed."""
    sets = plan(args)
    for phase in (lambda: sets, lambda: {**plan_controls(args, sets), **plan_dcgan_sweep(args, sets)}):
        new_sets = phase()
        sets.update(new_sets)
        failed = run_all([job for jobs in new_sets.values() for job in jobs], args, log_dir)
        if failed:
            print(f"{len(failed)} run(s) failed; fix the cause and run the same command again to resume:")
            for job, log_path in failed:
                print(f"  {job.name}: {log_path}")
            return None
    return sets


def report_sets(args: argparse.Namespace, sets: dict[str, list[Job]]) -> dict[str, list[dict]]:
    """plot_logs.py's figures and tables per set, into OUT/plots/<set>/, and the set's summary
    rows; a control set and a sweep are drawn with the runs they are compared against."""
    plots, rows = args.out / "plots", {}
    for name, set_jobs in sets.items():
        folders = [job.folder for job in set_jobs]
        group_by = []
        base = name.removesuffix(CONTROL_SUFFIX).removesuffix("-robustness")
        if name.endswith(CONTROL_SUFFIX):
            folders += [job.folder for job in sets[base]]
        elif name.endswith("-robustness"):
            sweep = {job.config for job in set_jobs}
            seeds = {job.seed for job in set_jobs}
            folders += [job.folder for job in sets[base] if job.config in sweep and job.seed in seeds]
            group_by = ["robustness"]
        runs, _ = run_summary.read_runs(folders, group_by)
        rows[name] = run_summary.summary_rows(run_summary.comparison_sets(runs))
        command = [sys.executable, "plot_logs.py", *map(str, folders), "--out", str(plots / name)]
        command += ["--group-by", *group_by] if group_by else []
        sys.stdout.flush()  # plot_logs.py's lines after this script's own
        if subprocess.run(command, cwd=HERE).returncode:
            raise run_summary.NotARun(f"plot_logs.py could not draw the runs of {name} (see its message)")
    return rows


PUBLISHED_FILES = ("config.json", "log.csv", "quality.csv")


def publish(args: argparse.Namespace, sets: dict[str, list[Job]]) -> None:
    """Copies into args.publish, in OUT's layout, what plot_logs.py needs to redraw every table
    and figure: per run its config.json, log.csv, quality.csv and final grids, the first seed's
    grids at the steps compare_samples.png shows; per set its control.json; results.md."""
    for name, jobs in sets.items():
        for job in jobs:
            target = args.publish / name / job.folder.name
            target.mkdir(parents=True, exist_ok=True)
            for filename in PUBLISHED_FILES:
                if (job.folder / filename).is_file():
                    shutil.copyfile(job.folder / filename, target / filename)
            grids = {
                "final": job.folder / "samples" / "final.png",
                "ema/final": job.folder / "samples" / "ema" / "final.png",
            }
            if job.seed == 0:
                by_step = run_summary.step_grids(job.folder)
                shown = run_summary.side_by_side_steps(list(by_step))
                grids |= {f"step_{step:06d}": by_step[step] for step in shown}
            for stem, source in grids.items():
                if source.is_file():  # JPEG: a fraction of the PNG, and the grids are for looking at
                    (target / "samples" / stem).parent.mkdir(parents=True, exist_ok=True)
                    Image.open(source).convert("RGB").save(target / "samples" / f"{stem}.jpg", quality=90)
        if (args.out / name / "control.json").is_file():
            shutil.copyfile(args.out / name / "control.json", args.publish / name / "control.json")
    for filename in ("results.md", "machine.json"):
        shutil.copyfile(args.out / filename, args.publish / filename)
    print(f"published the runs' logs, configurations and grids in {args.publish}/")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        for job in [job for set_jobs in plan(args).values() for job in set_jobs]:
            print(f"{state(job):8} {job.folder}")
        print("then: the controls and the DCGAN sweep, planned from these runs' results")
        return 0
    log_dir = args.out / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    # Started in the background (`cmd &`), a process inherits SIGINT ignored: Ctrl-C or
    # `kill -INT` must still stop the grid, not only its runs.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    started = time.perf_counter()
    try:
        prepare_data(args)
        sets = run_phases(args, log_dir)
        if sets is None:
            return 1
        rows = report_sets(args, sets)
    except (
        gan_data.DataError,
        sample_quality.SampleQualityError,
        ControlError,
        run_summary.NotARun,
    ) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("stopped; the runs saved checkpoints: run the same command again to continue", file=sys.stderr)
        return 130
    results = write_results(args, sets, rows)
    if args.publish:
        publish(args, sets)
    minutes = (time.perf_counter() - started) / 60
    runs = sum(len(jobs) for jobs in sets.values())
    print(
        f"grid done in {minutes:.0f} min: {runs} runs in {args.out}/, figures in {args.out / 'plots'}/<set>/"
    )
    print(f"results table: {results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
