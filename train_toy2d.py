"""Trains a vanilla MLP GAN on two offset semicircles in the plane, with the generator's
and the discriminator's optimizers chosen independently (Adam or CASMO).

The defaults reproduce the course report's toy GAN:

    python train_toy2d.py --g-opt adam --d-opt adam --seed 0
    python train_toy2d.py --g-opt casmo --d-opt adam --out runs/mixed
    python train_toy2d.py --resume runs/mixed --epochs 300

A run folder holds config.json, log.csv (one row per --log-every generator steps),
quality.csv (one row per evaluation), samples/epoch_XXX.png, real/generated/overlay.png,
real.csv, generated.csv, checkpoint.pt and status.json (running, finished, stopped or
diverged; see run_log.RunStatus); with --tensorboard also tensorboard/.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

import gan_common
import run_log
from gan_common import RunError, positive_int
from gan_data import SemicircleDataset, sample_semicircles
from sample_quality import point_quality

SCRIPT = "train_toy2d.py"
EXIT_CODES = """exit codes: 0 done; 1 an error (one line on stderr); 3 diverged: D's or G's loss,
or their weights, stopped being finite (checked at each log row, evaluation and checkpoint),
and the run ended without evaluating or saving that state: checkpoint.pt stays the last
finite one, status.json names the first such step and its cause, and the run cannot be
resumed; 128 + N stopped by signal N (resume it with --resume)."""
NOISE_DIM = 100
EVAL_POINTS = 2000
# The real sample and the noise every evaluation uses come from this seed, not --seed,
# so that all runs, whatever their seed or optimizers, are measured against the same points.
EVAL_SEED = 20_000
PLOT_XLIM, PLOT_YLIM = (-16.0, 16.0), (-24.0, 24.0)
# Arguments a resumed run may change; the others must equal the run's own (config.json).
RESUME_MAY_CHANGE = {"epochs", "device", "log_every", "eval_every", "tensorboard"}


def target_probability(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--epochs", type=positive_int, default=200)
    parser.add_argument("--bs", type=positive_int, default=128, help="batch size")
    parser.add_argument("--points", type=positive_int, default=10_000, help="size of the training set")
    parser.add_argument("--seed", type=int, default=0, help="seeds the training set, the models and training")
    gan_common.add_optimizer_args(parser, lr=2e-4)
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
        "--resume",
        type=Path,
        help="continue the run in this folder; " + ", ".join(sorted(RESUME_MAY_CHANGE)) + " may change",
    )
    parser.add_argument("--device", type=gan_common.device_name, default="auto", help=gan_common.DEVICE_FORMS)
    parser.add_argument(
        "--tensorboard", action="store_true", help="also log to RUN/tensorboard/ (scalars and scatter plots)"
    )
    return parser


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


# --------------------------------------------------------- the console and the plots


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


@dataclass
class Session:
    """What stays fixed through a session: arguments, device, data, evaluation inputs, the
    watch on the losses and the run's status.json."""

    args: argparse.Namespace
    device: torch.device
    run_dir: Path
    loader: DataLoader
    loader_rng: torch.Generator  # the loader's shuffle; checkpointed, so a resumed run sees the same batches
    real_eval: torch.Tensor
    eval_noise: torch.Tensor
    watch: gan_common.DivergenceWatch
    status: run_log.RunStatus


@dataclass
class Counters:
    epoch: int = 0  # epochs completed
    batch: int = 0  # batches done of the next epoch
    step: int = 0  # generator steps
    epoch_loader_state: torch.Tensor | None = None  # loader_rng when this epoch's shuffle was drawn
    # D's figures of its latest update, which rows of batches where D does not learn carry;
    # checkpointed, since CASMO keeps its metrics outside its state dict.
    grad_norm_d: torch.Tensor | None = None
    d_metrics: tuple | None = None  # None: read them from the optimizer when needed (no host sync)


def prepare_session(args: argparse.Namespace) -> Session:
    device = gan_common.pick_device(args.device)
    dataset = SemicircleDataset(args.points, seed=args.seed)
    loader_rng = torch.Generator().manual_seed(args.seed)
    loader = DataLoader(dataset, batch_size=args.bs, shuffle=True, generator=loader_rng)
    eval_rng = torch.Generator().manual_seed(EVAL_SEED)
    real_eval = sample_semicircles(EVAL_POINTS, eval_rng)
    eval_noise = torch.randn(EVAL_POINTS, NOISE_DIM, generator=eval_rng).to(device)
    watch = gan_common.DivergenceWatch(("loss_d", "loss_g"), device)
    status = run_log.RunStatus(Path(args.out), checkpoint_step=None)
    return Session(args, device, Path(args.out), loader, loader_rng, real_eval, eval_noise, watch, status)


def build_nets(session: Session) -> gan_common.Nets:
    args = session.args
    generator = Generator().to(session.device)
    discriminator = Discriminator().to(session.device)
    opt_g = gan_common.make_optimizer(args.g_opt, generator.parameters(), args.lr_g, args)
    opt_d = gan_common.make_optimizer(args.d_opt, discriminator.parameters(), args.lr_d, args)
    noise_g = gan_common.GradientNoise(generator.parameters())
    noise_d = gan_common.GradientNoise(discriminator.parameters())
    return gan_common.Nets(generator, discriminator, opt_g, opt_d, noise_g, noise_d)


def start_or_resume(session: Session, nets: gan_common.Nets) -> Counters:
    counters = Counters()
    if session.args.resume is not None:
        checkpoint = gan_common.load_checkpoint(session.run_dir / "checkpoint.pt")
        nets.load_state_dicts(checkpoint, session.run_dir / "checkpoint.pt")
        gan_common.set_rng_state(checkpoint["rng"])
        session.loader_rng.set_state(checkpoint["loader_rng"])
        counters = Counters(checkpoint["epoch"], checkpoint["batch"], checkpoint["step"])
        counters.grad_norm_d, counters.d_metrics = checkpoint["grad_norm_d"], checkpoint["d_metrics"]
        session.status.checkpoint_step = counters.step
        if counters.epoch >= session.args.epochs:
            raise RunError(
                f"{session.run_dir} has trained {counters.epoch} epochs already; pass a larger --epochs"
            )
    (session.run_dir / "samples").mkdir(parents=True, exist_ok=True)
    gan_common.write_config(session.run_dir, SCRIPT, session.args, session.device)
    return counters


def save(
    session: Session,
    nets: gan_common.Nets,
    counters: Counters,
    epochs_done: int,
    batches_done: int,
    loader_state,
) -> None:
    """Checkpoints the run at the current step: `epochs_done` epochs and `batches_done`
    batches of the next, whose shuffle `loader_state` draws; only a finite state."""
    check_finite(session, nets, counters.step)
    d_metrics = gan_common.optimizer_metrics(nets.opt_d) if counters.d_metrics is None else counters.d_metrics
    payload = nets.state_dicts()
    payload.update(rng=gan_common.rng_state(), loader_rng=loader_state, step=counters.step)
    payload.update(
        epoch=epochs_done, batch=batches_done, grad_norm_d=counters.grad_norm_d, d_metrics=d_metrics
    )
    gan_common.save_checkpoint(session.run_dir / "checkpoint.pt", payload, finite=nets.NAMES)
    session.status.saved(counters.step)


def check_finite(session: Session, nets: gan_common.Nets, step: int) -> None:
    """Raises gan_common.Diverged once a loss or G's or D's parameters were not finite:
    called before the state is logged, evaluated or saved."""
    session.watch.check(step, {"generator": nets.generator, "discriminator": nets.discriminator})


def train_step(
    session: Session, nets: gan_common.Nets, real: torch.Tensor, counters: Counters, train_d: bool
) -> dict:
    """D's step on every --d-every-th batch, then G's; returns the batch's figures (tensors)."""
    real = real.to(session.device)
    fake = nets.generator(torch.randn(len(real), NOISE_DIM, device=session.device))
    # On the other batches D still scores the batch (without a graph), so every log row has
    # D's loss, and dropout draws the same random numbers whatever --log-every is.
    with torch.set_grad_enabled(train_d):
        logits_real = nets.discriminator(real)
        logits_fake = nets.discriminator(fake.detach())
        loss_d = F.binary_cross_entropy_with_logits(
            logits_real, torch.full_like(logits_real, session.args.label_smooth)
        ) + F.binary_cross_entropy_with_logits(logits_fake, torch.zeros_like(logits_fake))
    if train_d:
        # Also clears what the previous generator step left in D's gradients.
        nets.opt_d.zero_grad()
        loss_d.backward()
        counters.grad_norm_d = gan_common.grad_norm(nets.discriminator.parameters())
        nets.opt_d.step()
        nets.noise_d.update()
        counters.d_metrics = None
    # G, every batch, against the freshly updated D: the non-saturating loss.
    logits_g = nets.discriminator(fake)
    loss_g = F.binary_cross_entropy_with_logits(logits_g, torch.ones_like(logits_g))
    nets.opt_g.zero_grad()
    loss_g.backward()
    nets.opt_g.step()
    nets.noise_g.update()
    return {"loss_d": loss_d, "loss_g": loss_g, "logits_real": logits_real, "logits_fake": logits_fake}


def log_row(nets: gan_common.Nets, counters: Counters, epoch: int, figures: dict, seconds: float) -> dict:
    agar_g, conf_g = gan_common.optimizer_metrics(nets.opt_g)
    if counters.d_metrics is None:
        counters.d_metrics = gan_common.optimizer_metrics(nets.opt_d)
    agar_d, conf_d = counters.d_metrics
    return {
        "step": counters.step,
        "epoch": epoch,
        "loss_d": figures["loss_d"].item(),
        "loss_g": figures["loss_g"].item(),
        "d_x": torch.sigmoid(figures["logits_real"]).mean().item(),
        "d_g_z": torch.sigmoid(figures["logits_fake"]).mean().item(),
        "agar_g": agar_g,
        "conf_g": conf_g,
        "agar_d": agar_d,
        "conf_d": conf_d,
        "grad_norm_g": gan_common.grad_norm(nets.generator.parameters()),
        "grad_norm_d": counters.grad_norm_d,
        "grad_noise_g": nets.noise_g.ratio(),
        "grad_noise_d": nets.noise_d.ratio(),
        "steps_per_sec": seconds,
    }


def measure_quality(
    session: Session, nets: gan_common.Nets, epoch: int, step: int, log: run_log.RunLog
) -> tuple:
    """quality.csv's row and the epoch's scatter plot; returns the generated points and
    their quality."""
    with torch.no_grad():
        generated = nets.generator(session.eval_noise).cpu()
    quality = point_quality(generated, session.real_eval)
    log.write("quality", {"epoch": epoch, "step": step, **quality})
    title = f"epoch {epoch}: {quality['on_support']:.0%} on support, {quality['left_share']:.0%} left"
    real, fake = (session.real_eval, "real", "tab:blue"), (generated, "generated", "tab:orange")
    plot_path = session.run_dir / "samples" / f"epoch_{epoch:03d}.png"
    plot_points(plot_path, title, real, fake)
    log.image("samples", plot_path, step)
    tqdm.write(f"epoch {epoch}  step {step}  {format_quality(quality)}")
    return generated, quality


def train_epochs(
    session: Session, nets: gan_common.Nets, counters: Counters, stop: gan_common.StopSignal
) -> tuple | None:
    """Trains to --epochs, a signal or divergence, evaluating and checkpointing every
    --eval-every epochs; returns the last evaluation's points and quality (None if none was
    made). The log is closed however it ends."""
    args = session.args
    log = run_log.RunLog(
        session.run_dir, run_log.TOY_LOG_COLUMNS, run_log.TOY_QUALITY_COLUMNS, counters.step, args.tensorboard
    )
    batches = len(session.loader)
    print(f"training {args.g_opt} (G) / {args.d_opt} (D) on {session.device}, {batches} batches per epoch")
    progress = tqdm(
        range(counters.epoch + 1, args.epochs + 1), initial=counters.epoch, total=args.epochs, unit="epoch"
    )
    try:
        return run_epochs(session, nets, counters, stop, log, progress)
    finally:
        progress.close()
        log.close()


def run_epochs(
    session: Session,
    nets: gan_common.Nets,
    counters: Counters,
    stop: gan_common.StopSignal,
    log: run_log.RunLog,
    progress: tqdm,
) -> tuple | None:
    """train_epochs' loop over the epochs `progress` yields."""
    args, evaluation = session.args, None
    last_step, last_time = counters.step, time.perf_counter()
    for epoch in progress:
        counters.epoch_loader_state = session.loader_rng.get_state()
        for batch_index, real in islice(enumerate(session.loader), counters.batch, None):
            figures = train_step(session, nets, real, counters, train_d=batch_index % args.d_every == 0)
            counters.step += 1
            counters.batch = batch_index + 1
            session.watch.observe(counters.step, loss_d=figures["loss_d"], loss_g=figures["loss_g"])
            if counters.step % args.log_every == 0:
                check_finite(session, nets, counters.step)
                now = time.perf_counter()
                row = log_row(nets, counters, epoch, figures, (counters.step - last_step) / (now - last_time))
                log.write("log", row)
                last_step, last_time = counters.step, now
                progress.set_postfix({key: f"{row[key]:.3f}" for key in ("loss_d", "loss_g", "d_x", "d_g_z")})
            if stop.signum:
                break
        if stop.signum:
            break
        counters.epoch, counters.batch = epoch, 0
        if epoch % args.eval_every == 0 or epoch == args.epochs:
            check_finite(session, nets, counters.step)
            evaluation = measure_quality(session, nets, epoch, counters.step, log)
            save(session, nets, counters, epoch, 0, session.loader_rng.get_state())
    return evaluation


def finish(session: Session, step: int, generated: torch.Tensor, quality: dict) -> None:
    """The final point sets and plots, and the coverage over the last evaluations."""
    args, epoch, real = session.args, session.args.epochs, (session.real_eval, "real", "tab:blue")
    save_points(session.run_dir / "real.csv", session.real_eval)
    save_points(session.run_dir / "generated.csv", generated)
    fake = (generated, "generated", "tab:orange")
    plot_points(session.run_dir / "real.png", f"real data ({EVAL_POINTS} points)", real)
    plot_points(
        session.run_dir / "generated.png", f"generated after {epoch} epochs ({EVAL_POINTS} points)", fake
    )
    plot_points(
        session.run_dir / "overlay.png", f"{args.g_opt} (G) / {args.d_opt} (D), epoch {epoch}", real, fake
    )
    with open(session.run_dir / "quality.csv", newline="") as handle:
        last = list(csv.DictReader(handle))[-3:]
    mean_on_support = sum(float(row["on_support"]) for row in last) / len(last)
    print(f"final (epoch {epoch}, step {step}): {format_quality(quality)}")
    epochs = ", ".join(row["epoch"] for row in last)
    print(f"coverage over the last evaluations (epochs {epochs}): mean on_support {mean_on_support:.3f}")
    print(f"outputs in {session.run_dir}/: log.csv, quality.csv, samples/, *.png, real.csv, generated.csv")


def train(args: argparse.Namespace) -> None:
    if args.out is None:
        args.out = Path(f"runs/toy2d-{args.g_opt}_{args.d_opt}-s{args.seed}")
    if args.resume is not None:
        run_log.check_resumable(args.out)
    gan_common.check_run_folder(Path(args.out), resuming=args.resume is not None)
    if args.tensorboard:
        run_log.check_tensorboard()
    gan_common.seed_everything(args.seed)
    session = prepare_session(args)
    nets = build_nets(session)
    counters = start_or_resume(session, nets)
    session.status.write("running", counters.step)
    stop = gan_common.StopSignal()
    try:
        evaluation = train_epochs(session, nets, counters, stop)
        stop.restore()
        if stop.signum:
            save(session, nets, counters, counters.epoch, counters.batch, counters.epoch_loader_state)
            print(f"saved {session.run_dir / 'checkpoint.pt'}")
            resume_command = f"python {SCRIPT} --resume {session.run_dir}"
            session.status.exit_stopped(stop.signum, counters.step, resume_command)
    except gan_common.Diverged as diverged:
        stop.restore()
        session.status.exit_diverged(diverged)
    session.status.write("finished", counters.step)
    finish(session, counters.step, *evaluation)


def main(argv: list[str] | None = None) -> None:
    try:
        train(gan_common.resolve_args(build_parser(), argv, SCRIPT, RESUME_MAY_CHANGE))
    except RunError as error:
        sys.exit(f"error: {error}")
    except KeyboardInterrupt:
        sys.exit("interrupted; nothing saved since the last checkpoint")


if __name__ == "__main__":
    main()
