"""What train_toy2d.py and train_dcgan.py share: the optimizer choice, resuming (arguments,
run folder, checkpoints, RNG state), stopping on a signal, the CSV log and the machine record."""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import pickle
import random
import re
import secrets
import shutil
import signal
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from casmo_ext import CASMO
from casmo_ext.bench import machine

OPTIMIZERS = ("adam", "casmo")
# D "wins outright" on a step when it rejects the fakes and is as sure of the reals as its
# labels allow: D(G(z)) below DOMINANCE_FAKE and D(x) within DOMINANCE_REAL_MARGIN of the
# real label (with label 0.9 the best D(x) is 0.9, so "near 1" means near the label).
DOMINANCE_FAKE = 0.05
DOMINANCE_REAL_MARGIN = 0.15
# The gradient noise ratio's averages span about 1 / (1 - beta) = 20 of a network's updates.
GRADIENT_NOISE_BETA = 0.95


class RunError(Exception):
    """A problem with the arguments or the run folder that the user can fix; the scripts
    print it as one line, without a traceback."""


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be positive and finite, got {text}")
    return value


def float_in(low: float, high: float, *, open_high: bool = False):
    """An argparse type: a float in [low, high], or [low, high) with `open_high`, so that a
    value the optimizers would refuse is refused with its flag's name."""
    interval = f"[{low:g}, {high:g}{')' if open_high else ']'}"

    def parse(text: str) -> float:
        value = float(text)
        if not (low <= value < high if open_high else low <= value <= high):
            raise argparse.ArgumentTypeError(f"must lie in {interval}, got {text}")
        return value

    parse.__name__ = "float"  # argparse names the type in "invalid float value: 'x'"
    return parse


def at_least(minimum: int, things: str, most: int | None = None):
    """An argparse type: an integer of at least `minimum` and, where given, at most `most`
    (`things` names what it counts)."""

    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"at least {minimum} {things} are needed, got {text}")
        if most is not None and value > most:
            raise argparse.ArgumentTypeError(f"at most {most} {things}, got {text}")
        return value

    parse.__name__ = "int"
    return parse


DEVICE_FORMS = "auto, cpu, cuda, cuda:N or mps"


def device_name(text: str) -> str:
    """--device's type: the forms pick_device knows, so that a typo fails at parsing."""
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; use {DEVICE_FORMS}")
    return text


# CASMO's knobs and their defaults; Adam ignores them.
CASMO_KNOBS = {"robustness": 0.5, "c_min": 0.1, "rel_floor": 0.1}


def add_optimizer_args(parser: argparse.ArgumentParser, lr: float = 2e-4) -> None:
    """--g-opt/--d-opt and their hyper-parameters, the same in both scripts."""
    parser.add_argument("--g-opt", choices=OPTIMIZERS, default="adam", help="generator's optimizer")
    parser.add_argument("--d-opt", choices=OPTIMIZERS, default="adam", help="discriminator's optimizer")
    parser.add_argument("--lr-g", type=positive_float, default=lr, help="generator learning rate")
    parser.add_argument("--lr-d", type=positive_float, default=lr, help="discriminator learning rate")
    parser.add_argument("--beta1", type=float_in(0, 1, open_high=True), default=0.5)
    parser.add_argument("--beta2", type=float_in(0, 1, open_high=True), default=0.999)
    parser.add_argument(
        "--robustness",
        type=float_in(0, math.inf, open_high=True),
        default=CASMO_KNOBS["robustness"],
        help="CASMO: exponent on trust (0 = off)",
    )
    parser.add_argument(
        "--c-min", type=float_in(0, 1), default=CASMO_KNOBS["c_min"], help="CASMO: floor of trust, in [0, 1]"
    )
    parser.add_argument(
        "--rel-floor",
        type=float_in(0, 1),
        default=CASMO_KNOBS["rel_floor"],
        help="CASMO: floor of focus, in [0, 1]",
    )
    parser.add_argument(
        "--label",
        default=None,
        help="the run's configuration name in plot_logs.py's figures and tables "
        "(default <g-opt>_<d-opt>), e.g. to tell a control experiment from plain Adam",
    )


def warn_unused_casmo_knobs(args: argparse.Namespace) -> None:
    """A CASMO knob set away from its default while both networks use Adam does nothing:
    say so rather than let the user believe it took effect."""
    if "casmo" in (args.g_opt, args.d_opt):
        return
    ignored = [
        "--" + name.replace("_", "-") for name, value in CASMO_KNOBS.items() if getattr(args, name) != value
    ]
    if ignored:
        verb = "acts" if len(ignored) == 1 else "act"
        print(
            f"warning: {', '.join(ignored)} {verb} only on CASMO; both networks use Adam: ignored",
            file=sys.stderr,
        )


def make_optimizer(name: str, params, lr: float, args: argparse.Namespace) -> torch.optim.Optimizer:
    """Adam or CASMO with the run's betas and CASMO knobs; an out-of-range value is a
    RunError carrying the optimizer's own message."""
    betas = (args.beta1, args.beta2)
    try:
        if name == "adam":
            return torch.optim.Adam(params, lr=lr, betas=betas)
        knobs = dict(robustness=args.robustness, c_min=args.c_min, rel_floor=args.rel_floor)
        return CASMO(params, lr=lr, betas=betas, **knobs)
    except ValueError as error:
        raise RunError(str(error)) from None


def optimizer_metrics(optimizer: torch.optim.Optimizer) -> tuple[float | None, float | None]:
    """CASMO's (agar, confidence) of its first group, or (None, None) for Adam.
    Reads the device: call it only on logged steps."""
    if isinstance(optimizer, CASMO):
        metrics = optimizer.group_metrics(0)
        return metrics["agar"], metrics["confidence"]
    return None, None


def grad_norm(parameters) -> torch.Tensor:
    """The global L2 norm of the gradients, as a device tensor (no host sync)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


def real_label(label_smooth: float, real_label_range: list[float] | None = None) -> float:
    """D's mean target for real samples: the fixed label, or the middle of the random range."""
    return label_smooth if real_label_range is None else sum(real_label_range) / 2


class GradientNoise:
    """The gradient noise ratio of one network, 1 − ‖EMA(g)‖² / EMA(‖g‖²) with both averages
    bias-corrected: 0 when every step's gradient is the same (all signal), near 1 when the
    gradients of nearby steps cancel (all noise). Adam and CASMO networks alike; one buffer
    the size of the gradients, updated on the device at every step, read on logged steps."""

    def __init__(self, parameters, beta: float = GRADIENT_NOISE_BETA):
        self.parameters = list(parameters)
        self.beta = beta
        self.mean = [torch.zeros_like(p) for p in self.parameters]
        self.square = torch.zeros((), device=self.mean[0].device)
        self.updates = 0

    def update(self) -> None:
        """Folds in the gradients the last backward pass left (an absent one counts as 0)."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.parameters]
        torch._foreach_lerp_(self.mean, grads, 1 - self.beta)
        norms = torch._foreach_norm(grads)
        self.square.lerp_(torch.stack(norms).square().sum().float(), 1 - self.beta)
        self.updates += 1

    def ratio(self) -> torch.Tensor | None:
        if self.updates == 0:
            return None
        correction = 1 - self.beta**self.updates
        mean_norm = torch.stack(torch._foreach_norm(self.mean)).square().sum() / correction**2
        ratio = 1 - mean_norm / (self.square / correction).clamp_min(torch.finfo(torch.float32).tiny)
        return ratio.clamp(0, 1)  # in [0, 1] but for rounding (‖mean‖² ≤ mean of ‖g‖²)

    def state_dict(self) -> dict:
        return {"mean": self.mean, "square": self.square, "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        for buffer, saved in zip(self.mean, state["mean"]):
            buffer.copy_(saved)
        self.square.copy_(state["square"])
        self.updates = state["updates"]


def d_dominated(d_x, d_g_z, real_label: float):
    """Whether D won outright (see DOMINANCE_FAKE); tensors or arrays, element-wise."""
    return (d_g_z < DOMINANCE_FAKE) & (d_x > real_label - DOMINANCE_REAL_MARGIN)


def pick_device(name: str) -> torch.device:
    """'auto' picks CUDA when present, else the CPU; a device this machine lacks is a RunError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RunError(f"--device {name} asked for, but there is no usable CUDA GPU; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise RunError(f"--device {name}: this machine has {count} GPU(s), cuda:0 to cuda:{count - 1}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise RunError(f"--device {name} asked for, but there is no usable Apple GPU (MPS); use --device cpu")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------
# Arguments and the run folder


def same_folder(a, b) -> bool:
    """Whether two paths name one folder ("runs/x/", "./runs/x" and its absolute form do)."""
    return Path(a).resolve() == Path(b).resolve()


def same_value(given, saved) -> bool:
    """Whether a command-line value equals the one config.json holds (both parsed by the
    same parser, so of one type; paths compare as paths)."""
    if isinstance(given, Path) and isinstance(saved, Path):
        return same_folder(given, saved)
    return given == saved


def raise_errors(parser: argparse.ArgumentParser, prefix: str) -> None:
    """Makes the parser's errors a one-line RunError starting with `prefix`, not argparse's
    usage text and exit (the scripts print a RunError as one line)."""

    def error(message: str):
        raise RunError(prefix + message)

    parser.error = error


def stored_argv(parser: argparse.ArgumentParser, stored: dict, prefix: str) -> list[str]:
    """The command line that gives config.json's `args`, so that they go through the
    parser's checks as typed flags do. Names the parser lacks (options since removed) are
    left out; options added since the run started take their defaults."""
    argv = []
    for action in parser._actions:
        if not action.option_strings or action.dest not in stored:
            continue
        option, value = action.option_strings[0], stored[action.dest]
        if value is None:
            if action.default is not None:
                raise RunError(f"{prefix}{action.dest} is null; {option} needs a value")
        elif action.nargs == 0:  # a flag: store_true, or --name/--no-name
            if not isinstance(value, bool):
                raise RunError(f"{prefix}{action.dest} must be true or false, got {value!r}")
            if value != action.default:
                negative = isinstance(action, argparse.BooleanOptionalAction) and not value
                argv.append(action.option_strings[-1 if negative else 0])
        elif isinstance(action.nargs, int) and isinstance(value, list):
            argv += [option, *map(str, value)]
        else:
            argv.append(f"{option}={value}")  # "=": a value starting with "-" stays a value
    return argv


def given_args(parser: argparse.ArgumentParser, argv: list[str] | None, parsed: argparse.Namespace) -> dict:
    """The values of the options the command line names (not the defaults)."""
    # Parse again into a namespace pre-filled with a marker: argparse fills in defaults
    # only where the namespace lacks a value, so what is not the marker was given.
    unset = object()
    probe = parser.parse_args(argv, namespace=argparse.Namespace(**dict.fromkeys(vars(parsed), unset)))
    return {name: value for name, value in vars(probe).items() if value is not unset}


def resolve_args(
    parser: argparse.ArgumentParser, argv: list[str] | None, script: str, may_change: set[str]
) -> argparse.Namespace:
    """The parsed arguments; with --resume DIR, the run's own arguments from DIR/config.json,
    parsed by the same parser. Repeating a run's value is fine; a value that differs is taken
    for the names in `may_change` and is a RunError for any other."""
    raise_errors(parser, "")
    args = parser.parse_args(argv)
    if args.resume is not None:
        args = resumed_args(parser, argv, args, script, may_change)
    warn_unused_casmo_knobs(args)
    return args


def resumed_args(
    parser, argv, args: argparse.Namespace, script: str, may_change: set[str]
) -> argparse.Namespace:
    """resolve_args' --resume DIR: config.json's arguments with the command line's changes."""
    prefix = f"{Path(args.resume) / 'config.json'} (edited?): "
    stored = read_config(Path(args.resume), script)["args"]
    raise_errors(parser, prefix)
    resumed = parser.parse_args(stored_argv(parser, stored, prefix))
    raise_errors(parser, "")
    given = given_args(parser, argv, args)
    if "out" in given and not same_folder(given.pop("out"), args.resume):
        raise RunError("--out and --resume name different folders; a resumed run writes into its own")
    for name, value in given.items():
        saved = getattr(resumed, name)
        if name in may_change or name == "resume":
            setattr(resumed, name, value)
        elif not same_value(value, saved):
            option = "--" + name.replace("_", "-")
            raise RunError(f"{option} cannot change when resuming (the run used {saved!r}, given {value!r})")
    resumed.out = args.resume
    return resumed


def read_config(run_dir: Path, script: str) -> dict:
    """The config.json of a run of `script`; a RunError otherwise."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise RunError(f"{run_dir} is not a run folder (no config.json); pass a folder a run wrote")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RunError(f"{path} is not valid JSON ({error}); was the folder edited by hand?") from None
    if not isinstance(config, dict) or not isinstance(config.get("args"), dict):
        raise RunError(f'{path} holds no "args" object; was the folder edited by hand?')
    if config.get("script") != script:
        other = config.get("script")
        raise RunError(f"{run_dir} is a run of {other!r}, not of {script}; resume it with that script")
    return config


# What a run writes into its folder besides checkpoint.pt: a folder holding any of them
# holds a run, whose record a new run must not overwrite.
RUN_FILES = ("config.json", "log.csv", "quality.csv", "samples")


def check_run_folder(run_dir: Path, resuming: bool) -> None:
    """A new run needs a folder that holds no run's files, a resumed run one with a
    checkpoint; either must be a folder this process can write."""
    check_writable_folder(run_dir, "--resume" if resuming else "--out")
    checkpoint = run_dir / "checkpoint.pt"
    if resuming and not checkpoint.is_file():
        raise RunError(
            f"{run_dir} has no checkpoint.pt (the run stopped before its first one, or it was deleted), "
            "so it cannot be resumed; its logs are kept: start the run again with another --out"
        )
    if resuming:
        return
    if checkpoint.exists():
        raise RunError(
            f"{run_dir} already holds a run; continue it with --resume {run_dir}, or pass another --out"
        )
    found = [name for name in RUN_FILES if (run_dir / name).exists()]
    if found:
        raise RunError(
            f"{run_dir} holds a run's files ({', '.join(found)}) but no checkpoint.pt, so it cannot be "
            "resumed; they are kept: pass another --out for a new run"
        )


def check_writable_folder(folder: Path, option: str) -> None:
    """A RunError unless `folder` is a folder this process may write in, or one it may
    create: checked before any data is loaded, so a bad --out costs nothing."""
    existing = Path(folder).absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = "is a file" if existing == Path(folder).absolute() else f"lies under the file {existing}"
        raise RunError(f"{option} {folder} {where}, not a folder; pass a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RunError(
            f"{option} {folder}: no permission to write in {existing}; pass a folder you can write"
        )


def code_version() -> dict | None:
    """The git commit the scripts ran from and whether tracked files differed from it (a
    run of modified code cannot be remade from the commit alone); None outside a checkout."""
    here = Path(__file__).resolve().parent

    def git(*arguments: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *arguments], cwd=here, capture_output=True, text=True, timeout=30)

    try:
        commit = git("rev-parse", "HEAD")
        status = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.TimeoutExpired):  # no git, or a hung file system
        return None
    if commit.returncode != 0 or status.returncode != 0:
        return None
    return {"commit": commit.stdout.strip(), "modified": bool(status.stdout.strip())}


def environment() -> dict:
    """The machine record of casmo_ext.bench, the code's version and the command line, for
    config.json."""
    command = " ".join([Path(sys.executable).name, *sys.argv])
    return {**machine(), "code": code_version(), "command": command}


def write_config(run_dir: Path, script: str, args: argparse.Namespace, device: torch.device, **facts) -> None:
    """config.json: the arguments, the device, `facts` of the run beyond its arguments and
    the environment."""
    config = {"script": script, "args": vars(args), "device": str(device), **facts}
    config["environment"] = environment()
    atomic_write_text(run_dir / "config.json", json.dumps(config, indent=2, default=str) + "\n")


# ---------------------------------------------------------------------------------------
# Checkpoints: written atomically, read with torch's safe loader


@dataclass
class Nets:
    """The two networks, their optimizers and their gradient noise ratios, checkpointed
    under these names (a script's subclass adds its own)."""

    generator: torch.nn.Module
    discriminator: torch.nn.Module
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    noise_g: GradientNoise | None = None
    noise_d: GradientNoise | None = None

    NAMES = ("generator", "discriminator", "opt_g", "opt_d", "noise_g", "noise_d")

    def state_dicts(self) -> dict:
        parts = {name: getattr(self, name) for name in self.NAMES}
        return {name: None if part is None else part.state_dict() for name, part in parts.items()}

    def load_state_dicts(self, checkpoint: dict, path: Path) -> None:
        """Loads what state_dicts() saved; a RunError if it does not fit these networks."""
        try:
            for name in self.NAMES:
                if getattr(self, name) is not None:
                    getattr(self, name).load_state_dict(checkpoint[name])
        except (RuntimeError, KeyError, ValueError, TypeError) as error:
            raise RunError(f"{path} does not fit this model: {error}") from None


def rng_state() -> dict:
    """Python's, NumPy's, torch's and CUDA's RNG states in types torch.load(weights_only=True)
    accepts (NumPy's key array becomes a tensor)."""
    kind, key, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(key.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, key, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, key.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def atomic_file(path: Path):
    """A temporary file beside `path` to write, renamed onto `path` when the block ends
    without an error (and removed when it does not): a crash mid-write keeps the old file.
    Its name is unique, so two processes writing the same path at once (two runs of a grid
    caching the same real images' features) each rename a complete file of their own."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkstemp: its files are private (0600), and a checkpoint or log is not.
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def save_checkpoint(path: Path, payload: dict, finite: tuple[str, ...] = ()) -> None:
    """Writes a temporary file and renames it: a crash mid-save keeps the old checkpoint.
    The entries named in `finite` (a run's networks and optimizers) must hold only finite
    values: otherwise nothing is written and Diverged is raised at the payload's step, so
    that the checkpoint a run leaves is always one of a finite state."""
    for name in finite:
        if not all_finite(state_tensors(payload[name])):
            raise Diverged(payload["step"], f"{name} state is not finite")
    with atomic_file(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: Path) -> dict:
    """torch.load with weights_only=True: a checkpoint that holds anything but tensors and
    plain values (which could run code when unpickled) is refused, not loaded."""
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive
        raise RunError(f"cannot read checkpoint {path}: it is damaged or no file torch.save wrote")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL (\S+)", str(error))
        what = f" ({found.group(1)})" if found else ""
        raise RunError(
            f"refusing checkpoint {path}: besides tensors and plain values it holds a Python object"
            f"{what}, which could run code when loaded; checkpoints of these scripts hold none"
        ) from None
    except Exception as error:  # a truncated or foreign file: say so, no traceback
        raise RunError(f"cannot read checkpoint {path} ({type(error).__name__}: {error})") from None


# ---------------------------------------------------------------------------------------
# Stopping


class StopSignal:
    """The first Ctrl-C or SIGTERM asks the run to stop after its current step and save a
    checkpoint (the script then exits with 128 + the signal's number); a second one acts at
    once (Ctrl-C raises KeyboardInterrupt, SIGTERM ends the process)."""

    def __init__(self, announce: bool = True):
        self.signum = 0
        self.announce = announce
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._request)

    def _request(self, signum, frame) -> None:
        self.signum = self.signum or signum
        self.restore()
        if self.announce:
            tqdm.write("stopping after this step (Ctrl-C again to quit at once, without saving)")

    @staticmethod
    def restore() -> None:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


# ---------------------------------------------------------------------------------------
# Divergence: a loss or a weight that is no longer finite ends the run


class Diverged(Exception):
    """The run's state stopped being finite at `step` (as log.csv numbers steps), for
    `cause` ("loss_d is nan", "generator parameters are not finite"). The scripts end the
    run on it: no checkpoint, grid or evaluation of that state, and exit code
    run_log.EXIT_DIVERGED."""

    def __init__(self, step: int, cause: str):
        super().__init__(step, cause)  # as args: the exception pickles (gathered over ranks)
        self.step, self.cause = step, cause

    def __str__(self) -> str:
        return f"diverged at step {self.step}: {self.cause}"


def state_tensors(state) -> list[torch.Tensor]:
    """The tensors of a state dict, however nested in dicts, lists and tuples."""
    if isinstance(state, torch.Tensor):
        return [state]
    if isinstance(state, dict):
        state = list(state.values())
    if isinstance(state, (list, tuple)):
        return [tensor for part in state for tensor in state_tensors(part)]
    return []


def all_finite(tensors) -> torch.Tensor:
    """Whether every value of the floating-point tensors among `tensors` is finite, as a bool
    tensor: a tensor's largest magnitude (one fused kernel for all of them) is finite exactly
    when all its values are. On the tensors' device, without waiting for it, when they share
    one; else on the CPU, after a wait for each device."""
    groups: dict[torch.device, list[torch.Tensor]] = {}
    for tensor in tensors:
        if tensor.is_floating_point() and tensor.numel():
            groups.setdefault(tensor.device, []).append(tensor.detach())
    flags = [
        torch.stack(torch._foreach_norm(group, ord=math.inf)).isfinite().all() for group in groups.values()
    ]
    if len(flags) == 1:
        return flags[0]
    return torch.tensor(all(bool(flag) for flag in flags))


class DivergenceWatch:
    """The first step at which each watched loss was not finite, and its value, kept on the
    device: observe() at every step adds a few tiny kernels and never waits for the device;
    check() reads them (one host sync) together with whether the networks' parameters and
    buffers (BatchNorm's running statistics) are finite, wherever the run is about to use
    its state (a log row, a grid, an evaluation, a checkpoint)."""

    def __init__(self, names: tuple[str, ...], device: torch.device):
        self.names = names
        self.first_step = torch.full((len(names),), -1, dtype=torch.int64, device=device)  # -1: none yet
        self.first_value = torch.zeros(len(names), device=device)
        self.checked_step = -1  # the latest step check() found finite

    def observe(self, step: int, **losses: torch.Tensor | None) -> None:
        """Notes the losses of `step`; a watched loss this step did not compute is None."""
        zero = self.first_value.new_zeros(())
        values = torch.stack(
            [zero if losses.get(name) is None else losses[name].detach().float() for name in self.names]
        )
        new = ~values.isfinite() & (self.first_step < 0)
        self.first_step = torch.where(new, step, self.first_step)
        self.first_value = torch.where(new, values, self.first_value)

    def check(self, step: int, networks: dict[str, torch.nn.Module], gather=None) -> None:
        """Raises Diverged at the earliest non-finite value so far: a loss at its step, or
        the parameters or buffers of one of `networks` at `step`. `gather` (Ranks.gather
        under torchrun) collects every process's finding, so that all of them stop alike."""
        if step == self.checked_step:  # nothing has changed since
            return
        device = self.first_value.device
        parts = {
            f"{name} {kind}": tensors
            for name, network in networks.items()
            for kind, tensors in (("parameters", network.parameters()), ("buffers", network.buffers()))
        }
        finite = torch.stack([all_finite(tensors).to(device) for tensors in parts.values()])
        values = torch.cat([self.first_step.double(), self.first_value.double(), finite.double()]).tolist()
        count = len(self.names)
        steps, losses, flags = values[:count], values[count : 2 * count], values[2 * count :]
        found = [
            Diverged(int(first), f"{name} is {loss}")
            for name, first, loss in zip(self.names, steps, losses)
            if first >= 0
        ]
        found += [Diverged(step, f"{part} are not finite") for part, ok in zip(parts, flags) if not ok]
        earliest = min(found, key=lambda diverged: diverged.step, default=None)
        everyone = [earliest] if gather is None else gather(earliest)
        earliest = min((one for one in everyone if one is not None), key=lambda one: one.step, default=None)
        if earliest is not None:
            raise earliest
        self.checked_step = step


# ---------------------------------------------------------------------------------------
# Logs


class CSVLog:
    """Appends rows to a CSV file, flushing each, so a crash loses nothing logged but at
    most the row it tore.

    On resume (`after_step`, the checkpoint's step; 0 for a new run), rows past that step
    (the run logs them again) and rows that do not parse (a torn or damaged row) are dropped
    with a warning, the file as found kept beside it (log.csv.bak), so it never holds a step
    twice nor a partial row."""

    def __init__(self, path: Path, columns: list[str], after_step: int = 0):
        self.path = Path(path)
        self.columns = columns
        if self.path.exists() and self.path.stat().st_size > 0:
            self._keep_rows_up_to(after_step)
        new_file = not self.path.exists() or self.path.stat().st_size == 0
        self._handle = open(self.path, "a", newline="")
        self._writer = csv.DictWriter(self._handle, fieldnames=columns, extrasaction="raise")
        if new_file:
            self._writer.writeheader()
            self._handle.flush()

    def _keep_rows_up_to(self, step: int) -> None:
        header, rows, unreadable = read_log_rows(self.path)
        kept = [row for row in rows if int(row["step"]) <= step]
        later = len(rows) - len(kept)
        if header == self.columns and not unreadable and not later:
            return  # as the run left it: nothing to rewrite
        backup = free_name(Path(f"{self.path}.bak"))
        shutil.copy2(self.path, backup)
        with atomic_file(self.path) as tmp, open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(kept)
        parts = [f"{unreadable} row(s) that do not parse"] if unreadable else []
        parts += [f"{later} row(s) past the checkpoint's step {step} (logged again)"] if later else []
        if parts:
            kept_as = f"the file as found is kept as {backup.name}"
            print(f"warning: {self.path}: dropped {' and '.join(parts)}; {kept_as}", file=sys.stderr)

    def write(self, row: dict) -> None:
        self._writer.writerow({key: _format(value) for key, value in row.items()})
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()


def read_log_rows(path: Path) -> tuple[list[str] | None, list[dict], int]:
    """A CSV log's header (None when it has none with a step column), its rows that parse
    (as dicts keyed by the header) and how many do not: a row with another number of
    fields, a step that is no integer, a value that is no number, or a last row without its
    newline (torn by a crash)."""
    with open(path, newline="", errors="replace") as handle:
        complete, _, torn = handle.read().rpartition("\n")
    lines = [line for line in complete.split("\n") if line.strip()]
    torn_rows = 1 if torn.strip() else 0
    header = next(csv.reader(lines[:1]), None)
    if header is None or "step" not in header:
        return None, [], len(lines) + torn_rows
    rows = []
    for fields in csv.reader(lines[1:]):
        row = dict(zip(header, fields))
        if len(fields) == len(header) and row["step"].isdigit() and all(map(is_logged_value, fields)):
            rows.append(row)
    return header, rows, len(lines) - 1 - len(rows) + torn_rows


def is_logged_value(text: str) -> bool:
    """Whether a CSV field is what the logs write: empty, a number or a bool."""
    if text in ("", "True", "False"):
        return True
    try:
        float(text)
    except ValueError:
        return False
    return True


def free_name(path: Path) -> Path:
    """`path`, or the first of path2, path3, ... that names no file."""
    candidate, number = path, 1
    while candidate.exists():
        number += 1
        candidate = Path(f"{path}{number}")
    return candidate


def _format(value):
    if value is None:
        return ""
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float):
        return f"{value:.6g}"
    return value
