"""The GAN-stability benchmark in one command: the four optimizer configurations (adam_adam,
casmo_adam, adam_casmo, casmo_casmo) over several seeds, on the semicircle toy and the
DCGAN, a robustness sweep of CASMO on the toy, then plot_logs.py's figures and one results
table with the machine, versions and date it was measured on.

    python benchmark.py                  # the CPU grid (about 2 hours on 2 cores)
    python benchmark.py --small          # a quick look (about 20 minutes on 2 cores)
    python benchmark.py --dataset tinyimagenet --dcgan-steps 0 --device cuda   # the full DCGAN

Runs go to OUT/<set>/<configuration>-s<seed>/, each its own process (one thread on the CPU,
so its numbers do not depend on the core count). A finished run is skipped and an
interrupted one resumed, so the command can be stopped and started again. Each run's console
output is in OUT/logs/. The figures and tables are in OUT/plots/; the results in OUT/results.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

import gan_common
import plot_logs
import sample_quality
import train_dcgan

CONFIGS = ("adam_adam", "casmo_adam", "adam_casmo", "casmo_casmo")
DEFAULT_ROBUSTNESS = 0.5  # CASMO's default, which the main grid uses
DONE_MARKER = "benchmark_done"  # written into a run folder once its script exited cleanly


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
    parser.add_argument("--toy-seeds", type=int, default=5, help="seeds 0..N-1 of every toy configuration")
    parser.add_argument("--toy-epochs", type=int, default=200)
    parser.add_argument("--dcgan-seeds", type=int, default=3, help="seeds 0..N-1 of each DCGAN configuration")
    parser.add_argument(
        "--dataset", choices=train_dcgan.DATASETS, default="shapes", help="the DCGAN's --dataset"
    )
    parser.add_argument("--data-root", type=Path, default=Path("data"), help="the DCGAN's --data-root")
    parser.add_argument("--subset", type=int, default=2048, help="the DCGAN's --subset")
    parser.add_argument(
        "--dcgan-steps", type=int, default=400, help="the DCGAN's --max-steps (0: run all --dcgan-epochs)"
    )
    parser.add_argument("--dcgan-epochs", type=int, default=50, help="the DCGAN's --epochs")
    parser.add_argument(
        "--sweep-robustness",
        type=float,
        nargs="*",
        default=[0.0, 1.0],
        help="robustness values run besides the default 0.5 for the sweep (none: no sweep)",
    )
    parser.add_argument("--sweep-configs", nargs="*", default=["casmo_casmo"], choices=CONFIGS)
    parser.add_argument("--sweep-seeds", type=int, default=2, help="seeds 0..N-1 of every sweep point")
    parser.add_argument("--device", default="cpu", help="device of every run (cpu, cuda, cuda:1, ...)")
    parser.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="runs side by side (default: the number of CPU cores on the CPU, 1 on a GPU)",
    )
    parser.add_argument("--dry-run", action="store_true", help="list the runs and what would happen to each")
    args = parser.parse_args(argv)
    if args.small:
        small = dict(toy_seeds=2, toy_epochs=60, dcgan_seeds=1, dcgan_steps=150, sweep_robustness=[])
        for name, value in small.items():
            if getattr(args, name) == parser.get_default(name):
                setattr(args, name, value)
        if args.out == parser.get_default("out"):
            args.out = Path("runs/benchmark-small")
    for name in ("toy_seeds", "dcgan_seeds", "sweep_seeds", "toy_epochs", "dcgan_epochs"):
        if getattr(args, name) < 0 or (name.endswith("epochs") and getattr(args, name) == 0):
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.jobs is None:
        args.jobs = (os.cpu_count() or 1) if args.device == "cpu" else 1
    return args


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


def plan(args: argparse.Namespace) -> dict[str, list[Job]]:
    """The runs of every set, keyed by the set's folder name."""
    python = sys.executable

    def optimizers(config: str) -> list[str]:
        g_opt, d_opt = config.split("_")
        return ["--g-opt", g_opt, "--d-opt", d_opt]

    def toy(folder: Path, config: str, seed: int, robustness: float) -> Job:
        command = [python, "train_toy2d.py", *optimizers(config), "--seed", str(seed)]
        command += ["--epochs", str(args.toy_epochs), "--robustness", str(robustness)]
        command += ["--device", args.device, "--out", str(folder)]
        resume = [python, "train_toy2d.py", "--resume", str(folder), "--epochs", str(args.toy_epochs)]
        return Job(folder, command, resume, config, seed)

    sets: dict[str, list[Job]] = {"toy2d": []}
    for config in CONFIGS:
        for seed in range(args.toy_seeds):
            folder = args.out / "toy2d" / f"{config}-s{seed}"
            sets["toy2d"].append(toy(folder, config, seed, DEFAULT_ROBUSTNESS))
    dcgan_set = f"dcgan-{args.dataset}"
    sets[dcgan_set] = []
    for config in CONFIGS:
        for seed in range(args.dcgan_seeds):
            folder = args.out / dcgan_set / f"{config}-s{seed}"
            command = [python, "train_dcgan.py", *optimizers(config), "--seed", str(seed)]
            command += ["--dataset", args.dataset, "--data-root", str(args.data_root)]
            budget = ["--epochs", str(args.dcgan_epochs)]
            budget += ["--max-steps", str(args.dcgan_steps)] if args.dcgan_steps else []
            command += ["--subset", str(args.subset), *budget]
            command += ["--log-every", "10", "--device", args.device, "--out", str(folder)]
            resume = [python, "train_dcgan.py", "--resume", str(folder), *budget]
            sets[dcgan_set].append(Job(folder, command, resume, config, seed))
    if args.sweep_robustness:
        sets["toy2d-robustness"] = [
            toy(args.out / "toy2d-robustness" / f"{config}-r{value:g}-s{seed}", config, seed, value)
            for value in args.sweep_robustness
            for config in args.sweep_configs
            for seed in range(args.sweep_seeds)
        ]
    return {name: jobs for name, jobs in sets.items() if jobs}


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
            train_dcgan.load_images(
                args.dataset, args.data_root, args.subset, seed, workers=os.cpu_count() or 1
            )
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
            command, stdout=log, stderr=subprocess.STDOUT, env=environment, cwd=Path(__file__).parent
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
    ("diversity ratio (final)", "diversity_ratio_final"),
    ("D loss (final)", "d_final"),
    ("G loss (final)", "g_final"),
    ("G loss std", "g_std"),
    ("D-dominated share", "d_dominated_share"),
    ("D collapsed", "d_collapsed"),
    ("steps/s", "steps_per_sec_median"),
]


def write_results(args: argparse.Namespace, sets: dict[str, list[Job]], rows: dict[str, list[dict]]) -> Path:
    """results.md: per set, the configuration rows of plot_logs.py's summary, with the machine
    record; machine.json beside it."""
    record = gan_common.environment()
    gpu = f", GPU {record['gpu']}" if record["gpu"] and args.device.startswith("cuda") else ""
    lines = [
        "# CASMO GAN-stability benchmark: results",
        "",
        f"Measured {record['date']} on {record['cpu']} ({record['cpu_cores']} cores){gpu}; "
        f"Python {record['python']}, torch {record['torch']}; command `{record['command']}`.",
        "Every number is mean ± sample std over seeds (plot_logs.py's summary.csv, configuration rows).",
        "",
    ]
    captions = {
        "toy2d": f"Semicircle toy, {args.toy_epochs} epochs, seeds 0-{args.toy_seeds - 1}, robustness 0.5.",
        f"dcgan-{args.dataset}": f"DCGAN on {args.dataset}, subset {args.subset}, batch 16, "
        + (f"{args.dcgan_steps} steps" if args.dcgan_steps else f"{args.dcgan_epochs} epochs")
        + f", seeds 0-{args.dcgan_seeds - 1}.",
        "toy2d-robustness": f"Robustness sweep on the toy, {args.toy_epochs} epochs, "
        f"seeds 0-{args.sweep_seeds - 1} (robustness 0.5: the main grid's runs of the same seeds).",
    }
    for name in sets:
        columns = DCGAN_COLUMNS if name.startswith("dcgan") else TOY_COLUMNS
        lines += [f"## {name}", "", captions[name], ""]
        configurations = [row for row in rows[name] if row["scope"] == "configuration"]
        lines += plot_logs.markdown_table(configurations, columns) + [""]
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sets = plan(args)
    jobs = [job for set_jobs in sets.values() for job in set_jobs]
    if args.dry_run:
        for job in jobs:
            print(f"{state(job):8} {job.folder}")
        return 0
    log_dir = args.out / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        prepare_data(args)
    except (train_dcgan.DataError, sample_quality.SampleQualityError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    try:
        failed = run_all(jobs, args, log_dir)
    except KeyboardInterrupt:
        print("stopped; the runs saved checkpoints: run the same command again to continue", file=sys.stderr)
        return 130
    if failed:
        print(f"{len(failed)} run(s) failed; fix the cause and run the same command again to resume:")
        for job, log_path in failed:
            print(f"  {job.name}: {log_path}")
        return 1
    plots, rows = args.out / "plots", {}
    for name, set_jobs in sets.items():
        folders = [str(job.folder) for job in set_jobs]
        extra = []
        if name == "toy2d-robustness":
            # The sweep's 0.5 points are the main grid's runs of the same configurations and seeds.
            folders += [
                str(job.folder)
                for job in sets.get("toy2d", [])
                if job.config in args.sweep_configs and job.seed < args.sweep_seeds
            ]
            extra = ["--group-by", "robustness"]
        try:
            rows[name] = plot_logs.report(
                plot_logs.parse_args([*folders, "--out", str(plots / name), *extra])
            )
        except plot_logs.NotARun as error:
            print(f"plot_logs.py failed on {name}: {error}", file=sys.stderr)
            return 1
    results = write_results(args, sets, rows)
    minutes = (time.perf_counter() - started) / 60
    print(f"grid done in {minutes:.0f} min: {len(jobs)} runs in {args.out}/, figures in {plots}/<set>/")
    print(f"results table: {results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
