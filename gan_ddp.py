"""The processes of a run: torchrun starts one per device and sets WORLD_SIZE, RANK and
LOCAL_RANK; a plain `python train_dcgan.py` is one process with no process group and no DDP
wrapper. Ranks says which process this is and does the few exchanges between them."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import gan_common
from gan_common import RunError


@dataclass
class Ranks:
    """This process's place among the run's processes (rank 0 of 1 without torchrun)."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    control_group: dist.ProcessGroup | None = None  # gloo: host-side exchanges with no device sync

    @property
    def is_main(self) -> bool:
        """The one process that prints and writes the run folder."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def say(self, message: str) -> None:
        if self.is_main:
            tqdm.write(message)

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """A copy summed over ranks, on the device (NCCL's all-reduce takes device tensors)."""
        if not self.distributed:
            return values
        total = values.clone()
        dist.all_reduce(total)
        return total

    def mean(self, *values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """What a user reads as one number (a loss, D(x)) is the mean over ranks: an
        all-reduce, so called on logged steps only."""
        if not self.distributed:
            return values
        return tuple(self.sum(torch.stack([value.detach().float() for value in values])) / self.world_size)

    def gather(self, value) -> list:
        if not self.distributed:
            return [value]
        gathered: list = [None] * self.world_size
        dist.all_gather_object(gathered, value, group=self.control_group)
        return gathered

    def agreed_stop(self, signum: int) -> int:
        """The signal that stops the run, 0 while none came. The ranks agree after every
        step: a rank stopping alone would leave the others waiting in DDP's all-reduce."""
        if not self.distributed:
            return signum
        flag = torch.tensor(signum)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.control_group)
        return int(flag)


def join_processes(args: argparse.Namespace) -> Ranks:
    """This process's device and rank. Under torchrun it also joins the process group (NCCL
    on GPUs, gloo on the CPU) and makes a gloo group for the small host-side exchanges."""
    device = gan_common.pick_device(args.device)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Ranks(device)
    if device.type == "cuda":
        if device.index is not None:
            raise RunError(
                f"--device {args.device} names one GPU; under torchrun each process takes "
                "cuda:LOCAL_RANK, so pass --device cuda or auto"
            )
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    elif args.sync_bn:
        raise RunError("--sync-bn needs GPUs: SyncBatchNorm has no CPU implementation")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Ranks(device, dist.get_rank(), world_size, dist.new_group(backend="gloo"))


def check_replicas(modules: list[nn.Module], run_dir: Path, ranks: Ranks) -> None:
    """Rank 0 gathers a checksum of every rank's parameters and writes replicas.json. DDP
    averages the gradients before each step, so identical replicas show that every rank's
    optimizer (CASMO's gate included) took the same steps. Buffers are left out: with plain
    BatchNorm each rank keeps its own running statistics, which training never reads."""
    flat = torch.cat([p.detach().float().flatten().cpu() for module in modules for p in module.parameters()])
    mine = {
        "rank": ranks.rank,
        "sum": flat.double().sum().item(),
        "sha256": hashlib.sha256(flat.numpy().tobytes()).hexdigest(),
    }
    checksums = ranks.gather(mine)
    if ranks.is_main:
        identical = len({checksum["sha256"] for checksum in checksums}) == 1
        report = {"world_size": ranks.world_size, "identical": identical, "ranks": checksums}
        gan_common.atomic_write_text(run_dir / "replicas.json", json.dumps(report, indent=2) + "\n")
        verdict = "identical" if identical else "DIFFERENT (see replicas.json)"
        print(f"parameters on the {ranks.world_size} processes: {verdict}")


def data_parallel(module: nn.Module, ranks: Ranks) -> nn.Module:
    """The module itself in one process; under torchrun, DDP's wrapper around it."""
    if not ranks.distributed:
        return module
    # BatchNorm's running statistics are never used in training (sample grids too use batch
    # statistics), and re-broadcasting them at every forward breaks D's two forwards (real,
    # fake) before one backward: each rank keeps its own.
    device_ids = [ranks.device] if ranks.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids, forward_sync_buffers=False)
