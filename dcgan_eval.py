"""The DCGAN's evaluations during training (train_dcgan.py): the sample grids, the diversity
ratio with its mode-collapse warning, and quality.csv's rows, for G and for its moving average
(--g-ema or --g-ema-kimg). The measures themselves are sample_quality's. None of them looks
at a state that is not finite (dcgan_run.check_finite)."""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

import torch
import torch.nn as nn
from PIL import Image

import sample_quality
from dcgan_run import Training, check_finite
from run_log import SAMPLE_MEASURES
from run_summary import COLLAPSE_RATIO

EVAL_BATCH = 250  # generated images per forward pass at an evaluation
COLLAPSE_GRACE_STEPS = 500
STABILISER_HINT = (
    "try --lr-d 5e-5, --instance-noise 0.1, --d-every 2, --label-smooth 0.8, "
    "--real-label-range 0.7 1.0 or --d-dropout 0.3"
)
# What the console shows of a quality.csv row.
QUALITY_SHOWN = (
    "loss_d_mean", "loss_g_mean", "diversity_ratio", "kid", "fid", "precision", "recall", "coverage",
    "modes_covered", "kid_ema", "fid_ema", "eval_seconds",
)  # fmt: skip


@contextlib.contextmanager
def scoring_only(module: nn.Module, device: torch.device):
    """No graph, and the training goes on as if the forward passes inside never ran: they
    draw none of its random numbers and leave BatchNorm's running statistics as they were."""
    buffers = [buffer.clone() for buffer in module.buffers()]
    with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        yield
        for buffer, saved in zip(module.buffers(), buffers):
            buffer.copy_(saved)


def save_grid(images: torch.Tensor, path: Path, columns: int = 8, padding: int = 2) -> None:
    """Generator output in [-1, 1] as one image file: `columns` images a row, `padding` black
    pixels around each. Drawn here rather than by torchvision, whose import costs each run
    seconds (it loads torch._dynamo)."""
    pixels = sample_quality.from_tanh(images)
    count, channels, height, width = pixels.shape
    columns = min(columns, count)
    rows = math.ceil(count / columns)
    size = (padding + rows * (height + padding), padding + columns * (width + padding))
    canvas = torch.zeros(channels, *size, dtype=torch.uint8)
    for index, image in enumerate(pixels):
        top = padding + (index // columns) * (height + padding)
        left = padding + (index % columns) * (width + padding)
        canvas[:, top : top + height, left : left + width] = image
    Image.fromarray(canvas.permute(1, 2, 0).squeeze(2).numpy()).save(path)


@torch.no_grad()
def write_grid(training: Training, name: str) -> None:
    """samples/<name> (and samples/ema/<name> with G's moving average): G's images of the
    fixed grid noise; while the logs are open, also TensorBoard images at the current step."""
    check_finite(training)
    session, nets = training.session, training.nets
    samples, step = session.run_dir / "samples", training.counters.step
    # Train-mode BatchNorm, as in the PyTorch example: early running statistics lag far
    # behind the batch ones. The running statistics this updates are never used in training.
    # Every rank runs G (SyncBatchNorm's forward is a collective); rank 0 saves.
    with session.autocast():
        grid = nets.generator(session.grid_noise).float()
    if session.ranks.is_main:
        save_grid(grid, samples / name)
        if training.logs is not None:
            training.logs.image("samples", samples / name, step)
    if nets.g_ema is not None:
        with scoring_only(nets.g_ema.module, session.ranks.device), session.autocast():
            grid = nets.g_ema.module(session.grid_noise).float()
        if session.ranks.is_main:
            (samples / "ema").mkdir(exist_ok=True)
            save_grid(grid, samples / "ema" / name)
            if training.logs is not None:
                training.logs.image("samples_ema", samples / "ema" / name, step)


@torch.no_grad()
def measure_diversity(training: Training) -> float:
    session, step = training.session, training.counters.step
    with session.autocast():
        generated = training.nets.generator(session.diversity_noise[: len(session.real_reference)]).float()
    ratio = sample_quality.diversity_ratio(generated, session.real_reference)
    # A fresh G draws near-identical images; judge collapse only once it had time to spread.
    if ratio < COLLAPSE_RATIO and step >= min(session.steps_per_epoch, COLLAPSE_GRACE_STEPS):
        session.ranks.say(
            f"warning: step {step}: generated images are far less varied than real ones (diversity "
            f"ratio {ratio:.2f}), a sign of mode collapse; {STABILISER_HINT}"
        )
    return ratio


@torch.no_grad()
def sample_metrics(training: Training, generator: nn.Module, suffix: str = "") -> dict:
    """sample_quality's measures of --eval-samples images of `generator` (rank 0, without
    --no-fid), named with `suffix`. Every rank generates (SyncBatchNorm's forward is a
    collective); generating changes nothing in the training (scoring_only)."""
    session = training.session
    # Only rank 0 scores; the other ranks generate only to join SyncBatchNorm's collectives.
    if session.args.no_fid or (session.reference is None and not session.args.sync_bn):
        return {}
    images = []
    with scoring_only(generator, session.ranks.device):
        for noise in session.eval_noise.split(EVAL_BATCH):
            with session.autocast():
                # As floats: evaluate scores NaN output as NaN, where bytes would be black.
                images.append(generator(noise).float().cpu())
    if session.reference is None:
        return {}
    metrics = sample_quality.evaluate(torch.cat(images), session.reference, session.feature_space)
    return {f"{name}{suffix}": metrics[name] for name in SAMPLE_MEASURES if name in metrics}


def measure_quality(training: Training) -> None:
    """quality.csv's row: the means over the steps since the last row, the diversity ratio
    and the sample-quality measures, of G and of its moving average."""
    check_finite(training)
    session, nets, counters = training.session, training.nets, training.counters
    start = time.perf_counter()
    row = {"epoch": counters.epoch, "step": counters.step, **training.sums.means(session.ranks)}
    row["diversity_ratio"] = measure_diversity(training)
    row.update(sample_metrics(training, nets.generator))
    if nets.g_ema is not None:
        ema = nets.g_ema.module
        with scoring_only(ema, session.ranks.device), session.autocast():
            generated = ema(session.diversity_noise[: len(session.real_reference)]).float()
        row["diversity_ratio_ema"] = sample_quality.diversity_ratio(generated, session.real_reference)
        row.update(sample_metrics(training, ema, "_ema"))
    row["eval_seconds"] = time.perf_counter() - start
    training.logs.write("quality", row)
    training.logs.last_row_step = counters.step
    shown = [key for key in QUALITY_SHOWN if key in row]
    summary = " ".join(f"{key} {row[key]:.4g}" for key in shown)
    session.ranks.say(f"epoch {counters.epoch}/{session.args.epochs} step {counters.step}: {summary}")
    training.sums.values.zero_()
