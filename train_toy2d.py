"""Trains a vanilla MLP GAN on two offset semicircles in the plane, with the generator's
and the discriminator's optimizers chosen independently (Adam or CASMO).

The defaults reproduce the course report's toy GAN:

    python train_toy2d.py --g-opt adam --d-opt adam --seed 0
    python train_toy2d.py --g-opt casmo --d-opt adam --out runs/mixed
    python train_toy2d.py --resume runs/mixed --epochs 300

A run folder holds config.json, log.csv (one row per --log-every generator steps),
quality.csv (one row per evaluation), samples/epoch_XXX.png, real/generated/overlay.png,
real.csv, generated.csv and checkpoint.pt.
"""

from __future__ import annotations

import argparse
import csv
import math
import signal
import sys
import threading
import time
from itertools import islice
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from gan_common import (
    LOG_COLUMNS,
    CSVLog,
    add_optimizer_args,
    grad_norm,
    load_checkpoint,
    make_optimizer,
    optimizer_metrics,
    pick_device,
    positive_int,
    read_config,
    rng_state,
    save_checkpoint,
    seed_everything,
    set_rng_state,
    write_config,
)

SCRIPT = "train_toy2d.py"
NOISE_DIM = 100
RADIUS = 10.0  # of both arcs; their centres are (0, RADIUS) and (0, -RADIUS)
SUPPORT_TOLERANCE = 3.0  # a point is on the support within 3 radial standard deviations
EVAL_POINTS = 2000
# The real sample and the noise every evaluation uses come from this seed, not --seed,
# so that all runs, whatever their seed or optimizers, are measured against the same points.
EVAL_SEED = 20_000
# From the arcs' radius (10) down to their spread (1), each half the one before (mmd_rbf
# relies on it).
MMD_BANDWIDTHS = (8.0, 4.0, 2.0, 1.0, 0.5)
SWD_DIRECTIONS = 64  # evenly spaced over half a turn: in 2-D this covers every direction
QUALITY_COLUMNS = ["epoch", "step", "mmd", "swd", "on_support", "left_share", "right_share", "coverage_ok"]
PLOT_XLIM, PLOT_YLIM = (-16.0, 16.0), (-24.0, 24.0)


def target_probability(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The run's arguments: those given, or on --resume those of the run being resumed."""
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--epochs", type=positive_int, default=200)
    parser.add_argument("--bs", type=positive_int, default=128, help="batch size")
    parser.add_argument("--points", type=positive_int, default=10_000, help="size of the training set")
    parser.add_argument("--seed", type=int, default=0, help="seeds the training set, the models and training")
    add_optimizer_args(parser, lr=2e-4)
    parser.add_argument(
        "--d-every", type=positive_int, default=2, help="train D on batches whose index is a multiple of N"
    )
    parser.add_argument(
        "--label-smooth", type=target_probability, default=0.9, help="D's target for real points (1 = none)"
    )
    parser.add_argument("--log-every", type=positive_int, default=10, help="generator steps per log.csv row")
    parser.add_argument("--eval-every", type=positive_int, default=10, help="epochs between evaluations")
    parser.add_argument("--out", type=Path, help="run folder (default runs/toy2d-<g>_<d>-s<seed>)")
    parser.add_argument(
        "--resume", type=Path, help="continue the run in this folder (only --epochs may change)"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    args = parser.parse_args(argv)

    if args.resume is None:
        if args.out is None:
            args.out = Path(f"runs/toy2d-{args.g_opt}_{args.d_opt}-s{args.seed}")
        return args
    # allow_abbrev=False makes every option on the command line appear spelled in full.
    given = {arg.split("=")[0] for arg in argv if arg.startswith("--")}
    if given - {"--resume", "--epochs"}:
        others = ", ".join(sorted(given - {"--resume", "--epochs"}))
        parser.error(
            f"--resume reads the run's arguments from its config.json; only --epochs may change: {others}"
        )
    resumed = argparse.Namespace(**read_config(args.resume, SCRIPT)["args"])
    resumed.out = resumed.resume = args.resume
    if "--epochs" in given:
        resumed.epochs = args.epochs
    return resumed


# ---------------------------------------------------------------------------- data


def sample_semicircles(n: int, generator: torch.Generator) -> torch.Tensor:
    """n points of the target: θ ~ U(0, 2π), r ~ N(0, 1), the point at radius 10 + r and
    angle θ, moved up by 10 where π/2 ≤ θ ≤ 3π/2 (the left half) and down by 10 elsewhere."""
    theta = 2 * math.pi * torch.rand(n, generator=generator)
    radius = RADIUS + torch.randn(n, generator=generator)
    left = (theta >= math.pi / 2) & (theta <= 3 * math.pi / 2)
    shift = torch.where(left, RADIUS, -RADIUS)
    return torch.stack([radius * torch.cos(theta), radius * torch.sin(theta) + shift], dim=1)


class SemicircleDataset(Dataset):
    """`size` points of the two semicircles, drawn once from `seed`."""

    def __init__(self, size: int, seed: int):
        self.points = sample_semicircles(size, torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.points)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.points[index]


# --------------------------------------------------------------------------- models


class Generator(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(NOISE_DIM, 128),
            nn.LeakyReLU(0.2),
            nn.Linear(128, 256),
            nn.LeakyReLU(0.2),
            nn.Linear(256, 256),
            nn.LeakyReLU(0.2),
            nn.Linear(256, 2),
        )

    def forward(self, noise: torch.Tensor) -> torch.Tensor:
        return self.net(noise)


class Discriminator(nn.Module):
    """Outputs a logit: the losses take logits, which is exact where sigmoid saturates."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(2, 128),
            nn.LeakyReLU(0.2),
            nn.Dropout(0.3),
            nn.Linear(128, 256),
            nn.LeakyReLU(0.2),
            nn.Dropout(0.3),
            nn.Linear(256, 128),
            nn.LeakyReLU(0.2),
            nn.Dropout(0.3),
            nn.Linear(128, 1),
        )

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        return self.net(points).squeeze(1)


# -------------------------------------------------------------------------- quality


def kernel_means(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The mean Gaussian kernel value over all pairs (x_i, y_j), at each of MMD_BANDWIDTHS."""
    kernel = torch.cdist(x, y).square_().div_(-2 * MMD_BANDWIDTHS[0] ** 2).exp_()
    means = [kernel.mean()]
    for _ in MMD_BANDWIDTHS[1:]:
        # Halving the bandwidth raises the kernel to the 4th power. In place: the matrix
        # has millions of entries, and new ones cost more than the arithmetic.
        means.append(kernel.square_().square_().mean())
    return torch.stack(means)


def mmd_rbf(a: torch.Tensor, b: torch.Tensor) -> float:
    """Unbiased estimate of MMD² with a Gaussian kernel, averaged over MMD_BANDWIDTHS
    (0 in expectation for two samples of one distribution, so it can read slightly < 0)."""
    a, b = a.double(), b.double()
    n, m = len(a), len(b)
    # Unbiased: the within-sample means leave out the diagonal, where k(x, x) = 1.
    within_a = (kernel_means(a, a) * n * n - n) / (n * (n - 1))
    within_b = (kernel_means(b, b) * m * m - m) / (m * (m - 1))
    return float((within_a + within_b - 2 * kernel_means(a, b)).mean())


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor) -> float:
    """Wasserstein-1 distance averaged over projections on SWD_DIRECTIONS lines; a and b
    have the same number of points, so each 1-D distance is a match of sorted values."""
    angles = torch.arange(SWD_DIRECTIONS, dtype=torch.float64) * math.pi / SWD_DIRECTIONS
    directions = torch.stack([angles.cos(), angles.sin()])
    projected_a = (a.double() @ directions).sort(dim=0).values
    projected_b = (b.double() @ directions).sort(dim=0).values
    return float((projected_a - projected_b).abs().mean())


def sample_quality(generated: torch.Tensor, real: torch.Tensor) -> dict:
    """How well `generated` matches `real` (two equally sized sets of points): MMD², sliced
    W1, the share of generated points on the arc of their side, and each side's share."""
    x, y = generated[:, 0], generated[:, 1]
    left = x <= 0
    centre_y = torch.where(left, RADIUS, -RADIUS)
    distance_to_centre = torch.hypot(x, y - centre_y)
    on_support = ((distance_to_centre - RADIUS).abs() <= SUPPORT_TOLERANCE).float().mean().item()
    left_share = left.float().mean().item()
    right_share = (x > 0).float().mean().item()
    return {
        "mmd": mmd_rbf(generated, real),
        "swd": sliced_wasserstein(generated, real),
        "on_support": on_support,
        "left_share": left_share,
        "right_share": right_share,
        "coverage_ok": on_support > 0.9 and 0.35 <= left_share <= 0.65 and 0.35 <= right_share <= 0.65,
    }


def format_quality(quality: dict) -> str:
    return (
        f"mmd {quality['mmd']:.4f}  swd {quality['swd']:.3f}  on_support {quality['on_support']:.3f}  "
        f"left/right {quality['left_share']:.2f}/{quality['right_share']:.2f}  "
        f"coverage {'ok' if quality['coverage_ok'] else 'NOT ok'}"
    )


def plot_points(path: Path, title: str, *point_sets: tuple[torch.Tensor, str, str]) -> None:
    """Scatter plots (points, label, colour) sets on fixed axes, so epochs compare."""
    figure = Figure(figsize=(5, 7), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for points, label, colour in point_sets:
        axes.scatter(points[:, 0], points[:, 1], s=3, alpha=0.5, color=colour, label=label, linewidths=0)
    axes.set(title=title, xlabel="x", ylabel="y", xlim=PLOT_XLIM, ylim=PLOT_YLIM, aspect="equal")
    axes.legend(loc="upper right", markerscale=4)
    figure.savefig(path, dpi=100)


def save_points(path: Path, points: torch.Tensor) -> None:
    np.savetxt(path, points.numpy(), fmt="%.6f", delimiter=",", header="x,y", comments="")


# ------------------------------------------------------------------------- training


def main() -> None:
    args = parse_args()
    device = pick_device(args.device)
    run_dir = Path(args.out)
    resuming = args.resume is not None
    if not resuming and (run_dir / "config.json").exists():
        sys.exit(
            f"error: {run_dir} already holds a run; continue it with --resume {run_dir} or pass another --out"
        )

    seed_everything(args.seed)
    dataset = SemicircleDataset(args.points, seed=args.seed)
    # The loader shuffles with its own generator, saved in checkpoints, so a resumed run
    # sees the batches the uninterrupted run would have seen.
    loader_rng = torch.Generator().manual_seed(args.seed)
    loader = DataLoader(dataset, batch_size=args.bs, shuffle=True, generator=loader_rng)
    eval_rng = torch.Generator().manual_seed(EVAL_SEED)
    real_eval = sample_semicircles(EVAL_POINTS, eval_rng)
    eval_noise = torch.randn(EVAL_POINTS, NOISE_DIM, generator=eval_rng).to(device)

    generator = Generator().to(device)
    discriminator = Discriminator().to(device)
    try:
        opt_g = make_optimizer(args.g_opt, generator.parameters(), args.lr_g, args)
        opt_d = make_optimizer(args.d_opt, discriminator.parameters(), args.lr_d, args)
    except ValueError as error:
        sys.exit(f"error: {error}")

    # Epochs completed, batches done of the next one, generator steps taken.
    start_epoch, start_batch, step = 0, 0, 0
    # Rows of batches where D does not learn carry the figures of D's latest update; a
    # resumed run takes them from the checkpoint (CASMO's metrics are not in its state).
    grad_norm_d, d_metrics = None, (None, None)
    if resuming:
        checkpoint = load_checkpoint(run_dir / "checkpoint.pt")
        generator.load_state_dict(checkpoint["generator"])
        discriminator.load_state_dict(checkpoint["discriminator"])
        opt_g.load_state_dict(checkpoint["opt_g"])
        opt_d.load_state_dict(checkpoint["opt_d"])
        set_rng_state(checkpoint["rng"])
        loader_rng.set_state(checkpoint["loader_rng"])
        start_epoch, start_batch, step = checkpoint["epoch"], checkpoint["batch"], checkpoint["step"]
        grad_norm_d, d_metrics = checkpoint["grad_norm_d"], checkpoint["d_metrics"]
        if start_epoch >= args.epochs:
            sys.exit(f"error: {run_dir} has trained {start_epoch} epochs already; pass a larger --epochs")

    (run_dir / "samples").mkdir(parents=True, exist_ok=True)
    write_config(run_dir, SCRIPT, args, device)
    resume_after_step = step if resuming else None
    log = CSVLog(run_dir / "log.csv", LOG_COLUMNS + ["steps_per_sec"], resume_after_step)
    quality_log = CSVLog(run_dir / "quality.csv", QUALITY_COLUMNS, resume_after_step)

    def save(epochs_done: int, batches_done: int, loader_state: torch.Tensor) -> None:
        """Checkpoints the run as it stands, at the current `step`."""
        save_checkpoint(
            run_dir / "checkpoint.pt",
            {
                "generator": generator.state_dict(),
                "discriminator": discriminator.state_dict(),
                "opt_g": opt_g.state_dict(),
                "opt_d": opt_d.state_dict(),
                "rng": rng_state(),
                "loader_rng": loader_state,
                "epoch": epochs_done,
                "batch": batches_done,
                "step": step,
                "grad_norm_d": grad_norm_d,
                "d_metrics": optimizer_metrics(opt_d) if d_metrics is None else d_metrics,
            },
        )

    # Ctrl-C (or a kill) only raises a flag: the step in progress finishes, so the
    # checkpoint never holds a discriminator updated for a batch the step count misses.
    interrupted = threading.Event()
    signal.signal(signal.SIGINT, lambda signum, frame: interrupted.set())
    signal.signal(signal.SIGTERM, lambda signum, frame: interrupted.set())

    print(f"training {args.g_opt} (G) / {args.d_opt} (D) on {device}, {len(loader)} batches per epoch")
    progress = tqdm(
        range(start_epoch + 1, args.epochs + 1), initial=start_epoch, total=args.epochs, unit="epoch"
    )
    last_log_step, last_log_time = step, time.perf_counter()
    for epoch in progress:
        epoch_loader_state = loader_rng.get_state()
        batches_done = start_batch if epoch == start_epoch + 1 else 0
        for batch_index, real in islice(enumerate(loader), batches_done, None):
            real = real.to(device)
            noise = torch.randn(len(real), NOISE_DIM, device=device)
            fake = generator(noise)

            # D learns on every --d-every-th batch only. On the others it still scores the
            # batch (without a graph), so every log row has D's loss, and dropout draws the
            # same random numbers whatever --log-every is.
            train_d = batch_index % args.d_every == 0
            with torch.set_grad_enabled(train_d):
                logits_real = discriminator(real)
                logits_fake = discriminator(fake.detach())
                loss_d = F.binary_cross_entropy_with_logits(
                    logits_real, torch.full_like(logits_real, args.label_smooth)
                ) + F.binary_cross_entropy_with_logits(logits_fake, torch.zeros_like(logits_fake))
            if train_d:
                # Also clears what the previous generator step left in D's gradients.
                opt_d.zero_grad()
                loss_d.backward()
                grad_norm_d = grad_norm(discriminator.parameters())
                opt_d.step()
                d_metrics = None  # read from the optimizer when needed: no host sync here

            # G, every batch, against the freshly updated D: the non-saturating loss.
            logits_g = discriminator(fake)
            loss_g = F.binary_cross_entropy_with_logits(logits_g, torch.ones_like(logits_g))
            opt_g.zero_grad()
            loss_g.backward()
            opt_g.step()
            step += 1
            batches_done = batch_index + 1

            if step % args.log_every == 0:
                now = time.perf_counter()
                agar_g, conf_g = optimizer_metrics(opt_g)
                if d_metrics is None:
                    d_metrics = optimizer_metrics(opt_d)
                agar_d, conf_d = d_metrics
                row = {
                    "step": step,
                    "epoch": epoch,
                    "loss_d": loss_d.item(),
                    "loss_g": loss_g.item(),
                    "d_x": torch.sigmoid(logits_real).mean().item(),
                    "d_g_z": torch.sigmoid(logits_fake).mean().item(),
                    "agar_g": agar_g,
                    "conf_g": conf_g,
                    "agar_d": agar_d,
                    "conf_d": conf_d,
                    "grad_norm_g": grad_norm(generator.parameters()),
                    "grad_norm_d": grad_norm_d,
                    "steps_per_sec": (step - last_log_step) / (now - last_log_time),
                }
                log.write(row)
                last_log_step, last_log_time = step, now
                progress.set_postfix({key: f"{row[key]:.3f}" for key in ("loss_d", "loss_g", "d_x", "d_g_z")})
            if interrupted.is_set():
                break
        if interrupted.is_set():
            break

        if epoch % args.eval_every == 0 or epoch == args.epochs:
            with torch.no_grad():
                generated = generator(eval_noise).cpu()
            quality = sample_quality(generated, real_eval)
            quality_log.write({"epoch": epoch, "step": step, **quality})
            title = f"epoch {epoch}: {quality['on_support']:.0%} on support, {quality['left_share']:.0%} left"
            plot_points(
                run_dir / "samples" / f"epoch_{epoch:03d}.png",
                title,
                (real_eval, "real", "tab:blue"),
                (generated, "generated", "tab:orange"),
            )
            tqdm.write(f"epoch {epoch}  step {step}  {format_quality(quality)}")
            save(epoch, 0, loader_rng.get_state())
    progress.close()
    log.close()
    quality_log.close()

    if interrupted.is_set():
        save(epoch - 1, batches_done, epoch_loader_state)
        print(f"interrupted at step {step}; saved {run_dir / 'checkpoint.pt'}")
        print(f"continue with: python {SCRIPT} --resume {run_dir}")
        sys.exit(130)

    # The last epoch was evaluated above: `generated` and `quality` are the final ones.
    save_points(run_dir / "real.csv", real_eval)
    save_points(run_dir / "generated.csv", generated)
    plot_points(run_dir / "real.png", f"real data ({EVAL_POINTS} points)", (real_eval, "real", "tab:blue"))
    plot_points(
        run_dir / "generated.png",
        f"generated after {epoch} epochs ({EVAL_POINTS} points)",
        (generated, "generated", "tab:orange"),
    )
    plot_points(
        run_dir / "overlay.png",
        f"{args.g_opt} (G) / {args.d_opt} (D), epoch {epoch}",
        (real_eval, "real", "tab:blue"),
        (generated, "generated", "tab:orange"),
    )

    with open(run_dir / "quality.csv", newline="") as handle:
        last_evaluations = list(csv.DictReader(handle))[-3:]
    mean_on_support = sum(float(row["on_support"]) for row in last_evaluations) / len(last_evaluations)
    epochs = ", ".join(row["epoch"] for row in last_evaluations)
    print(f"final (epoch {epoch}, step {step}): {format_quality(quality)}")
    print(f"coverage over the last evaluations (epochs {epochs}): mean on_support {mean_on_support:.3f}")
    print(f"outputs in {run_dir}/: log.csv, quality.csv, samples/, *.png, real.csv, generated.csv")


if __name__ == "__main__":
    main()
