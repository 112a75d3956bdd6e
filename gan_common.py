"""What train_toy2d.py and train_dcgan.py share: the optimizer choice, the run folder,
the CSV log, atomic checkpoints and resuming, RNG state, device choice."""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import random
import sys
from pathlib import Path

import numpy as np
import torch

from casmo_ext import CASMO, build_info
from casmo_ext.bench import cpu_model

OPTIMIZERS = ("adam", "casmo")
# Columns every GAN log has, in this order; a script appends its own after these.
LOG_COLUMNS = [
    "step",
    "epoch",
    "loss_d",
    "loss_g",
    "d_x",
    "d_g_z",
    "agar_g",
    "conf_g",
    "agar_d",
    "conf_d",
    "grad_norm_g",
    "grad_norm_d",
]


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


def make_optimizer(name: str, params, lr: float, args: argparse.Namespace) -> torch.optim.Optimizer:
    """Adam or CASMO with the run's betas and CASMO knobs. Raises ValueError with the
    optimizer's own message for an out-of-range value."""
    betas = (args.beta1, args.beta2)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=betas)
    if name == "casmo":
        return CASMO(
            params, lr=lr, betas=betas, robustness=args.robustness, c_min=args.c_min, rel_floor=args.rel_floor
        )
    raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


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


def pick_device(name: str) -> torch.device:
    """'auto' picks CUDA when present, else the CPU; an unavailable device is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"error: --device {name} asked for, but there is no usable CUDA GPU; use --device cpu")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def environment() -> dict:
    """Versions and machine, recorded in config.json next to the arguments."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "processor": cpu_model(),
        "cpu_threads": torch.get_num_threads(),
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "casmo_ext": build_info(),
        "command": " ".join(sys.argv),
    }


def write_config(
    run_dir: Path, script: str, args: argparse.Namespace, device: torch.device, extra: dict | None = None
) -> None:
    """config.json: the arguments, the device, `extra` (facts of the run beyond its arguments)
    and the environment."""
    config = {"script": script, "args": vars(args), "device": str(device), **(extra or {})}
    config["environment"] = environment()
    atomic_write_text(run_dir / "config.json", json.dumps(config, indent=2, default=str) + "\n")


def read_config(run_dir: Path, script: str) -> dict:
    """The config.json of a run of `script`; exits with a clear message otherwise."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        sys.exit(f"error: {run_dir} is not a run folder (no config.json); pass a folder a run wrote")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        sys.exit(f"error: {path} is not valid JSON ({error}); was the folder edited by hand?")
    if config.get("script") != script:
        other = config.get("script")
        sys.exit(f"error: {run_dir} is a run of {other!r}, not of {script}; resume it with that script")
    return config


def atomic_write_text(path: Path, text: str) -> None:
    tmp = Path(f"{path}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(path: Path, payload: dict) -> None:
    """Writes a temporary file and renames it: a crash mid-save keeps the old checkpoint."""
    tmp = Path(f"{path}.tmp")
    torch.save(payload, tmp)
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict:
    if not Path(path).is_file():
        sys.exit(f"error: no checkpoint at {path}; the run stopped before its first save, start it afresh")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # a truncated or foreign file: say so, no traceback
        sys.exit(f"error: cannot read checkpoint {path} ({type(error).__name__}: {error})")


class CSVLog:
    """Appends rows to a CSV file, flushing each, so a crash loses nothing logged.

    On resume, rows logged after the checkpoint's step are dropped first: the resumed
    run logs them again, and the file never holds a step twice."""

    def __init__(self, path: Path, columns: list[str], resume_after_step: int | None = None):
        self.path = Path(path)
        self.columns = columns
        if resume_after_step is not None and self.path.exists():
            self._truncate_after(resume_after_step)
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
