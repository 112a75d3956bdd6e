"""DCGAN at 64x64 with the generator's and the discriminator's optimizers chosen apart
(Adam or CASMO). The defaults are the benchmark: a 20k-image subset of Tiny ImageNet spread
over all 200 classes, batch 16, lr 2e-4, betas (0.5, 0.999), real label 0.9, 50 epochs.

    python train_dcgan.py --g-opt casmo --d-opt adam
    python train_dcgan.py --dataset shapes --subset 2048 --max-steps 400   # offline demo
    python train_dcgan.py --resume runs/dcgan-tinyimagenet-casmo_adam-s0 --epochs 80
    torchrun --nproc_per_node 4 train_dcgan.py --g-opt casmo --d-opt casmo   # 4 GPUs, DDP

A run folder holds config.json, log.csv (every --log-every steps), quality.csv (one row
per epoch), samples/*.png (8x8 grids of one fixed noise batch), checkpoint.pt and
status.json (running, finished, stopped or diverged; see run_log.RunStatus); a run under
torchrun also writes replicas.json (whether all processes ended with the same weights), and
one with --tensorboard tensorboard/ (the rows of both CSV files and the grids).

G's moving average, evaluated beside G (quality.csv's *_ema columns, samples/ema/): either
--g-ema DECAY, a fixed decay per step, or --g-ema-kimg K, StyleGAN2-ADA's: a half-life of K
thousand images, capped by --g-ema-rampup R (default 0.05; 0: no cap) at R times the images
seen, so that it follows G closely early on.

Divergence: once D's or G's loss, or G's or D's weights, stop being finite, the run ends:
no grid, evaluation or checkpoint of that state (checkpoint.pt stays the last finite one),
status.json says "diverged" with the first such step and its cause, and the exit code is 3.
It is checked at each log row, grid, evaluation and checkpoint (the losses of every step are
noted on the device, without waiting for it). Under --amp fp16 the gradients that overflow
and the loss scaler skips are not divergence (gradients are not watched); the losses are
computed in fp32 from fp16 logits, so one that is not finite means the forward pass itself
overflowed, which the scaler cannot cure: divergence. Such a run cannot be resumed.

Exit codes: 0 done, 1 an error (one line on stderr), 3 diverged, 128 + N stopped by signal
N (resume it with --resume).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import gan_common
import gan_ddp
import run_log
import sample_quality
import speed_settings
from dcgan_eval import STABILISER_HINT, measure_diversity, measure_quality, scoring_only, write_grid
from dcgan_run import (
    G_EMA_RAMPUP,
    GRID_SAMPLES,
    NZ,
    Nets,
    Session,
    StepResult,
    Training,
    check_finite,
    open_logs,
    prepare_session,
    quality_reference,
    read_checkpoint,
    save,
    start_or_resume,
)
from gan_common import RunError, positive_float, positive_int
from gan_data import DATASETS, DataError, load_images, to_unit
from sample_quality import SampleQualityError

SCRIPT = "train_dcgan.py"
DOMINANCE_PATIENCE_STEPS = 200  # warn once D has won outright (gan_common.d_dominated) this long
# Arguments a resumed run may change; the others must equal the run's own (config.json).
RESUME_MAY_CHANGE = {
    "epochs", "max_steps", "device", "channels_last", "log_every", "sample_every", "workers", "eval_every",
    "inception_weights", "tensorboard", "grid_samples",
}  # fmt: skip


def label_range(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"a label must lie in [0, 1], got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", choices=DATASETS, default="tinyimagenet")
    data.add_argument(
        "--data-root",
        type=Path,
        default=Path("data"),
        help="holds tiny-imagenet-200/ (downloaded when missing), torchvision datasets, or the "
        "images of --dataset folder; decoded subsets are cached in DATA_ROOT/cache",
    )
    data.add_argument("--subset", type=positive_int, default=20000, help="images drawn, over all classes")
    data.add_argument("--workers", type=positive_int, default=4, help="decode threads for the one-time cache")
    train = parser.add_argument_group("training")
    train.add_argument("--epochs", type=positive_int, default=50)
    train.add_argument("--max-steps", type=positive_int, default=None, help="stop after this many steps")
    train.add_argument("--bs", type=positive_int, default=16, help="batch size")
    gan_common.add_optimizer_args(train)
    train.add_argument(
        "--amp",
        choices=("auto", "off", "bf16", "fp16"),
        default="auto",
        help="autocast: bf16 on the CPU or CUDA, fp16 (with a loss scaler) on CUDA; auto: bf16 where "
        "the device computes it natively, else off (fp32)",
    )
    train.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="channels_last memory format for both networks (default: on the CPU, except under "
        "emulated bf16)",
    )
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--device", type=gan_common.device_name, default="auto", help=gan_common.DEVICE_FORMS)
    train.add_argument(
        "--sync-bn",
        action="store_true",
        help="under torchrun on GPUs: BatchNorm statistics over the global batch, not each process's",
    )
    stabilisers = parser.add_argument_group("stabilisers (the benchmark uses none but --label-smooth 0.9)")
    stabilisers.add_argument(
        "--label-smooth", type=label_range, default=0.9, help="D's target for real images"
    )
    stabilisers.add_argument(
        "--real-label-range", type=label_range, nargs=2, metavar=("LO", "HI"), help="random real targets"
    )
    stabilisers.add_argument(
        "--fake-label-range", type=label_range, nargs=2, metavar=("LO", "HI"), help="random fake targets"
    )
    stabilisers.add_argument(
        "--instance-noise", type=float, default=0.0, metavar="STD", help="noise on D's inputs, annealed to 0"
    )
    stabilisers.add_argument("--d-every", type=positive_int, default=1, help="train D every N steps")
    stabilisers.add_argument("--d-dropout", type=float, default=0.0, metavar="P", help="dropout in D")
    add_evaluation_args(parser)
    add_output_args(parser)
    return parser


def add_output_args(parser: argparse.ArgumentParser) -> None:
    output = parser.add_argument_group("output")
    output.add_argument(
        "--out", type=Path, default=None, help="run folder (default runs/dcgan-<dataset>-<g>_<d>-s<seed>)"
    )
    output.add_argument("--resume", type=Path, default=None, metavar="DIR", help="continue the run in DIR")
    output.add_argument("--log-every", type=positive_int, default=50, help="log.csv row every N steps")
    output.add_argument("--sample-every", type=positive_int, default=None, help="grid every N steps")
    output.add_argument(
        "--grid-samples",
        type=gan_common.at_least(1, "images", most=GRID_SAMPLES),
        default=GRID_SAMPLES,
        help="images in each grid, 8 a row: the first N of the same fixed noise",
    )
    output.add_argument(
        "--tensorboard", action="store_true", help="also log to RUN/tensorboard/ (scalars and grids)"
    )


def add_evaluation_args(parser: argparse.ArgumentParser) -> None:
    evaluation = parser.add_argument_group("evaluation (sample quality, in quality.csv)")
    evaluation.add_argument(
        "--eval-every", type=positive_int, default=None, metavar="STEPS", help="default: at each epoch's end"
    )
    evaluation.add_argument(
        "--eval-samples",
        type=gan_common.at_least(sample_quality.MIN_SAMPLES, "images"),
        default=2000,
        help="generated (and real) images",
    )
    evaluation.add_argument(
        "--inception-weights",
        default=None,
        metavar="PATH",
        help="a local copy of torch-fidelity's Inception weights",
    )
    evaluation.add_argument("--no-fid", action="store_true", help="skip KID/FID/precision/recall/modes")
    average = evaluation.add_mutually_exclusive_group()
    average.add_argument(
        "--g-ema",
        type=float,
        default=None,
        metavar="DECAY",
        help="also keep and evaluate G's moving average, with a fixed decay per step",
    )
    average.add_argument(
        "--g-ema-kimg",
        type=positive_float,
        default=None,
        metavar="K",
        help="also keep and evaluate G's moving average, with a half-life of K thousand images "
        "(StyleGAN2-ADA's ema_kimg)",
    )
    evaluation.add_argument(
        "--g-ema-rampup",
        type=gan_common.float_in(0, math.inf, open_high=True),
        default=G_EMA_RAMPUP,
        metavar="R",
        help="with --g-ema-kimg: cap the half-life at R times the images seen so far (0: no cap)",
    )
    evaluation.add_argument(
        "--score-images",
        default=None,
        metavar="DIR",
        help="score a folder of 64x64 images against --dataset; exit",
    )


def check_args(args: argparse.Namespace, device: torch.device) -> None:
    if args.amp == "fp16" and device.type != "cuda":
        raise RunError(f"--amp fp16 needs a CUDA device; on {device} use --amp bf16 or leave --amp off")
    if not 0.0 <= args.d_dropout < 1.0:
        raise RunError(f"--d-dropout must lie in [0, 1), got {args.d_dropout}")
    if args.g_ema is not None and not 0.0 < args.g_ema < 1.0:
        raise RunError(f"--g-ema is a decay in (0, 1), e.g. 0.999; got {args.g_ema}")
    if args.g_ema_kimg is None and args.g_ema_rampup != G_EMA_RAMPUP:
        raise RunError("--g-ema-rampup acts only on --g-ema-kimg's average; pass --g-ema-kimg K too")
    if args.instance_noise < 0:
        raise RunError(f"--instance-noise must be >= 0, got {args.instance_noise}")
    if not args.no_fid and args.subset < sample_quality.MIN_SAMPLES:
        raise RunError(
            f"--subset {args.subset}: at least {sample_quality.MIN_SAMPLES} images are needed to score "
            "samples; pass a larger --subset, or --no-fid"
        )
    for option, bounds in (
        ("--real-label-range", args.real_label_range),
        ("--fake-label-range", args.fake_label_range),
    ):
        if bounds is not None and bounds[0] > bounds[1]:
            raise RunError(f"{option} LO HI needs LO <= HI, got {bounds[0]} {bounds[1]}")


# ---------------------------------------------------------------------------------------
# Models: the DCGAN of Radford et al. (2016), as in the PyTorch example, with D emitting a
# logit so the loss is binary_cross_entropy_with_logits (autocast refuses BCELoss).


class Generator(nn.Module):
    def __init__(self, nz: int = NZ, width: int = 64):
        super().__init__()
        self.main = nn.Sequential(
            nn.ConvTranspose2d(nz, width * 8, 4, 1, 0, bias=False),  # 4x4
            nn.BatchNorm2d(width * 8),
            nn.ReLU(True),
            nn.ConvTranspose2d(width * 8, width * 4, 4, 2, 1, bias=False),  # 8x8
            nn.BatchNorm2d(width * 4),
            nn.ReLU(True),
            nn.ConvTranspose2d(width * 4, width * 2, 4, 2, 1, bias=False),  # 16x16
            nn.BatchNorm2d(width * 2),
            nn.ReLU(True),
            nn.ConvTranspose2d(width * 2, width, 4, 2, 1, bias=False),  # 32x32
            nn.BatchNorm2d(width),
            nn.ReLU(True),
            nn.ConvTranspose2d(width, 3, 4, 2, 1, bias=False),  # 64x64
            nn.Tanh(),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.main(z)


class Discriminator(nn.Module):
    def __init__(self, width: int = 64, dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = []
        channels = [3, width, width * 2, width * 4, width * 8]
        for index, (cin, cout) in enumerate(zip(channels, channels[1:])):
            layers.append(nn.Conv2d(cin, cout, 4, 2, 1, bias=False))  # 32, 16, 8, 4
            if index > 0:
                layers.append(nn.BatchNorm2d(cout))
            layers.append(nn.LeakyReLU(0.2, inplace=True))
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
        layers.append(nn.Conv2d(width * 8, 1, 4, 1, 0, bias=False))  # 1x1 logit
        self.main = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.main(images).view(-1)


def init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class RampedAverage(torch.optim.swa_utils.AveragedModel):
    """--g-ema-kimg: G's moving average as StyleGAN2-ADA keeps it. Each step it keeps beta =
    0.5 ** (global batch / half-life) of itself and takes the rest from G; the half-life is
    K thousand images, with --g-ema-rampup R capped at R times the images seen before the
    step, so that the first step copies G and the average then follows it closely while it
    changes fast. It starts at G's initial weights and takes G's buffers as they are. An
    AveragedModel (checkpointed and evaluated as --g-ema's) that counts its steps in
    n_averaged, a CPU tensor: beta needs no wait for the device."""

    def __init__(self, generator: nn.Module, kimg: float, rampup: float, global_batch: int):
        super().__init__(generator, use_buffers=False)
        self.kimg, self.rampup, self.global_batch = kimg, rampup, global_batch

    def beta(self, images_seen: int) -> float:
        half_life = self.kimg * 1000
        if self.rampup > 0:
            half_life = min(half_life, images_seen * self.rampup)
        return 0.5 ** (self.global_batch / max(half_life, 1e-8))

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        weight = 1 - self.beta(int(self.n_averaged) * self.global_batch)
        torch._foreach_lerp_(list(self.module.parameters()), [p.detach() for p in model.parameters()], weight)
        for mine, theirs in zip(self.module.buffers(), model.buffers()):
            mine.copy_(theirs)
        self.n_averaged += 1


def build_nets(args: argparse.Namespace, ranks: gan_ddp.Ranks) -> Nets:
    generator = Generator().to(ranks.device)
    discriminator = Discriminator(dropout=args.d_dropout).to(ranks.device)
    generator.apply(init_weights)
    discriminator.apply(init_weights)
    if args.channels_last:  # the layout oneDNN's convolutions prefer on the CPU
        generator.to(memory_format=torch.channels_last)
        discriminator.to(memory_format=torch.channels_last)
    if ranks.distributed and args.sync_bn:
        generator = nn.SyncBatchNorm.convert_sync_batchnorm(generator)
        discriminator = nn.SyncBatchNorm.convert_sync_batchnorm(discriminator)
    if ranks.distributed:
        # The weights above come from --seed alike on every rank; noise, instance noise and
        # random labels must differ between ranks, or they would all draw the same samples.
        gan_common.seed_everything(args.seed + ranks.rank)
    opt_g = gan_common.make_optimizer(args.g_opt, generator.parameters(), args.lr_g, args)
    opt_d = gan_common.make_optimizer(args.d_opt, discriminator.parameters(), args.lr_d, args)
    # bf16 keeps fp32's range; only fp16 needs its losses scaled.
    scaler = torch.amp.GradScaler(ranks.device.type, enabled=args.amp == "fp16")
    nets = Nets(generator, discriminator, opt_g, opt_d, scaler=scaler)
    if args.g_ema is not None:
        ema = torch.optim.swa_utils.get_ema_multi_avg_fn(args.g_ema)
        nets.g_ema = torch.optim.swa_utils.AveragedModel(generator, multi_avg_fn=ema, use_buffers=True)
    elif args.g_ema_kimg is not None:
        nets.g_ema = RampedAverage(generator, args.g_ema_kimg, args.g_ema_rampup, args.bs * ranks.world_size)
    if args.amp != "fp16":  # under fp16 the scaler's skipped steps leave infinite gradients
        nets.noise_g = gan_common.GradientNoise(generator.parameters())
        nets.noise_d = gan_common.GradientNoise(discriminator.parameters())
    return nets


# ---------------------------------------------------------------------------------------
# Training


def d_inputs(training: Training, batch: torch.Tensor) -> torch.Tensor:
    """Instance noise on what D sees, annealed linearly to 0 over the run."""
    noise, counters = training.session.args.instance_noise, training.counters
    if noise == 0:
        return batch
    std = noise * max(0.0, 1.0 - counters.step / counters.total_steps)
    return batch + std * torch.randn_like(batch)


def targets(training: Training, bounds: list[float] | None, value: float, n: int) -> torch.Tensor:
    device = training.session.ranks.device
    if bounds is None:
        return torch.full((n,), value, device=device)
    return torch.empty(n, device=device).uniform_(*bounds)


def d_loss(training: Training, real: torch.Tensor, fake: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """D's loss on a real and a fake batch, and its logits of each."""
    session, d_net, n = training.session, training.nets.d_net, len(real)
    args = session.args
    with session.autocast():
        logits_real = d_net(d_inputs(training, real))
        logits_fake = d_net(d_inputs(training, fake))
        loss = F.binary_cross_entropy_with_logits(
            logits_real, targets(training, args.real_label_range, args.label_smooth, n)
        ) + F.binary_cross_entropy_with_logits(logits_fake, targets(training, args.fake_label_range, 0.0, n))
    return loss, logits_real.detach().float(), logits_fake.detach().float()


def train_step(training: Training, real: torch.Tensor, logged: bool) -> StepResult:
    """D's step (every --d-every steps), then G's; the figures stay on the device."""
    session, nets = training.session, training.nets
    device, scaler = session.ranks.device, nets.scaler
    with session.autocast():
        fake = nets.g_net(torch.randn(len(real), NZ, 1, 1, device=device))
    trained_d = training.counters.step % session.args.d_every == 0
    scores, grad_norm_d = None, None
    if trained_d:
        nets.opt_d.zero_grad(set_to_none=True)
        scores = d_loss(training, real, fake.detach())
        scaler.scale(scores[0]).backward()
        if logged:  # DDP averaged the gradients: every rank sees the global batch's norm
            scaler.unscale_(nets.opt_d)
            grad_norm_d = gan_common.grad_norm(nets.discriminator.parameters())
        scaler.step(nets.opt_d)
        if nets.noise_d is not None:
            nets.noise_d.update()
    elif logged:
        with scoring_only(nets.discriminator, device):
            scores = d_loss(training, real, fake.detach())

    # Non-saturating G loss: G wants D to call its images real (target 1). This backward
    # also fills D's gradients, which D's next step zeroes unused: under DDP they are left
    # local rather than all-reduced.
    nets.opt_g.zero_grad(set_to_none=True)
    with nets.d_net.no_sync() if session.ranks.distributed else contextlib.nullcontext():
        with session.autocast():
            logits_g = nets.d_net(d_inputs(training, fake))
            loss_g = F.binary_cross_entropy_with_logits(logits_g, torch.ones(len(real), device=device))
        scaler.scale(loss_g).backward()
    grad_norm_g = None
    if logged:
        scaler.unscale_(nets.opt_g)
        grad_norm_g = gan_common.grad_norm(nets.generator.parameters())
    scaler.step(nets.opt_g)
    scaler.update()
    if nets.noise_g is not None:
        nets.noise_g.update()
    if nets.g_ema is not None:
        nets.g_ema.update_parameters(nets.generator)

    d_g_z_after_d = torch.sigmoid(logits_g.detach().float()).mean()
    result = StepResult(trained_d, loss_g.detach().float(), d_g_z_after_d, grad_norm_d=grad_norm_d)
    result.grad_norm_g = grad_norm_g
    if scores is not None:
        loss_d, logits_real, logits_fake = scores
        result.loss_d = loss_d.detach().float()
        result.d_x, result.d_g_z = torch.sigmoid(logits_real).mean(), torch.sigmoid(logits_fake).mean()
        result.dominated = gan_common.d_dominated(result.d_x, result.d_g_z, session.real_label)
    return result


def log_step(training: Training, result: StepResult, bar: tqdm) -> None:
    """A log.csv row: means over ranks; D's optimizer figures and gradient norm are those of
    its latest update."""
    check_finite(training)
    nets, counters, logs = training.nets, training.counters, training.logs
    ranks, now = training.session.ranks, time.perf_counter()
    agar_g, conf_g = gan_common.optimizer_metrics(nets.opt_g)
    if result.trained_d:
        agar_d, conf_d = gan_common.optimizer_metrics(nets.opt_d)
        counters.d_figures = {"agar_d": agar_d, "conf_d": conf_d, "grad_norm_d": result.grad_norm_d}
    loss_g, d_g_z_after_d, loss_d, d_x, d_g_z, dominated = ranks.mean(
        result.loss_g, result.d_g_z_after_d, result.loss_d, result.d_x, result.d_g_z, result.dominated
    )
    row = {"step": counters.step, "epoch": counters.epoch + 1, "loss_d": loss_d, "loss_g": loss_g}
    row.update(d_x=d_x, d_g_z=d_g_z, agar_g=agar_g, conf_g=conf_g, grad_norm_g=result.grad_norm_g)
    row.update(counters.d_figures, d_g_z_after_d=d_g_z_after_d)
    for name in ("noise_g", "noise_d"):
        noise = getattr(nets, name)
        row[f"grad_{name}"] = None if noise is None else noise.ratio()
    row["steps_per_sec"] = (counters.step - logs.last_step) / (now - logs.last_time)
    logs.write("log", row)
    logs.last_time, logs.last_step = now, counters.step
    # Under torchrun: D won outright on most ranks.
    log_every = training.session.args.log_every
    logs.dominated_streak = logs.dominated_streak + log_every if dominated.item() > 0.5 else 0
    if logs.dominated_streak >= DOMINANCE_PATIENCE_STEPS:
        ranks.say(
            f"warning: step {counters.step}: D has won outright for {logs.dominated_streak} steps (D(x) "
            f"{d_x.item():.2f}, D(G(z)) {d_g_z.item():.3f}, loss_D {loss_d.item():.3f}); G gets almost no "
            f"signal. {STABILISER_HINT}"
        )
        logs.dominated_streak = 0
    bar.set_postfix_str(
        f"loss_D {loss_d.item():.3f} loss_G {loss_g.item():.3f} D(x) {d_x.item():.3f} "
        f"D(G(z)) {d_g_z.item():.3f}/{d_g_z_after_d.item():.3f}",
        refresh=False,
    )


def end_epoch(training: Training) -> None:
    """quality.csv's row (without --eval-every), the epoch's grid and a checkpoint."""
    counters = training.counters
    counters.epoch += 1
    counters.batch_in_epoch = 0
    if training.session.args.eval_every is None:
        measure_quality(training)
    write_grid(training, f"epoch_{counters.epoch:03d}.png")
    save(training)


def after_step(training: Training) -> None:
    """The grid of --sample-every and the evaluation of --eval-every, when due."""
    args, step = training.session.args, training.counters.step
    epoch_done = training.counters.batch_in_epoch == training.session.steps_per_epoch
    if args.sample_every is not None and step % args.sample_every == 0 and not epoch_done:
        write_grid(training, f"step_{step:06d}.png")
        measure_diversity(training)
    if args.eval_every is not None and step % args.eval_every == 0:
        measure_quality(training)


def train_epochs(training: Training, stop: gan_common.StopSignal) -> None:
    """Steps until --epochs, --max-steps, a signal or divergence; the logs are closed
    however it ends."""
    session, counters = training.session, training.counters
    training.logs = open_logs(session, counters.step)
    bar = tqdm(
        total=counters.total_steps,
        initial=counters.step,
        unit="step",
        dynamic_ncols=True,
        disable=not session.ranks.is_main,
    )
    try:
        run_epochs(training, stop, bar)
    finally:
        bar.close()
        training.logs.close()
        training.logs = None


def run_epochs(training: Training, stop: gan_common.StopSignal, bar: tqdm) -> None:
    """train_epochs' loop: an epoch's end writes its row, grid and checkpoint."""
    session, counters = training.session, training.counters
    args, ranks = session.args, session.ranks
    while counters.step < counters.total_steps and not ranks.agreed_stop(stop.signum):
        counters.epoch_order_state = session.data_order.get_state()
        # Every rank draws the same shuffle and takes its own --bs images of each global batch.
        order = torch.randperm(len(session.images), generator=session.data_order).to(ranks.device)
        while counters.batch_in_epoch < session.steps_per_epoch and counters.step < counters.total_steps:
            start = counters.batch_in_epoch * session.global_batch + ranks.rank * args.bs
            real = to_unit(session.images[order[start : start + args.bs]])
            if args.channels_last:
                real = real.contiguous(memory_format=torch.channels_last)
            logged = (counters.step + 1) % args.log_every == 0
            result = train_step(training, real, logged)
            training.sums.add(result)
            counters.step += 1
            counters.batch_in_epoch += 1
            training.watch.observe(counters.step, loss_d=result.loss_d, loss_g=result.loss_g)
            bar.update()
            if logged:
                log_step(training, result, bar)
            after_step(training)
            if ranks.agreed_stop(stop.signum):
                break
        if counters.batch_in_epoch < session.steps_per_epoch:
            break  # stopped mid-epoch: --max-steps or a signal
        end_epoch(training)
    finished = counters.step == counters.total_steps and not ranks.agreed_stop(stop.signum)
    if finished and training.logs.last_row_step != counters.step:
        measure_quality(training)  # the run's final state always gets a row


def write_config(session: Session) -> None:
    """config.json, with the processes and the feature space beside the arguments (rank 0)."""
    if not session.ranks.is_main:
        return
    session.run_dir.mkdir(parents=True, exist_ok=True)
    space = session.feature_space
    facts = {"world_size": session.ranks.world_size, "global_batch": session.global_batch}
    facts["feature_space"] = None if space is None else space.name
    facts["feature_space_accuracy"] = None if space is None else space.classifier_accuracy
    facts["speed_settings"] = session.speed_settings
    gan_common.write_config(session.run_dir, SCRIPT, session.args, session.ranks.device, **facts)


def train(args: argparse.Namespace) -> None:
    ranks = gan_ddp.join_processes(args)
    check_args(args, ranks.device)
    speed = speed_settings.resolve(args, ranks.device)
    ranks.say(f"speed settings: --amp {args.amp}, channels_last {args.channels_last} ({speed['why']})")
    if args.tensorboard:
        run_log.check_tensorboard()
    torch.backends.cudnn.benchmark = False  # its kernel choice varies from run to run
    gan_common.seed_everything(args.seed)
    run_dir = Path(args.out or f"runs/dcgan-{args.dataset}-{args.g_opt}_{args.d_opt}-s{args.seed}")
    if args.resume is not None:
        run_log.check_resumable(run_dir)
    gan_common.check_run_folder(run_dir, resuming=args.resume is not None)
    checkpoint = None if args.resume is None else read_checkpoint(args, run_dir)
    session = prepare_session(args, ranks, run_dir)
    session.speed_settings = speed
    training = start_or_resume(session, build_nets(args, ranks), checkpoint)
    write_config(session)
    counters, nets = training.counters, training.nets
    if counters.step >= counters.total_steps:
        ranks.say(
            f"{run_dir} already ran {counters.step} steps; pass a larger --epochs or --max-steps to go on"
        )
        return
    nets.g_net = gan_ddp.data_parallel(nets.generator, ranks)
    nets.d_net = gan_ddp.data_parallel(nets.discriminator, ranks)
    training.status.write("running", counters.step)
    first_step, start_time = counters.step, time.perf_counter()
    stop = gan_common.StopSignal(announce=ranks.is_main)
    try:
        train_epochs(training, stop)
        steps_per_sec = (counters.step - first_step) / (time.perf_counter() - start_time)
        stop.restore()
        end_session(training, stop.signum, steps_per_sec)
    except gan_common.Diverged as diverged:
        stop.restore()
        training.status.exit_diverged(diverged)


def end_session(training: Training, signum: int, steps_per_sec: float) -> None:
    """The checkpoint of a mid-epoch stop, the final grid, the replica check, and how the
    session ended: status.json and a line (a signal's exit code)."""
    session, counters, nets = training.session, training.counters, training.nets
    ranks, run_dir = session.ranks, session.run_dir
    if counters.batch_in_epoch > 0:  # mid-epoch stop: the epoch-end save did not cover it
        save(training)
    # After the checkpoint: this forward pass updates G's BatchNorm running statistics.
    write_grid(training, "final.png")
    if ranks.distributed:
        gan_ddp.check_replicas([nets.generator, nets.discriminator], run_dir, ranks)
    stopped_by = ranks.agreed_stop(signum)
    if stopped_by:
        launcher = f"torchrun --nproc_per_node {ranks.world_size}" if ranks.distributed else "python"
        training.status.exit_stopped(stopped_by, counters.step, f"{launcher} {SCRIPT} --resume {run_dir}")
    training.status.write("finished", counters.step)
    if ranks.is_main:
        print(
            f"done: {counters.step} steps ({steps_per_sec:.2f} steps/s this session). Outputs in {run_dir}/: "
            "config.json, log.csv, quality.csv, checkpoint.pt, status.json, samples/ (final grid: "
            "samples/final.png)"
        )


def score_folder(args: argparse.Namespace) -> None:
    """--score-images: one JSON line on stdout, the folder's images scored against --eval-samples
    images of the dataset's subset (everything else goes to stderr)."""
    with contextlib.redirect_stdout(sys.stderr):
        images = load_images(args.dataset, Path(args.data_root), args.subset, args.seed, args.workers)
        space, reference = quality_reference(args, images, gan_common.pick_device(args.device))
        scores = sample_quality.score_images(args.score_images, reference, space)
    print(json.dumps(scores))


def main(argv: list[str] | None = None) -> None:
    try:
        args = gan_common.resolve_args(build_parser(), argv, SCRIPT, RESUME_MAY_CHANGE)
        if args.score_images:
            score_folder(args)
        else:
            train(args)
    except (DataError, RunError, SampleQualityError) as error:
        sys.exit(f"error: {error}")
    except KeyboardInterrupt:
        sys.exit("interrupted; nothing saved since the last checkpoint")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
