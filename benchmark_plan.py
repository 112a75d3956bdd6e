"""The grid's runs: which runs each part of docs/benchmark_protocol.md has, with the command
that starts each and the one that resumes it; where a run's files are (its folder in OUT, else
its published copy) and what the grid does with it (state); the runs that other runs' results
decide: the controls at CASMO's mean step, the DCGAN's robustness sweep, part b's stress
setting from the pilot's choice. benchmark.py runs them; benchmark_report.py writes their
results."""

from __future__ import annotations

import argparse
import json
import math
import shlex
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import gan_common
import paired_analysis
import run_log
import run_summary
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
DCGAN_BATCH = 16  # train_dcgan.py's default --bs, which every grid run keeps
FINISHED = ("done", "diverged", "published")  # the states of a run with a result


class ControlError(Exception):
    """The runs a control is derived from are missing or unreadable."""


class NoStressSetting(Exception):
    """Part b is next, and neither --stress-options nor the pilot's choice gives its setting."""


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
    budget = step_budget(args, args.dcgan_steps if steps is None else steps, options)
    command += ["--device", args.device, *budget, *options, "--out", str(folder)]
    resume = [python, "train_dcgan.py", "--resume", str(folder), *budget]
    return Job(folder, command, resume, config, seed, published_copy(args, folder))


def step_budget(args: argparse.Namespace, steps: int, options: tuple[str, ...]) -> list[str]:
    """train_dcgan.py's --epochs and --max-steps. A run of `steps` steps gets as many epochs as
    they take on its own --subset (a stress setting's may be smaller), so that --dcgan-epochs
    cannot end it first; without `steps`, --dcgan-epochs."""
    if not steps:
        return ["--epochs", str(args.dcgan_epochs)]
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--subset", type=int, default=args.subset)
    steps_per_epoch = max(1, own.parse_known_args(list(options))[0].subset // DCGAN_BATCH)
    epochs = max(args.dcgan_epochs, math.ceil(steps / steps_per_epoch))
    return ["--epochs", str(epochs), "--max-steps", str(steps)]


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
    """control.json of a control set: per configuration the rates, those of an earlier start kept
    (from OUT, else from the published copy: a grid continued on another machine); written (and
    published) with `record`."""
    path = folder / "control.json"
    published = published_copy(args, folder)
    earlier = path if path.is_file() or published is None else published / "control.json"
    rates = json.loads(earlier.read_text()) if earlier.is_file() else {}
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


def locations(sets: dict[str, list[Job]]) -> dict[str, list[Path]]:
    return {name: [job.location for job in jobs] for name, jobs in sets.items()}
