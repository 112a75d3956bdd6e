"""What a training run logs: the columns of log.csv and quality.csv of both scripts, defined
once here for the scripts and for plot_logs.py, and RunLog, the one writer the scripts log
through: the CSV files always and, with --tensorboard, the same rows as TensorBoard scalars
and the sample pictures as images, in RUN/tensorboard/; and status.json, how the run stands
(RunStatus writes it, read_status reads it)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch
from PIL import Image

from gan_common import CSVLog, Diverged, RunError, atomic_write_text

# RUN/status.json: how a run stands, {"status", "step", "cause", "checkpoint_step"}, written by
# the training scripts (RunStatus) and read by benchmark.py and plot_logs.py (read_status).
STATUS_FILE = "status.json"
STATUSES = ("running", "finished", "stopped", "diverged")
EXIT_DIVERGED = 3  # a training script's exit code when a loss or a weight turned non-finite


def read_status(run_dir: Path) -> dict | None:
    """The run's status.json, or None for a run without one (made before status files)."""
    path = Path(run_dir) / STATUS_FILE
    if not path.is_file():
        return None
    try:
        status = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise RunError(
            f"{path} is unreadable ({error}); delete it to treat the run as one without status"
        ) from None
    if not isinstance(status, dict) or status.get("status") not in STATUSES:
        found = status.get("status") if isinstance(status, dict) else status
        raise RunError(f"{path}: status {found!r} is none of {', '.join(STATUSES)}")
    return status


def check_resumable(run_dir: Path) -> None:
    """A RunError for a run that diverged: resumed, it would diverge again at the same step."""
    status = read_status(run_dir)
    if status is not None and status["status"] == "diverged":
        where = Path(run_dir) / STATUS_FILE
        raise RunError(
            f"{where}: the run diverged at step {status['step']} ({status['cause']}); resumed, it would "
            "diverge again at the same step (the run is deterministic): start a new run with other settings, "
            "e.g. a lower learning rate"
        )


class RunStatus:
    """Writes RUN/status.json (atomically), for read_status: "running" when a session starts
    and at each checkpoint, then "finished" (it reached --epochs or --max-steps), "stopped"
    (a signal; resumable) or "diverged" (see gan_common.Diverged). "step" is the step the
    run had reached, or for "diverged" the first step whose loss or weights were not finite;
    "cause" is null but for "diverged"; "checkpoint_step" is the step of checkpoint.pt, null
    before the first. "running" with no process at work means the run crashed or was killed.
    Under torchrun only rank 0 (`main`) writes and prints."""

    def __init__(self, run_dir: Path, checkpoint_step: int | None, main: bool = True):
        self.run_dir, self.checkpoint_step, self.main = Path(run_dir), checkpoint_step, main

    def write(self, status: str, step: int, cause: str | None = None) -> None:
        if self.main:
            record = {"status": status, "step": step, "cause": cause, "checkpoint_step": self.checkpoint_step}
            atomic_write_text(self.run_dir / STATUS_FILE, json.dumps(record, indent=2) + "\n")

    def saved(self, step: int) -> None:
        """After checkpoint.pt was written at `step`."""
        self.checkpoint_step = step
        self.write("running", step)

    def exit_stopped(self, signum: int, step: int, resume_command: str) -> NoReturn:
        """Ends a run a signal stopped (after its checkpoint): exit code 128 + the signal."""
        self.write("stopped", step)
        if self.main:
            print(f"stopped at step {step}; continue with: {resume_command}")
        sys.exit(128 + signum)

    def exit_diverged(self, diverged: Diverged) -> NoReturn:
        """Ends a run that diverged, in one line: exit code EXIT_DIVERGED."""
        self.write("diverged", diverged.step, diverged.cause)
        if self.checkpoint_step is None:
            last = "no checkpoint was written before it"
        else:
            last = f"last good checkpoint: step {self.checkpoint_step} in {self.run_dir / 'checkpoint.pt'}"
        if self.main:
            print(f"{diverged}; {last}", file=sys.stderr)
        sys.exit(EXIT_DIVERGED)


# Columns every GAN log has, in this order; each script appends its own after these.
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
    "grad_noise_g",
    "grad_noise_d",
]
TOY_LOG_COLUMNS = [*LOG_COLUMNS, "steps_per_sec"]
DCGAN_LOG_COLUMNS = [*LOG_COLUMNS, "d_g_z_after_d", "steps_per_sec"]
TOY_QUALITY_COLUMNS = [
    "epoch", "step", "mmd", "swd", "on_support", "left_share", "right_share", "coverage_ok",
    "precision", "recall", "density", "coverage",
]  # fmt: skip
# sample_quality.evaluate's measures of the DCGAN's samples, of G and, with --g-ema, of its
# moving average (columns with the suffix _ema).
SAMPLE_MEASURES = [
    "kid",
    "kid_std",
    "fid",
    "precision",
    "recall",
    "density",
    "coverage",
    "modes_covered",
    "mode_kl",
]
DCGAN_QUALITY_COLUMNS = [
    "epoch",
    "step",
    "loss_d_mean",
    "loss_g_mean",
    "d_x_mean",
    "d_g_z_mean",
    "diversity_ratio",
    "d_dominated_share",
    *SAMPLE_MEASURES,
    "diversity_ratio_ema",
    *(f"{column}_ema" for column in SAMPLE_MEASURES),
    "eval_seconds",
]
TENSORBOARD_FOLDER = "tensorboard"


def check_tensorboard() -> None:
    """A RunError naming the fix when --tensorboard is asked for without the package."""
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        raise RunError(
            "--tensorboard needs the tensorboard package: pip install tensorboard "
            "(the version requirements.txt pins), or leave --tensorboard out"
        ) from None


class TensorBoardSink:
    """RunLog's rows as scalars tagged <file>/<column> (log/loss_d, quality/kid) at their row's
    step, and pictures as images. A resumed run's writer purges the events after the
    checkpoint's step, which the stopped session wrote and the resumed one writes again, so
    the stream holds every step once, as the CSV files do."""

    def __init__(self, folder: Path, after_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(folder), purge_step=after_step + 1)

    def scalars(self, name: str, row: dict) -> None:
        for column, value in row.items():
            if column == "step" or value is None:
                continue
            value = value.item() if isinstance(value, torch.Tensor) else value
            self.writer.add_scalar(f"{name}/{column}", float(value), global_step=row["step"])

    def image(self, tag: str, path: Path, step: int) -> None:
        with Image.open(path) as picture:
            pixels = np.asarray(picture.convert("RGB"))
        self.writer.add_image(tag, pixels, global_step=step, dataformats="HWC")

    def close(self) -> None:
        self.writer.close()


class RunLog:
    """log.csv and quality.csv of a run folder and, with `tensorboard`, their TensorBoard
    twin. Rows after `after_step` (the checkpoint's step; 0 for a new run) are dropped
    first: the run logs them again, and no file holds a step twice."""

    def __init__(
        self,
        run_dir: Path,
        log_columns: list[str],
        quality_columns: list[str],
        after_step: int,
        tensorboard: bool,
    ):
        self.files = {
            "log": CSVLog(run_dir / "log.csv", log_columns, after_step),
            "quality": CSVLog(run_dir / "quality.csv", quality_columns, after_step),
        }
        self.tensorboard = TensorBoardSink(run_dir / TENSORBOARD_FOLDER, after_step) if tensorboard else None

    def write(self, name: str, row: dict) -> None:
        """A row of "log" (log.csv) or "quality" (quality.csv)."""
        self.files[name].write(row)
        if self.tensorboard is not None:
            self.tensorboard.scalars(name, row)

    def image(self, tag: str, path: Path, step: int) -> None:
        """A picture the run saved at `path`, for TensorBoard's image tab."""
        if self.tensorboard is not None:
            self.tensorboard.image(tag, path, step)

    def close(self) -> None:
        for file in self.files.values():
            file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
