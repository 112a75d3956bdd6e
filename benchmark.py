"""The GAN-stability benchmark in one command: the grid of docs/benchmark_protocol.md, run
part by part in the protocol's order, so that a grid cut short has answered the most
important question first. Part a: adam_adam and casmo_adam on the shapes DCGAN and
casmo_adam's control (Adam at CASMO's mean step); part b: the same under the stress setting
the pilot chose; part c: adam_casmo and casmo_casmo with their controls, the DCGAN's
robustness sweep and the semicircle toy. After each part, plot_logs.py's figures and
results.md (the endpoints and paired comparisons of paired_analysis.py) for the runs that
have a result, with the machine, versions and date.

    python benchmark.py --pilot --publish docs/results  # the stress pilot: part b's setting, once
    python benchmark.py --publish docs/results          # the grid: parts a, b, c (~18 h on 2 cores)
    python benchmark.py --small                         # a quick look: parts a and c, one seed
    python benchmark.py --dataset tinyimagenet --subset 20000 --dcgan-steps 0 --eval-every 1250 \
        --device cuda --parts a                         # the full DCGAN (50 epochs) on a GPU

Runs go to OUT/<set>/<configuration>-s<seed>/, each its own process (one thread on the CPU,
so its numbers do not depend on the core count). A run with a result (finished, or diverged:
an outcome, never retried) is skipped and an interrupted one resumed, so the command can be
stopped and started again. With --publish DIR each run is copied into DIR as it ends (no
checkpoints), and a run found there is skipped and read from there: the same command, here
or on another machine with DIR checked out, continues the grid. Each run's console output is
in OUT/logs/, the figures in OUT/plots/<set>/, the results in OUT/results.md (and DIR).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import gan_common
import gan_data
import paired_analysis
import run_log
import run_summary
import sample_quality
import speed_settings
from casmo_ext.bench import cpu_model
from run_summary import CONTROL_SUFFIX

CONFIGS = ("adam_adam", "casmo_adam", "adam_casmo", "casmo_casmo")
DEFAULT_ROBUSTNESS = 0.5  # CASMO's default, which the main grid uses
DONE_MARKER = "benchmark_done"  # written into a run folder once its script exited cleanly
HERE = Path(__file__).parent  # the scripts' folder, where every run starts

# The protocol's parts, in its order: per part its main sets as (set, configurations, the
# option counting their seeds); "{dcgan}" stands for dcgan-<dataset>. A part's controls
# follow its main runs, and in part c so does the DCGAN's robustness sweep; the toy's sweep
# runs with the toy.
PARTS = {
    "a": [("{dcgan}", ("adam_adam", "casmo_adam"), "primary_seeds")],
    "b": [("{dcgan}-stress", ("adam_adam", "casmo_adam"), "stress_seeds")],
    "c": [("{dcgan}", ("adam_casmo", "casmo_casmo"), "other_seeds"), ("toy2d", CONFIGS, "toy_seeds")],
}
# The stress setting's candidates. The pilot runs adam_adam under each; the protocol's rule
# (paired_analysis.pilot_table) picks the one under which it fails most.
STRESS_CANDIDATES = {"S1": "--subset 256", "S2": "--lr-g 8e-4 --lr-d 8e-4", "S3": "--lr-d 8e-4"}
PILOT_SEEDS = (100, 101, 102)  # not the grid's seeds, so that the choice is not fitted to them
PILOT_STEPS = 1000
FINISHED = ("done", "diverged", "published")  # the states of a run with a result
ONE_SEED_CAPTION = "one seed: an illustration, not evidence (docs/benchmark_results.md)"
# The time estimate: a probe of PROBE_STEPS steps where no run here has been timed yet, for
# at least 100 times its steps; an evaluation (1,000 images, G and EMA G) took about 15 s
# on the 2-core Xeon of the 2026-12-02 grid (eval_seconds in docs/results).
PROBE_STEPS = 30
EVAL_SECONDS_PER_1000_IMAGES = 15.0


class ControlError(Exception):
    """The runs a control is derived from are missing or unreadable."""


class NoStressSetting(Exception):
    """Part b is next, and neither --stress-options nor the pilot's choice gives its setting."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("runs/benchmark"), help="folder of the grid")
    parser.add_argument(
        "--small",
        action="store_true",
        help="a quick look: parts a and c, 2 toy seeds of 60 epochs, 1 DCGAN seed of 150 steps, no "
        "control or sweep (its own default --out, runs/benchmark-small)",
    )
    add_grid_args(parser)
    add_dcgan_args(parser)
    add_derived_args(parser)
    add_machine_args(parser)
    args = parser.parse_args(argv)
    if args.small:
        apply_small(args, parser)
    for name in COUNTS:
        value = getattr(args, name)
        if value is not None and (value < 0 or (name in POSITIVE and value == 0)):
            parser.error(f"--{name.replace('_', '-')} must be positive")
    try:
        shlex.split(args.stress_options or "")
    except ValueError as error:
        parser.error(f"--stress-options: {error}")
    args.parts = sorted(set(args.parts))  # the protocol's order, whatever the command's
    if args.jobs is None:
        args.jobs = (os.cpu_count() or 1) if args.device == "cpu" else 1
    # Resolved once, so every DCGAN run of the grid uses one precision.
    args.speed_settings = speed_settings.resolve(args, torch.device(args.device))
    return args


# Options that count something and must not be negative; those of POSITIVE not 0 either.
POSITIVE = ("toy_epochs", "dcgan_epochs", "eval_every", "eval_samples")
COUNTS = (
    "primary_seeds",
    "stress_seeds",
    "other_seeds",
    "dcgan_seeds",
    "toy_seeds",
    "sweep_seeds",
    *POSITIVE,
)
# --small: these values, for every option left at its default.
SMALL = dict(
    parts=["a", "c"], toy_seeds=2, toy_epochs=60, dcgan_seeds=1, dcgan_steps=150, eval_every=50,
    control_configs=[], sweep_robustness=[], dcgan_sweep_robustness=[],
)  # fmt: skip


def add_grid_args(parser: argparse.ArgumentParser) -> None:
    grid = parser.add_argument_group("the grid's parts (docs/benchmark_protocol.md)")
    grid.add_argument(
        "--parts",
        nargs="+",
        choices=tuple(PARTS),
        default=list(PARTS),
        help="run in this order: a (the defaults), b (the stress setting), c (the other "
        "configurations, the sweeps, the toy)",
    )
    grid.add_argument("--primary-seeds", type=int, default=8, help="seeds 0..N-1 of part a")
    grid.add_argument("--stress-seeds", type=int, default=8, help="seeds 0..N-1 of part b")
    grid.add_argument("--other-seeds", type=int, default=5, help="seeds 0..N-1 of part c's DCGAN")
    grid.add_argument(
        "--dcgan-seeds",
        type=int,
        default=None,
        help="seeds 0..N-1 of every DCGAN set, instead of the three above",
    )
    grid.add_argument("--toy-seeds", type=int, default=5, help="seeds 0..N-1 of every toy configuration")
    grid.add_argument("--toy-epochs", type=int, default=200)
    grid.add_argument(
        "--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS, help="only these, in every part"
    )
    grid.add_argument(
        "--stress-options",
        default=None,
        metavar='"OPTIONS"',
        help="train_dcgan.py's options of part b's stress setting, e.g. \"--lr-d 8e-4\" (default: the "
        "pilot's choice, pilot/pilot.json in the --publish folder or in --out)",
    )
    grid.add_argument(
        "--pilot",
        action="store_true",
        help=f"instead of the grid, the stress pilot: adam_adam under each candidate setting, seeds "
        f"{PILOT_SEEDS[0]}-{PILOT_SEEDS[-1]}, {PILOT_STEPS} steps, into OUT/pilot/; its table and "
        "choice in OUT/pilot/pilot.md and pilot.json",
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
    dcgan.add_argument(
        "--g-ema-kimg",
        type=float,
        default=10.0,
        help="G's moving average, ramped as in StyleGAN2-ADA: a half-life of at most K thousand "
        "images (0: no EMA G)",
    )
    dcgan.add_argument(
        "--g-ema-rampup", type=float, default=0.05, help="... and of at most this share of the images seen"
    )
    dcgan.add_argument(
        "--g-ema",
        type=float,
        default=None,
        metavar="DECAY",
        help="a fixed decay instead of the ramp (0: no EMA G)",
    )
    dcgan.add_argument(
        "--amp",
        choices=("auto", "off", "bf16"),
        default="off",
        help="the DCGAN's --amp, one for every run. fp32 (off) by default: runs made on different "
        "CPU kinds belong to one comparison, and auto would pick bf16 on some and fp32 on others; "
        "auto: bf16 where --device computes it natively",
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
        help="configurations that get the control (Adam at their mean CASMO step), in every part",
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
        help="robustness values run besides 0.5 on the DCGAN (part c), for the CASMO configuration "
        "with the lowest KID endpoint, --sweep-seeds seeds (none: no sweep)",
    )


def add_machine_args(parser: argparse.ArgumentParser) -> None:
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
        help="copy each run into DIR as it ends (logs, configuration, status, grids as JPEG; no "
        "checkpoints), and results.md after each part; a run found there is not run again. E.g. "
        "docs/results",
    )
    machine.add_argument(
        "--grid-reference",
        type=Path,
        default=Path("docs/results"),
        help="the published grid whose seed-to-seed spread a one-seed set's results quote",
    )
    machine.add_argument("--dry-run", action="store_true", help="list the runs and what would happen to each")


def apply_small(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """--small's values for the options left at their defaults, and its own default --out."""
    for name, value in SMALL.items():
        if getattr(args, name) == parser.get_default(name):
            setattr(args, name, value)
    if args.out == parser.get_default("out"):
        args.out = Path("runs/benchmark-small")


@dataclass
class Job:
    folder: Path  # the run folder in OUT
    command: list[str]  # starts the run
    resume_command: list[str]  # continues it from its checkpoint to the same budget
    config: str
    seed: int
    published: Path | None  # its copy under --publish

    @property
    def name(self) -> str:
        return f"{self.folder.parent.name}/{self.folder.name}"

    @property
    def kind(self) -> str:
        return "dcgan" if "train_dcgan.py" in self.command else "toy"

    @property
    def location(self) -> Path:
        """Where its files are read from: its folder in OUT, else its published copy."""
        return self.folder if self.folder.exists() or self.published is None else self.published


def optimizers(config: str) -> list[str]:
    g_opt, d_opt = config.split("_")
    return ["--g-opt", g_opt, "--d-opt", d_opt]


def published_copy(args: argparse.Namespace, folder: Path) -> Path | None:
    inside = args.publish and folder.is_relative_to(args.out)
    return args.publish / folder.relative_to(args.out) if inside else None


# A job's `options` come last, so that a set's own (the stress setting) and then a run's own
# (a control's learning rates) override the grid's: the scripts take an option's last value.


def toy_job(args: argparse.Namespace, folder: Path, config: str, seed: int, *options: str) -> Job:
    python = sys.executable
    command = [python, "train_toy2d.py", *optimizers(config), "--seed", str(seed)]
    command += ["--epochs", str(args.toy_epochs), "--device", args.device, *options, "--out", str(folder)]
    resume = [python, "train_toy2d.py", "--resume", str(folder), "--epochs", str(args.toy_epochs)]
    return Job(folder, command, resume, config, seed, published_copy(args, folder))


def dcgan_job(
    args: argparse.Namespace, folder: Path, config: str, seed: int, *options: str, steps: int | None = None
) -> Job:
    """A DCGAN run with the grid's settings, of `steps` steps (default --dcgan-steps)."""
    python = sys.executable
    command = [python, "train_dcgan.py", *optimizers(config), "--seed", str(seed)]
    command += ["--dataset", args.dataset, "--data-root", str(args.data_root), "--subset", str(args.subset)]
    command += ["--amp", args.amp, "--channels-last" if args.channels_last else "--no-channels-last"]
    command += ["--eval-every", str(args.eval_every), "--eval-samples", str(args.eval_samples)]
    command += [*ema_setting(args)[0], "--sample-every", str(args.eval_every), "--log-every", "10"]
    steps = args.dcgan_steps if steps is None else steps
    budget = ["--epochs", str(args.dcgan_epochs)] + (["--max-steps", str(steps)] if steps else [])
    command += ["--device", args.device, *budget, *options, "--out", str(folder)]
    resume = [python, "train_dcgan.py", "--resume", str(folder), *budget]
    return Job(folder, command, resume, config, seed, published_copy(args, folder))


def ema_setting(args: argparse.Namespace) -> tuple[list[str], str]:
    """G's moving average: train_dcgan.py's options, and their words for results.md."""
    if args.g_ema is not None:
        return (
            (["--g-ema", str(args.g_ema)], f"EMA G of decay {args.g_ema}") if args.g_ema else ([], "no EMA G")
        )
    if not args.g_ema_kimg:
        return [], "no EMA G"
    kimg, rampup = f"{args.g_ema_kimg:g}", f"{args.g_ema_rampup:g}"
    words = f"EMA G of a half-life of {rampup} of the images seen, at most {kimg}k"
    return ["--g-ema-kimg", kimg, "--g-ema-rampup", rampup], words


def plan(args: argparse.Namespace, part: str) -> dict[str, list[Job]]:
    """The part's runs that need no other run's result, by set (their folder in OUT)."""
    sets = {}
    for pattern, part_configs, seeds_option in PARTS[part]:
        name = pattern.format(dcgan=dcgan_set(args))
        configs = [config for config in part_configs if config in args.configs]
        count = (
            getattr(args, seeds_option) if args.dcgan_seeds is None or name == "toy2d" else args.dcgan_seeds
        )
        if not configs or not count:
            continue
        if name == "toy2d":
            make_job, options = toy_job, ["--robustness", str(DEFAULT_ROBUSTNESS)]
        else:
            make_job, options = dcgan_job, set_options(args, name)
        # Seed by seed: a grid cut short leaves whole pairs, which the paired analysis uses.
        sets[name] = [
            make_job(args, args.out / name / f"{config}-s{seed}", config, seed, *options)
            for seed in range(count)
            for config in configs
        ]
    if part == "c" and args.sweep_robustness and args.sweep_seeds:
        sets["toy2d-robustness"] = [
            toy_job(args, args.out / "toy2d-robustness" / f"{config}-r{value:g}-s{seed}", config, seed,
                    "--robustness", str(value))
            for value in args.sweep_robustness
            for config in args.sweep_configs
            for seed in range(args.sweep_seeds)
        ]  # fmt: skip
    return sets


def dcgan_set(args: argparse.Namespace) -> str:
    return f"dcgan-{args.dataset}"


def flat(sets: dict[str, list[Job]]) -> list[Job]:
    return [job for jobs in sets.values() for job in jobs]


def set_options(args: argparse.Namespace, name: str) -> list[str]:
    """A set's own train_dcgan.py options: the stress setting's, for the stress set and its control."""
    return stress_options(args) if name.removesuffix(CONTROL_SUFFIX).endswith("-stress") else []


def stress_options(args: argparse.Namespace) -> list[str]:
    """--stress-options, else the pilot's choice: pilot/pilot.json, published or in OUT."""
    if args.stress_options is not None:
        return shlex.split(args.stress_options)
    for root in (args.publish, args.out):
        if root is not None and (root / "pilot" / "pilot.json").is_file():
            return shlex.split(json.loads((root / "pilot" / "pilot.json").read_text())["options"])
    raise NoStressSetting(
        "part b needs its stress setting: run `python benchmark.py --pilot` first (it records its "
        'choice in pilot/pilot.json), or pass --stress-options "...", or leave part b out (--parts a c)'
    )


def plan_pilot(args: argparse.Namespace) -> dict[str, list[Job]]:
    """The stress pilot: adam_adam under each candidate, by candidate (OUT/pilot/<candidate>/)."""
    return {
        candidate: [
            dcgan_job(args, args.out / "pilot" / candidate / f"adam_adam-s{seed}", "adam_adam", seed,
                      *shlex.split(options), steps=PILOT_STEPS)
            for seed in PILOT_SEEDS
        ]
        for candidate, options in STRESS_CANDIDATES.items()
    }  # fmt: skip


# The control: Adam with the learning rate of each CASMO-driven network scaled by the
# mean confidence CASMO gave it, so that its mean step size matches CASMO's.


def control_learning_rates(jobs: list[Job], config: str) -> dict[str, float]:
    """For each network `config` drives with CASMO, the runs' lr times their mean logged
    confidence (over the finite logged values of a run, then over seeds), the runs read
    where they are (OUT, else published)."""
    rates = {}
    runs = [job.location for job in jobs if job.config == config]
    for network, optimizer in zip("gd", config.split("_")):
        if optimizer != "casmo":
            continue
        confidences = [mean_confidence(run, network) for run in runs]
        lrs = {json.loads((run / "config.json").read_text())["args"][f"lr_{network}"] for run in runs}
        if len(lrs) != 1 or not np.isfinite(confidences).any():
            raise ControlError(
                f"the control of {config} needs its runs' one lr_{network} and a finite "
                f"conf_{network} in log.csv; found lr {sorted(lrs)}, confidence {confidences}"
            )
        rates[f"conf_{network}"] = float(np.nanmean(confidences))
        rates[f"lr_{network}"] = lrs.pop() * rates[f"conf_{network}"]
        rates[f"conf_{network}_per_seed"] = confidences
    return rates


def mean_confidence(run: Path, network: str) -> float:
    """A run's mean logged confidence of `network`; NaN where none is finite (a diverged run's
    last rows are not)."""
    values = run_summary.read_numeric_csv(run / "log.csv")[f"conf_{network}"]
    values = values[np.isfinite(values)]
    return float(values.mean()) if len(values) else math.nan


def plan_controls(
    args: argparse.Namespace, sets: dict[str, list[Job]], record: bool = True
) -> dict[str, list[Job]]:
    """Per main set with controlled configurations, its control set: adam_adam at each CASMO
    configuration's mean step, same seeds, with the set's own options. The learning rates are
    kept in the control set's control.json (with `record`), so that a resumed control runs
    with the rates it started with."""
    controls = {}
    for name, jobs in sets.items():
        configs = [config for config in args.control_configs if any(job.config == config for job in jobs)]
        if not configs or name.endswith("-robustness"):
            continue
        folder = args.out / f"{name}{CONTROL_SUFFIX}"
        rates = control_record(args, folder, jobs, configs, record)
        make_job, options = (toy_job, []) if name == "toy2d" else (dcgan_job, set_options(args, name))
        controls[folder.name] = [
            control_job(args, make_job, folder, job, rates[job.config], options)
            for job in jobs
            if job.config in configs
        ]
    return controls


def control_record(
    args: argparse.Namespace, folder: Path, jobs: list[Job], configs: list[str], record: bool
) -> dict[str, dict]:
    """control.json of a control set: per configuration the rates, those of an earlier start kept;
    written (and published) with `record`."""
    path = folder / "control.json"
    rates = json.loads(path.read_text()) if path.is_file() else {}
    for config in configs:
        if config not in rates:  # a resumed control keeps the rates it started with
            rates[config] = control_learning_rates(jobs, config)
    if record:
        folder.mkdir(parents=True, exist_ok=True)
        gan_common.atomic_write_text(path, json.dumps(rates, indent=2) + "\n")
        if args.publish:
            (args.publish / folder.name).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, args.publish / folder.name / "control.json")
    return rates


def control_job(
    args: argparse.Namespace, make_job, folder: Path, job: Job, rates: dict, options: list[str]
) -> Job:
    """adam_adam with the seed of `job`, at its configuration's mean CASMO step."""
    label = job.config + CONTROL_SUFFIX
    learning_rates = [
        item
        for key in ("lr_g", "lr_d")
        if key in rates
        for item in (f"--{key.replace('_', '-')}", repr(rates[key]))
    ]
    options = [*options, "--label", label, *learning_rates]
    control = make_job(args, folder / f"{label}-s{job.seed}", "adam_adam", job.seed, *options)
    control.config = label
    return control


def plan_dcgan_sweep(args: argparse.Namespace) -> dict[str, list[Job]]:
    """The DCGAN's robustness sweep (part c), for the CASMO configuration of the DCGAN's main set
    (parts a and c) with the lowest mean KID endpoint over its seeds with a result."""
    name = dcgan_set(args)
    jobs = [
        job
        for part in ("a", "c")
        for job in plan(args, part).get(name, [])
        if "casmo" in job.config and state(job) in FINISHED
    ]
    if not args.dcgan_sweep_robustness or not args.sweep_seeds or not jobs:
        return {}

    def mean_endpoint(config: str) -> float:
        values = [paired_analysis.endpoints(job.location)["kid_area"] for job in jobs if job.config == config]
        return float(np.nanmean(values)) if np.isfinite(values).any() else math.inf

    best = min(sorted({job.config for job in jobs}), key=mean_endpoint)
    sweep = f"{name}-robustness"
    return {
        sweep: [
            dcgan_job(
                args, args.out / sweep / f"{best}-r{value:g}-s{seed}", best, seed, "--robustness", str(value)
            )
            for value in args.dcgan_sweep_robustness
            for seed in range(args.sweep_seeds)
        ]
    }


def ema_or_raw_kid(quality: run_summary.Columns) -> np.ndarray:
    """KID of EMA G where the run kept one, else of G."""
    return quality["kid_ema"] if np.isfinite(quality["kid_ema"]).any() else quality["kid"]


def plan_derived(
    args: argparse.Namespace, part: str, main: dict[str, list[Job]], record: bool = True
) -> dict[str, list[Job]]:
    """What the part's main runs' results decide: their controls and, in part c, the DCGAN's sweep."""
    return {**plan_controls(args, main, record), **(plan_dcgan_sweep(args) if part == "c" else {})}


def run_status(folder: Path | None) -> str | None:
    """The status of the run in `folder` by its status.json ("finished" too for an older run
    with DONE_MARKER); None without either."""
    if folder is None:
        return None
    if (folder / DONE_MARKER).is_file():
        return "finished"
    status = run_log.read_status(folder)
    return status["status"] if status else None


def state(job: Job) -> str:
    """What the grid does with a run. Nothing where it has a result: "done", "diverged" (an
    outcome, never run again) or "published" (no folder in OUT, a finished or diverged copy
    under --publish). Else "resume" (from its checkpoint), "start", or "restart" (a folder left
    without a checkpoint)."""
    status = run_status(job.folder)
    if status in ("finished", "diverged"):
        return "done" if status == "finished" else "diverged"
    if (job.folder / "checkpoint.pt").is_file():
        return "resume"
    if job.folder.exists():
        return "restart"
    return "published" if run_status(job.published) in ("finished", "diverged") else "start"


def prepare_data(args: argparse.Namespace) -> None:
    """Downloads and decodes the DCGAN's images once, before runs start side by side (each
    would otherwise download the same archive): every seed's subset lands in the cache the
    runs read. The same for the feature space of the sample-quality measures."""
    if args.dataset != "shapes":
        seeds = PILOT_SEEDS if args.pilot else range(dcgan_seed_count(args))
        for seed in seeds:
            gan_data.load_images(args.dataset, args.data_root, args.subset, seed, workers=os.cpu_count() or 1)
    # The feature space too: the shapes classifier is trained once, here, not by every run.
    sample_quality.feature_space_for(args.dataset, args.data_root)


def dcgan_seed_count(args: argparse.Namespace) -> int:
    if args.dcgan_seeds is not None:
        return args.dcgan_seeds
    return max(args.primary_seeds, args.stress_seeds, args.other_seeds)


def run(job: Job, log_dir: Path, threads: int) -> tuple[Job, int, Path]:
    what = state(job)
    log_path = log_dir / f"{job.folder.parent.name}-{job.folder.name}.log"
    if what in FINISHED:
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


def run_all(
    jobs: list[Job], args: argparse.Namespace, log_dir: Path, what: str
) -> list[tuple[Job, int, Path]]:
    """Runs every job without a result, `args.jobs` at a time, each published (--publish) as it
    ends; returns those it ran, with their exit codes and logs. A diverged run (exit code 3) is
    an outcome, not a failure."""
    if not jobs:
        return []
    states = [state(job) for job in jobs]
    todo = [job for job, what_now in zip(jobs, states) if what_now not in FINISHED]
    counts = ", ".join(f"{count} {name}" for name, count in Counter(states).items())
    print(
        f"{what}: {len(jobs) - len(todo)} of {len(jobs)} runs done before; {len(todo)} to run, "
        f"{args.jobs} at once ({counts})"
    )
    threads = 1 if args.device == "cpu" else max(1, (os.cpu_count() or 1) // args.jobs)
    ran = []
    pool = ThreadPoolExecutor(args.jobs)
    try:
        with tqdm(total=len(todo), unit="run") as bar:
            for future in as_completed([pool.submit(run, job, log_dir, threads) for job in todo]):
                job, returncode, log_path = future.result()
                ran.append((job, returncode, log_path))
                bar.update()
                if returncode in (0, run_log.EXIT_DIVERGED) and args.publish:
                    publish_run(job)
                if returncode == run_log.EXIT_DIVERGED:
                    tqdm.write(
                        f"diverged: {job.name} (a loss or weight turned non-finite): counted, not run again"
                    )
                elif returncode != 0:
                    tqdm.write(f"failed: {job.name} (exit code {returncode}); its output: {log_path}")
    finally:
        # On Ctrl-C the runs got it too and are saving their checkpoints: wait for them,
        # and start no other.
        pool.shutdown(wait=True, cancel_futures=True)
    return ran


def failures(ran: list[tuple[Job, int, Path]]) -> list[tuple[Job, Path]]:
    return [
        (job, log_path) for job, returncode, log_path in ran if returncode not in (0, run_log.EXIT_DIVERGED)
    ]


def run_part(
    args: argparse.Namespace, part: str, sets: dict[str, list[Job]], log_dir: Path
) -> list[tuple[Job, int, Path]]:
    """Part `part`: its main runs, then what their results decide; each phase's sets added to
    `sets` before it runs. Returns the runs run (run_all's)."""
    main = plan(args, part)
    add_sets(sets, main)
    ran = run_all(flat(main), args, log_dir, f"part {part}")
    if failures(ran):
        return ran
    derived = plan_derived(args, part, main)
    add_sets(sets, derived)
    return ran + run_all(
        flat(derived), args, log_dir, f"part {part}, controls" + (" and sweep" if part == "c" else "")
    )


def add_sets(sets: dict[str, list[Job]], new: dict[str, list[Job]]) -> None:
    for name, jobs in new.items():
        sets.setdefault(name, []).extend(jobs)


# The time estimate printed before the runs start.


def runs_to_do(args: argparse.Namespace, part: str) -> Counter:
    """The part's runs without a result, by kind ("dcgan", "toy"). Its controls and sweep are
    planned from its main runs' results; until those are all in, they count as all to do."""
    main = plan(args, part)
    todo = [job for job in flat(main) if state(job) not in FINISHED]
    if not todo:
        derived = flat(plan_derived(args, part, main, record=False))
        return Counter(job.kind for job in derived if state(job) not in FINISHED)
    controls = [
        job
        for name, jobs in main.items()
        if not name.endswith("-robustness")
        for job in jobs
        if job.config in args.control_configs
    ]
    swept = part == "c" and any(job.kind == "dcgan" for job in flat(main))  # the sweep needs a DCGAN run
    sweep = len(args.dcgan_sweep_robustness) * args.sweep_seeds if swept else 0
    return Counter(job.kind for job in todo + controls) + Counter(dcgan=sweep)


def estimate(args: argparse.Namespace, todo: dict[str, Counter], steps: int, note: str = "") -> str:
    """One line: the runs to do and how long the DCGAN's take here: runs x steps / steps/s plus
    their evaluations, over the runs side by side. The toy's take minutes and are not timed."""
    dcgan, toy = (sum(counts[kind] for counts in todo.values()) for kind in ("dcgan", "toy"))
    per_part = ", ".join(f"{label}: {counts['dcgan']}" for label, counts in todo.items() if counts["dcgan"])
    what = f"{dcgan} DCGAN runs to do" + (f" ({per_part})" if per_part else "")
    what += f", and {toy} toy runs (minutes each)" if toy else ""
    if not dcgan:
        return what + note
    measured = measured_speed(args)
    if measured is None and dcgan * steps < 100 * PROBE_STEPS:
        return f"{what}: not timed (a {PROBE_STEPS}-step probe is not worth it for {dcgan * steps:,}){note}"
    speed, evaluation = measured or (
        probe_speed(args),
        EVAL_SECONDS_PER_1000_IMAGES * args.eval_samples / 1000,
    )
    if not speed > 0:
        return f"{what}: not timed (the probe run failed; the runs' logs will say why){note}"
    hours = math.ceil(dcgan / args.jobs) * (steps / speed + steps // args.eval_every * evaluation) / 3600
    where = "this CPU" if args.device == "cpu" else args.device
    return f"{what}: about {hours:.1f} h on {where} ({speed:.2f} steps/s per run, {args.jobs} at once){note}"


def grid_estimate(args: argparse.Namespace) -> str:
    """The estimate of the grid's parts, up to part b where the stress setting is missing."""
    todo, note = {}, ""
    for part in args.parts:
        try:
            todo[f"part {part}"] = runs_to_do(args, part)
        except NoStressSetting:
            note = "; the grid stops before part b, which needs its stress setting (--pilot)"
            break
    steps = args.dcgan_steps or args.dcgan_epochs * math.ceil(args.subset / 16)  # batch 16
    return estimate(args, todo, steps, note)


def measured_speed(args: argparse.Namespace) -> tuple[float, float] | None:
    """Steps/s and seconds per evaluation of one DCGAN run on this CPU at the grid's --amp: the
    medians of the finished runs in OUT made here; None without one."""
    speeds, evaluations = [], []
    for path in sorted(args.out.glob("**/config.json")):
        config = json.loads(path.read_text())
        if (
            "dcgan" not in str(config.get("script"))
            or config.get("environment", {}).get("cpu") != cpu_model()
            or config.get("args", {}).get("amp") != args.amp
            or run_status(path.parent) != "finished"
        ):
            continue
        speeds.append(np.nanmedian(run_summary.read_numeric_csv(path.parent / "log.csv")["steps_per_sec"]))
        if (path.parent / "quality.csv").is_file():
            evaluations += list(run_summary.read_numeric_csv(path.parent / "quality.csv")["eval_seconds"])
    if not speeds:
        return None
    evaluations = [seconds for seconds in evaluations if np.isfinite(seconds)]
    evaluation = (
        np.median(evaluations) if evaluations else EVAL_SECONDS_PER_1000_IMAGES * args.eval_samples / 1000
    )
    return float(np.median(speeds)), float(evaluation)


def probe_speed(args: argparse.Namespace) -> float:
    """Steps/s of one DCGAN run here: PROBE_STEPS steps with the grid's settings, one thread,
    without evaluations, in a temporary folder; NaN where the run failed."""
    with tempfile.TemporaryDirectory() as folder:
        job = dcgan_job(args, Path(folder) / "probe", "adam_adam", 0, "--no-fid", steps=PROBE_STEPS)
        environment = {**os.environ, "OMP_NUM_THREADS": "1"}
        if subprocess.run(job.command, cwd=HERE, env=environment, capture_output=True).returncode:
            return math.nan
        return float(np.nanmedian(run_summary.read_numeric_csv(job.folder / "log.csv")["steps_per_sec"]))


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
        "Losses and checks: mean ± sample std over seeds; sample quality: mean [95% t-interval "
        "over seeds] (plot_logs.py's summary.csv, configuration rows).",
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
        folders, group_by = [job.location for job in set_jobs], []
        base = sets.get(name.removesuffix(CONTROL_SUFFIX).removesuffix("-robustness"), [])
        if name.endswith(CONTROL_SUFFIX):
            folders += [job.location for job in base]
        elif name.endswith("-robustness"):
            swept, swept_seeds = {job.config for job in set_jobs}, {job.seed for job in set_jobs}
            folders += [job.location for job in base if job.config in swept and job.seed in swept_seeds]
            group_by = ["robustness"]
        runs, _ = run_summary.read_runs(folders, group_by)
        rows[name] = run_summary.summary_rows(run_summary.comparison_sets(runs))
        command = [sys.executable, "plot_logs.py", *map(str, folders), "--out", str(plots / name)]
        command += ["--group-by", *group_by] if group_by else []
        command += ["--caption", ONE_SEED_CAPTION] if one_seed(name, set_jobs) else []
        drawings[name] = Drawing(command, plots / name, drawing_inputs(command, folders))
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


def locations(sets: dict[str, list[Job]]) -> dict[str, list[Path]]:
    return {name: [job.location for job in jobs] for name, jobs in sets.items()}


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


def run_pilot(args: argparse.Namespace, log_dir: Path) -> int:
    """The stress pilot, then its table (paired_analysis.pilot_table) in pilot/pilot.md and its
    choice in pilot/pilot.json, which part b reads: in OUT and, with --publish, in DIR."""
    candidates = plan_pilot(args)
    todo = Counter(job.kind for job in flat(candidates) if state(job) not in FINISHED)
    print(estimate(args, {"pilot": todo}, PILOT_STEPS))
    failed = failures(run_all(flat(candidates), args, log_dir, "the pilot"))
    if failed:
        report_failed(failed)
        return 1
    publish_local(args, flat(candidates))
    chosen, table = paired_analysis.pilot_table(locations(candidates))
    options = STRESS_CANDIDATES[chosen]
    text = [
        "# The stress pilot (docs/benchmark_protocol.md)",
        "",
        f"adam_adam under each candidate stress setting, seeds {PILOT_SEEDS[0]}-{PILOT_SEEDS[-1]}, "
        f"{PILOT_STEPS} steps, the grid's other settings ({ema_setting(args)[1]}, --amp {args.amp}). "
        f"Chosen: {chosen}, `{options}`.",
        "",
        *table,
        "",
    ]
    for root in [args.out, args.publish] if args.publish else [args.out]:
        (root / "pilot").mkdir(parents=True, exist_ok=True)
        (root / "pilot" / "pilot.md").write_text("\n".join(text))
        (root / "pilot" / "pilot.json").write_text(json.dumps({"chosen": chosen, "options": options}) + "\n")
    print(f'pilot: {chosen} chosen; part b runs with --stress-options "{options}" (pilot/pilot.json)')
    return 0


def report_failed(failed: list[tuple[Job, Path]]) -> None:
    print(f"{len(failed)} run(s) failed; fix the cause and run the same command again to resume:")
    for job, log_path in failed:
        print(f"  {job.name}: {log_path}")


def dry_run(args: argparse.Namespace) -> int:
    """Lists the runs, part by part in the order they would run, and what would happen to each."""
    stages = [("the pilot", None)] if args.pilot else [(f"part {part}", part) for part in args.parts]
    for label, part in stages:
        try:
            jobs = flat(plan_pilot(args) if part is None else plan(args, part))
        except NoStressSetting as error:
            print(f"{label}: the grid stops here: {error}")
            return 0
        print(f"{label}:")
        for job in jobs:
            print(f"{state(job):9} {job.folder}")
        if part is not None:
            sweep = " and sweep" if part == "c" else ""
            print(f"then: {label}'s controls{sweep}, planned from these runs' results")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        return dry_run(args)
    log_dir = args.out / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    # Started in the background (`cmd &`), a process inherits SIGINT ignored: Ctrl-C or
    # `kill -INT` must still stop the grid, not only its runs.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    started = time.perf_counter()
    sets, complete = {}, []  # the sets run so far, and the parts complete
    try:
        prepare_data(args)
        if args.pilot:
            return run_pilot(args, log_dir)
        print(grid_estimate(args))
        for part in args.parts:
            ran = run_part(args, part, sets, log_dir)
            if failures(ran):
                report_failed(failures(ran))
                write_out(args, sets, complete)
                return 1
            complete.append(part)
            if ran or part == args.parts[-1]:  # else an earlier command wrote this part's results
                results = write_out(args, sets, complete)
    except (
        gan_common.RunError,
        gan_data.DataError,
        sample_quality.SampleQualityError,
        ControlError,
        NoStressSetting,
        run_summary.NotARun,
    ) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("stopped; the runs saved checkpoints: run the same command again to continue", file=sys.stderr)
        with suppress(KeyboardInterrupt):  # a second Ctrl-C: stop now
            write_out(args, sets, complete)
        return 130
    minutes = (time.perf_counter() - started) / 60
    runs = len(flat(sets))
    print(
        f"grid done in {minutes:.0f} min: {runs} runs in {args.out}/, figures in {args.out / 'plots'}/<set>/"
    )
    print(f"results table: {results or 'none (no run has a result)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
