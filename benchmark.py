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
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import gan_common
import gan_data
import paired_analysis
import run_log
import run_summary
import sample_quality
import speed_settings
from benchmark_plan import (
    CONFIGS,
    DCGAN_BATCH,
    DONE_MARKER,
    FINISHED,
    HERE,
    PARTS,
    PILOT_SEEDS,
    PILOT_STEPS,
    STRESS_CANDIDATES,
    ControlError,
    Job,
    NoStressSetting,
    dcgan_job,
    ema_setting,
    flat,
    locations,
    plan,
    plan_derived,
    plan_pilot,
    run_status,
    state,
)
from benchmark_report import publish_local, publish_run, write_out
from casmo_ext.bench import cpu_model

# The time estimate: a probe of PROBE_STEPS steps where no run here has been timed yet, for
# at least 100 times its steps; an evaluation (1,000 images, G and EMA G) took about 15 s
# on the 2-core Xeon of the 2026-12-02 grid (eval_seconds in docs/results).
PROBE_STEPS = 30
EVAL_SECONDS_PER_1000_IMAGES = 15.0


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


def prepare_data(args: argparse.Namespace) -> None:
    """Downloads and decodes the DCGAN's images once, before runs start side by side (each
    would otherwise download the same archive): every seed's subset lands in the cache the
    runs read. The same for the feature space of the sample-quality measures."""
    if args.dataset != "shapes":
        seeds = PILOT_SEEDS if args.pilot else range(dcgan_seed_count(args))
        for seed in seeds:
            gan_data.load_images(args.dataset, args.data_root, args.subset, seed, workers=os.cpu_count() or 1)
    # The feature space too (Inception's weights are downloaded once, here, not by every run).
    sample_quality.feature_space_for(args.dataset)


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
    if todo:
        check_feature_space([job for job, what_now in zip(jobs, states) if what_now in FINISHED], args)
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


def check_feature_space(finished: list[Job], args: argparse.Namespace) -> None:
    """Stops before runs are added beside finished ones scored in another feature space (e.g.
    published with another shapes classifier than the one shipped): their KIDs could not be
    compared with the new runs'."""
    scored = {}
    for job in finished:
        if job.kind == "dcgan":
            space = run_summary.read_config(job.location).get("feature_space")
            scored.setdefault(space, job.location)
    scored.pop(None, None)  # a run that diverged before its first evaluation
    if not scored:
        return
    current = sample_quality.feature_space_for(args.dataset).name
    for space, path in scored.items():
        if space != current:
            raise gan_common.RunError(
                f"{path} was scored in feature space {space}, this checkout's is {current}: KIDs in the "
                f"two cannot be compared. To run its set again, move the runs scored in {space} out of "
                f"{path.parent}"
            )


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
    steps = args.dcgan_steps or args.dcgan_epochs * (args.subset // DCGAN_BATCH)
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
