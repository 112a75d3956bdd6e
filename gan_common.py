"""What train_toy2d.py and train_dcgan.py share: the optimizer choice, resuming (arguments,
run folder, checkpoints, RNG state), stopping on a signal, the CSV log and the machine record."""

from __future__ import annotations

import argparse
import csv
import json
import os
import pickle
import random
import re
import signal
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
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def add_optimizer_args(parser: argparse.ArgumentParser, lr: float = 2e-4) -> None:
    """--g-opt/--d-opt and their hyper-parameters, the same in both scripts."""
    parser.add_argument("--g-opt", choices=OPTIMIZERS, default="adam", help="generator's optimizer")
    parser.add_argument("--d-opt", choices=OPTIMIZERS, default="adam", help="discriminator's optimizer")
    parser.add_argument("--lr-g", type=positive_float, default=lr, help="generator learning rate")
    parser.add_argument("--lr-d", type=positive_float, default=lr, help="discriminator learning rate")
    parser.add_argument("--beta1", type=float, default=0.5)
    parser.add_argument("--beta2", type=float, default=0.999)
    parser.add_argument("--robustness", type=float, default=0.5, help="CASMO: exponent on trust (0 = off)")
    parser.add_argument("--c-min", type=float, default=0.1, help="CASMO: floor of trust, in [0, 1]")
    parser.add_argument("--rel-floor", type=float, default=0.1, help="CASMO: floor of focus, in [0, 1]")
    parser.add_argument(
        "--label",
        default=None,
        help="the run's configuration name in plot_logs.py's figures and tables "
        "(default <g-opt>_<d-opt>), e.g. to tell a control experiment from plain Adam",
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
    """'auto' picks CUDA when present, else the CPU; an unavailable device is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RunError(f"--device {name} asked for, but there is no usable CUDA GPU; use --device cpu")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------
# Arguments and the run folder


def same_value(given, saved) -> bool:
    """Whether a command-line value equals the one config.json holds (JSON turns paths
    into strings and tuples into lists)."""
    if isinstance(given, Path) or isinstance(saved, Path):
        return str(given) == str(saved)
    if isinstance(given, (list, tuple)) and isinstance(saved, (list, tuple)):
        return list(given) == list(saved)
    return given == saved


def resolve_args(
    parser: argparse.ArgumentParser, argv: list[str] | None, script: str, may_change: set[str]
) -> argparse.Namespace:
    """The parsed arguments; with --resume DIR, the run's own arguments from DIR/config.json.
    Repeating a run's value is fine; a value that differs is taken for the names in
    `may_change` and is a RunError for any other."""
    args = parser.parse_args(argv)
    if args.resume is None:
        return args
    config = read_config(Path(args.resume), script)
    # Parse again into a namespace pre-filled with a marker: argparse fills in defaults
    # only where the namespace lacks a value, so what is not the marker was given.
    unset = object()
    probe = parser.parse_args(argv, namespace=argparse.Namespace(**dict.fromkeys(vars(args), unset)))
    given = {name: value for name, value in vars(probe).items() if value is not unset}
    # Options added since the run started take their defaults.
    defaults = {name: parser.get_default(name) for name in vars(args)}
    resumed = argparse.Namespace(**{**defaults, **config["args"]})
    if "out" in given and not same_value(given.pop("out"), args.resume):
        raise RunError("--out and --resume name different folders; a resumed run writes into its own")
    for name, value in given.items():
        saved = getattr(resumed, name, None)
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
    except json.JSONDecodeError as error:
        raise RunError(f"{path} is not valid JSON ({error}); was the folder edited by hand?") from None
    if config.get("script") != script:
        other = config.get("script")
        raise RunError(f"{run_dir} is a run of {other!r}, not of {script}; resume it with that script")
    return config


def check_run_folder(run_dir: Path, script: str, resuming: bool) -> None:
    """A new run needs a folder holding no run (one that stopped before its first checkpoint
    may be started again); a resumed run needs one with a checkpoint."""
    checkpoint = run_dir / "checkpoint.pt"
    if resuming and not checkpoint.is_file():
        raise RunError(
            f"{run_dir} stopped before its first checkpoint, so there is nothing to resume; "
            "start it again with the same command without --resume"
        )
    if resuming:
        return
    if (run_dir / "config.json").is_file():
        read_config(run_dir, script)  # a folder of the other script is refused
    if checkpoint.exists():
        raise RunError(
            f"{run_dir} already holds a run; continue it with --resume {run_dir}, or pass another --out"
        )


def environment() -> dict:
    """The machine record of casmo_ext.bench and the command line, for config.json."""
    return {**machine(), "command": " ".join([Path(sys.executable).name, *sys.argv])}


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


def atomic_write_text(path: Path, text: str) -> None:
    tmp = Path(f"{path}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(path: Path, payload: dict) -> None:
    """Writes a temporary file and renames it: a crash mid-save keeps the old checkpoint."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(f"{path}.tmp")
    torch.save(payload, tmp)
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


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


def exit_stopped(signum: int, step: int, resume_command: str) -> None:
    print(f"stopped at step {step}; continue with: {resume_command}")
    sys.exit(128 + signum)


# ---------------------------------------------------------------------------------------
# Logs


class CSVLog:
    """Appends rows to a CSV file, flushing each, so a crash loses nothing logged.

    Rows logged after `after_step` (the checkpoint's step; 0 for a new run) are dropped
    first: the run logs them again, and the file never holds a step twice."""

    def __init__(self, path: Path, columns: list[str], after_step: int = 0):
        self.path = Path(path)
        self.columns = columns
        if self.path.exists():
            self._truncate_after(after_step)
        new_file = not self.path.exists() or self.path.stat().st_size == 0
        self._handle = open(self.path, "a", newline="")
        self._writer = csv.DictWriter(self._handle, fieldnames=columns, extrasaction="raise")
        if new_file:
            self._writer.writeheader()
            self._handle.flush()

    def _truncate_after(self, step: int) -> None:
        with open(self.path, newline="") as handle:
            rows = [row for row in csv.DictReader(handle) if row.get("step") and int(row["step"]) <= step]
        with open(f"{self.path}.tmp", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        os.replace(f"{self.path}.tmp", self.path)

    def write(self, row: dict) -> None:
        self._writer.writerow({key: _format(value) for key, value in row.items()})
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()


def _format(value):
    if value is None:
        return ""
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float):
        return f"{value:.6g}"
    return value
