"""A DCGAN run's state (train_dcgan.py): what stays fixed through a session (Session: the
arguments, the processes, the images on the device and the fixed inputs of every grid and
evaluation), the networks with their optimizers (Nets), what a checkpoint carries besides
them (Counters, IntervalSums), the logs, and starting, resuming and saving a run, and
checking that its state is finite (check_finite). Training bundles them: the loop's
functions take that one object."""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

import gan_common
import run_log
import sample_quality
from gan_common import RunError
from gan_data import DataError, load_images, to_unit
from gan_ddp import Ranks

NZ = 100  # the length of G's latent vectors
GRID_SAMPLES = 64
DIVERSITY_SAMPLES = 256
# Arguments that define the training trajectory; a checkpoint must match them all.
TRAJECTORY_ARGS = (
    "dataset", "subset", "bs", "g_opt", "d_opt", "lr_g", "lr_d", "beta1", "beta2", "robustness", "c_min",
    "rel_floor", "amp", "seed", "label_smooth", "real_label_range", "fake_label_range", "instance_noise",
    "d_every", "d_dropout", "g_ema", "g_ema_kimg", "g_ema_rampup",
)  # fmt: skip
G_EMA_RAMPUP = 0.05  # --g-ema-rampup's default, StyleGAN2-ADA's ema_rampup
# What a checkpoint written before these arguments existed did: it matches a run that leaves
# them at these values.
ADDED_TRAJECTORY_ARGS = {"g_ema_kimg": None, "g_ema_rampup": G_EMA_RAMPUP}


@dataclass
class Session:
    """What stays fixed through a session: arguments, processes, data, evaluation inputs."""

    args: argparse.Namespace
    ranks: Ranks
    run_dir: Path
    images: torch.Tensor  # uint8, on the device: batches are drawn there, with no loader
    steps_per_epoch: int
    amp_dtype: torch.dtype | None
    grid_noise: torch.Tensor
    diversity_noise: torch.Tensor
    real_reference: torch.Tensor
    data_order: torch.Generator  # shuffles each epoch; its state is checkpointed
    eval_noise: torch.Tensor  # --eval-samples latent vectors, the same at every evaluation
    # The feature space and the real set's features: on rank 0, without --no-fid.
    feature_space: sample_quality.FeatureSpace | None = None
    reference: sample_quality.Reference | None = None
    speed_settings: dict = field(default_factory=dict)  # speed_settings.resolve's record

    @property
    def global_batch(self) -> int:
        """One step takes --bs images on each process."""
        return self.args.bs * self.ranks.world_size

    @property
    def real_label(self) -> float:
        return gan_common.real_label(self.args.label_smooth, self.args.real_label_range)

    def autocast(self):
        return torch.autocast(
            self.ranks.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None
        )


@dataclass
class Nets(gan_common.Nets):
    scaler: torch.amp.GradScaler | None = None
    g_ema: torch.optim.swa_utils.AveragedModel | None = None  # with --g-ema or --g-ema-kimg
    NAMES = (*gan_common.Nets.NAMES, "scaler", "g_ema")
    # Training runs through DDP's wrappers under torchrun; checkpoints and grids use the
    # modules inside (no "module." prefix).
    g_net: nn.Module | None = None
    d_net: nn.Module | None = None


@dataclass
class Counters:
    step: int = 0
    epoch: int = 0  # epochs completed
    batch_in_epoch: int = 0  # batches done of the current epoch
    total_steps: int = 0  # where this session stops
    epoch_order_state: torch.Tensor | None = None  # data_order's state when this epoch's shuffle was drawn
    # agar_d, conf_d and grad_norm_d of D's latest update, for log rows of steps where D did
    # not learn; checkpointed, since CASMO keeps its metrics outside its state dict.
    d_figures: dict = field(default_factory=dict)


@dataclass
class IntervalSums:
    """This rank's sums over the steps since the last quality.csv row, kept on the device
    (no host sync per step)."""

    values: torch.Tensor  # loss_d, loss_g, d_x, d_g_z, dominated, D steps, G steps
    NAMES = ("loss_d", "loss_g", "d_x", "d_g_z", "dominated", "d_steps", "g_steps")

    @classmethod
    def zeros(cls, device: torch.device) -> IntervalSums:
        return cls(torch.zeros(len(cls.NAMES), device=device))

    def add(self, result: StepResult) -> None:
        if result.trained_d:
            d_part = [
                result.loss_d,
                result.d_x,
                result.d_g_z,
                result.dominated.float(),
                torch.ones_like(result.d_x),
            ]
            self.values[[0, 2, 3, 4, 5]] += torch.stack(d_part)
        self.values[[1, 6]] += torch.stack([result.loss_g, torch.ones_like(result.loss_g)])

    def means(self, ranks: Ranks) -> dict[str, float]:
        """The means over all ranks: D's over the steps D learned, G's over all."""
        total = dict(zip(self.NAMES, ranks.sum(self.values).tolist()))
        d_steps = max(total["d_steps"], 1.0)
        return {
            "loss_d_mean": total["loss_d"] / d_steps,
            "loss_g_mean": total["loss_g"] / max(total["g_steps"], 1.0),
            "d_x_mean": total["d_x"] / d_steps,
            "d_g_z_mean": total["d_g_z"] / d_steps,
            "d_dominated_share": total["dominated"] / d_steps,
        }


@dataclass
class StepResult:
    """One step's figures as device tensors; D's are its scores of this batch, also on a
    logged step where D did not learn (then without a graph)."""

    trained_d: bool
    loss_g: torch.Tensor
    d_g_z_after_d: torch.Tensor
    loss_d: torch.Tensor | None = None
    d_x: torch.Tensor | None = None
    d_g_z: torch.Tensor | None = None
    dominated: torch.Tensor | None = None
    grad_norm_d: torch.Tensor | None = None  # on logged steps where D learned
    grad_norm_g: torch.Tensor | None = None  # on logged steps


@dataclass
class Logs:
    """The run's log (rank 0 only) and what the log rows need between steps."""

    writer: run_log.RunLog | None
    last_time: float
    last_step: int
    dominated_streak: int = 0
    last_row_step: int = -1  # step of this session's latest quality.csv row

    def write(self, name: str, row: dict) -> None:
        if self.writer is not None:
            self.writer.write(name, row)

    def image(self, tag: str, path: Path, step: int) -> None:
        if self.writer is not None:
            self.writer.image(tag, path, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


@dataclass
class Training:
    """What one training session works on, passed as one: the session's fixed inputs, the
    networks, the counters and sums a checkpoint carries, the watch on the losses, the
    run's status.json and the logs."""

    session: Session
    nets: Nets
    counters: Counters
    sums: IntervalSums
    watch: gan_common.DivergenceWatch
    status: run_log.RunStatus
    logs: Logs | None = None


# ---------------------------------------------------------------------------------------
# Starting, resuming and saving


def prepare_session(args: argparse.Namespace, ranks: Ranks, run_dir: Path) -> Session:
    """The data on the device and the fixed evaluation inputs."""
    # Rank 0 loads first: it alone decodes and caches a dataset, and the others read its cache
    # (on a shared file system) instead of racing it to write the same file.
    if not ranks.is_main:
        dist.barrier(group=ranks.control_group)
    images = load_images(args.dataset, Path(args.data_root), args.subset, args.seed, args.workers)
    images = images.to(ranks.device)
    if ranks.distributed and ranks.is_main:
        dist.barrier(group=ranks.control_group)
    steps_per_epoch = len(images) // (args.bs * ranks.world_size)
    if steps_per_epoch == 0:
        processes = f" on each of {ranks.world_size} processes" if ranks.distributed else ""
        raise DataError(f"{len(images)} images cannot fill one batch of --bs {args.bs}{processes}")
    # Fixed inputs, drawn from their own generator so they use none of the training RNG.
    fixed = torch.Generator().manual_seed(args.seed + 1)
    grid_noise = torch.randn(GRID_SAMPLES, NZ, 1, 1, generator=fixed)[: args.grid_samples].to(ranks.device)
    diversity_noise = torch.randn(DIVERSITY_SAMPLES, NZ, 1, 1, generator=fixed).to(ranks.device)
    reference = images[torch.randperm(len(images), generator=fixed)[:DIVERSITY_SAMPLES].to(ranks.device)]
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    data_order = torch.Generator().manual_seed(args.seed)
    eval_noise = torch.randn(args.eval_samples, NZ, 1, 1, generator=fixed).to(ranks.device)
    session = Session(
        args, ranks, run_dir, images, steps_per_epoch, amp_dtype, grid_noise, diversity_noise,
        to_unit(reference), data_order, eval_noise,
    )  # fmt: skip
    if ranks.is_main and not args.no_fid:
        session.feature_space, session.reference = quality_reference(args, images.cpu(), ranks.device)
    return session


def quality_reference(args: argparse.Namespace, images: torch.Tensor, device: torch.device) -> tuple:
    """The dataset's feature space and the features of --eval-samples of its images (a
    seeded draw, cached beside the data). Fails before any training when the feature space
    cannot be had (e.g. Inception weights offline)."""
    space = sample_quality.feature_space_for(args.dataset, args.inception_weights).to(device)
    count = min(args.eval_samples, len(images))
    real = images[torch.randperm(len(images), generator=torch.Generator().manual_seed(args.seed + 3))[:count]]
    cache = sample_quality.reference_cache_path(
        args.data_root, args.dataset, args.subset, args.seed, count, space
    )
    return space, sample_quality.reference_features(real, space, cache)


def trajectory(args: argparse.Namespace) -> dict:
    return {name: getattr(args, name) for name in TRAJECTORY_ARGS}


def read_checkpoint(args: argparse.Namespace, run_dir: Path) -> dict:
    """The checkpoint --resume continues, checked against the run's settings. Read before the
    data and the feature space are prepared, so that a damaged or foreign checkpoint is
    refused at once, not after the shapes classifier's training."""
    path = run_dir / "checkpoint.pt"
    checkpoint = gan_common.load_checkpoint(path)
    recorded = {**ADDED_TRAJECTORY_ARGS, **(checkpoint.get("trajectory_args") or {})}
    if checkpoint.get("kind") != "dcgan" or recorded != trajectory(args):
        raise RunError(f"{path} is not a checkpoint of the run in {run_dir / 'config.json'}")
    return checkpoint


def resume(training: Training, checkpoint: dict) -> None:
    """Loads the checkpoint into the nets, counters, sums and RNG streams."""
    session, counters = training.session, training.counters
    training.nets.load_state_dicts(checkpoint, session.run_dir / "checkpoint.pt")
    training.status.checkpoint_step = checkpoint["step"]
    counters.step, counters.epoch = checkpoint["step"], checkpoint["epoch"]
    counters.batch_in_epoch, counters.d_figures = checkpoint["batch_in_epoch"], checkpoint["d_figures"]
    session.data_order.set_state(checkpoint["data_order_state"])
    ranks = session.ranks
    if checkpoint["world_size"] == ranks.world_size:
        if ranks.is_main:  # the other ranks' share of the sums is in rank 0's
            training.sums.values.copy_(checkpoint["interval_sums"])
        gan_common.set_rng_state(checkpoint["rng_by_rank"][ranks.rank])
        return
    # Another world size slices each epoch's shuffle differently, so a half-done epoch cannot
    # be finished exactly: skip its rest and start the next one. `step` goes on counting
    # optimizer steps, now of the new global batch.
    note = (
        f"note: {session.run_dir} ran on {checkpoint['world_size']} process(es) and resumes on "
        f"{ranks.world_size}: the global batch is now {session.global_batch}; the step count goes on from "
        f"{counters.step}"
    )
    if counters.batch_in_epoch:
        skipped = counters.epoch + 1
        note += f"; the rest of epoch {skipped} is skipped, training resumes at epoch {skipped + 1}"
        torch.randperm(len(session.images), generator=session.data_order)  # the skipped epoch's shuffle
        counters.epoch, counters.batch_in_epoch = counters.epoch + 1, 0
    ranks.say(note)
    # Fresh noise streams: the saved ones belong to ranks that no longer match.
    gan_common.seed_everything(hash((session.args.seed, ranks.rank, counters.step)) % 2**32)


def start_or_resume(session: Session, nets: Nets, checkpoint: dict | None) -> Training:
    """A new run's state, or with --resume the checkpoint's (read_checkpoint); the step this
    session stops at."""
    ranks = session.ranks
    watch = gan_common.DivergenceWatch(("loss_d", "loss_g"), ranks.device)
    status = run_log.RunStatus(session.run_dir, None, ranks.is_main)
    training = Training(session, nets, Counters(), IntervalSums.zeros(ranks.device), watch, status)
    if checkpoint is not None:
        resume(training, checkpoint)
    counters, args = training.counters, session.args
    # The epochs left at this world size; with one world size throughout, this is
    # --epochs x steps per epoch.
    left = (args.epochs - counters.epoch) * session.steps_per_epoch - counters.batch_in_epoch
    counters.total_steps = counters.step + left
    if args.max_steps is not None:
        counters.total_steps = min(counters.total_steps, args.max_steps)
    counters.epoch_order_state = session.data_order.get_state()
    return training


def open_logs(session: Session, step: int) -> Logs:
    if not session.ranks.is_main:
        return Logs(None, time.perf_counter(), step)
    (session.run_dir / "samples").mkdir(exist_ok=True)
    writer = run_log.RunLog(
        session.run_dir,
        run_log.DCGAN_LOG_COLUMNS,
        run_log.DCGAN_QUALITY_COLUMNS,
        step,
        session.args.tensorboard,
    )
    return Logs(writer, time.perf_counter(), step)


def check_finite(training: Training) -> None:
    """Raises gan_common.Diverged, on every rank alike, once a loss or G's or D's parameters
    or buffers were not finite: called before the state is logged, drawn, evaluated or saved."""
    nets = training.nets
    networks = {"generator": nets.generator, "discriminator": nets.discriminator}
    training.watch.check(training.counters.step, networks, training.session.ranks.gather)


def save(training: Training) -> None:
    """Every rank takes part (the sums and the RNG states are gathered); rank 0 writes, and
    only a finite state."""
    check_finite(training)
    session, counters = training.session, training.counters
    sums_over_ranks = session.ranks.sum(training.sums.values).cpu()
    rng_by_rank = session.ranks.gather(gan_common.rng_state())
    if not session.ranks.is_main:
        return
    # The order generator as the current epoch's shuffle found it: resuming mid-epoch
    # replays that shuffle and skips the batches done.
    order_state = counters.epoch_order_state if counters.batch_in_epoch else session.data_order.get_state()
    payload = {
        "kind": "dcgan",
        "trajectory_args": trajectory(session.args),
        **training.nets.state_dicts(),
        "rng_by_rank": rng_by_rank,
        "world_size": session.ranks.world_size,
        "data_order_state": order_state,
        "step": counters.step,
        "epoch": counters.epoch,
        "batch_in_epoch": counters.batch_in_epoch,
        "interval_sums": sums_over_ranks,
        "d_figures": counters.d_figures,
    }
    gan_common.save_checkpoint(session.run_dir / "checkpoint.pt", payload, finite=training.nets.NAMES)
    training.status.saved(counters.step)
