"""DCGAN at 64x64 with the generator's and the discriminator's optimizers chosen apart
(Adam or CASMO). The defaults are the benchmark: a 20k-image subset of Tiny ImageNet spread
over all 200 classes, batch 16, lr 2e-4, betas (0.5, 0.999), real label 0.9, 50 epochs.

    python train_dcgan.py --g-opt casmo --d-opt adam
    python train_dcgan.py --dataset shapes --subset 2048 --max-steps 400   # offline demo
    python train_dcgan.py --resume runs/dcgan-tinyimagenet-casmo_adam-s0 --epochs 80
    torchrun --nproc_per_node 4 train_dcgan.py --g-opt casmo --d-opt casmo   # 4 GPUs, DDP

A run folder holds config.json, log.csv (every --log-every steps), quality.csv (one row
per epoch), samples/*.png (8x8 grids of one fixed noise batch) and checkpoint.pt; a run
under torchrun also writes replicas.json (whether all processes ended with the same weights).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import socket
import sys
import time
import urllib.error
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch.nn.parallel import DistributedDataParallel
from torchvision.utils import save_image
from tqdm import tqdm

import gan_common
import sample_quality
import speed_settings
from gan_common import RunError, positive_int
from sample_quality import SampleQualityError

SCRIPT = "train_dcgan.py"
DATASETS = ("tinyimagenet", "folder", "cifar10", "mnist", "fashion-mnist", "shapes")
TINYIMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINYIMAGENET_BYTES = 248_100_043
TINYIMAGENET_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
IMAGE_SIZE = 64
NZ = 100
GRID_SAMPLES = 64
DIVERSITY_SAMPLES = 256
DOMINANCE_PATIENCE_STEPS = 200  # warn once D has won outright (gan_common.d_dominated) this long
COLLAPSE_RATIO = 0.3
COLLAPSE_GRACE_STEPS = 500
STABILISER_HINT = (
    "try --lr-d 5e-5, --instance-noise 0.1, --d-every 2, --label-smooth 0.8, "
    "--real-label-range 0.7 1.0 or --d-dropout 0.3"
)
# Arguments a resumed run may change; the others must equal the run's own (config.json).
RESUME_MAY_CHANGE = {
    "epochs", "max_steps", "device", "channels_last", "log_every", "sample_every", "workers", "eval_every",
    "inception_weights",
}  # fmt: skip
# Arguments that define the training trajectory; a checkpoint must match them all.
TRAJECTORY_ARGS = (
    "dataset", "subset", "bs", "g_opt", "d_opt", "lr_g", "lr_d", "beta1", "beta2", "robustness", "c_min",
    "rel_floor", "amp", "seed", "label_smooth", "real_label_range", "fake_label_range", "instance_noise",
    "d_every", "d_dropout", "g_ema",
)  # fmt: skip
# Sample quality (sample_quality.evaluate) of G and, with --g-ema, of its moving average.
SAMPLE_COLUMNS = [
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
QUALITY_COLUMNS = [
    "epoch",
    "step",
    "loss_d_mean",
    "loss_g_mean",
    "d_x_mean",
    "d_g_z_mean",
    "diversity_ratio",
    "d_dominated_share",
    *SAMPLE_COLUMNS,
    "diversity_ratio_ema",
    *(f"{column}_ema" for column in SAMPLE_COLUMNS),
    "eval_seconds",
]
EVAL_BATCH = 250  # generated images per forward pass at an evaluation
# What the console shows of a quality.csv row.
QUALITY_SHOWN = (
    "loss_d_mean", "loss_g_mean", "diversity_ratio", "kid", "fid", "precision", "recall", "coverage",
    "modes_covered", "kid_ema", "fid_ema", "eval_seconds",
)  # fmt: skip
LOG_EXTRA_COLUMNS = ["d_g_z_after_d", "steps_per_sec"]


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
    output = parser.add_argument_group("output")
    output.add_argument(
        "--out", type=Path, default=None, help="run folder (default runs/dcgan-<dataset>-<g>_<d>-s<seed>)"
    )
    output.add_argument("--resume", type=Path, default=None, metavar="DIR", help="continue the run in DIR")
    output.add_argument("--log-every", type=positive_int, default=50, help="log.csv row every N steps")
    output.add_argument("--sample-every", type=positive_int, default=None, help="grid every N steps")
    return parser


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
    evaluation.add_argument(
        "--g-ema", type=float, default=None, metavar="DECAY", help="also keep and evaluate G's moving average"
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


class DataError(Exception):
    """A problem with the data the user can fix; main() prints it without a traceback."""


# ---------------------------------------------------------------------------------------
# Data: every dataset becomes one uint8 tensor (N, 3, 64, 64), decoded once and cached.


def make_shapes(count: int, seed: int) -> torch.Tensor:
    """One bright circle, square or triangle per image, on a plain dark background, both
    of random colours. The shape differs from its background in brightness, which a DCGAN
    learns first: its grids show shapes within a few hundred CPU steps (with shapes only
    shifted in hue from backgrounds of any brightness they were still colour noise at 800)."""
    return shapes_with_factors(count, seed)[0]


def shapes_with_factors(count: int, seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """make_shapes' images and the factors that drew them, one row per image: kind (0 circle,
    1 square, 2 triangle), colour (N, 3) in [0.55, 1], centre (N, 2) as (x, y) pixels, radius.
    The sample quality measures' shapes classifier learns its classes from these."""
    generator = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(IMAGE_SIZE).float(), torch.arange(IMAGE_SIZE).float(), indexing="ij")
    chunks, factors = [], []
    for start in range(0, count, 1024):
        n = min(1024, count - start)
        dark = 0.35 * torch.rand(n, 3, 1, 1, generator=generator)
        background = dark.expand(-1, -1, IMAGE_SIZE, IMAGE_SIZE)
        colour = 0.55 + 0.45 * torch.rand(n, 3, 1, 1, generator=generator)
        cx = 16 + 32 * torch.rand(n, 1, 1, generator=generator)
        cy = 16 + 32 * torch.rand(n, 1, 1, generator=generator)
        radius = 12 + 10 * torch.rand(n, 1, 1, generator=generator)
        kind = torch.randint(0, 3, (n, 1, 1), generator=generator)
        dx, dy = xs - cx, ys - cy
        circle = dx**2 + dy**2 <= radius**2
        square = (dx.abs() <= 0.85 * radius) & (dy.abs() <= 0.85 * radius)
        triangle = (dy >= -radius) & (dy <= 0.8 * radius) & (dx.abs() <= 0.6 * (dy + radius))
        mask = torch.where(kind == 0, circle, torch.where(kind == 1, square, triangle)).unsqueeze(1)
        image = torch.where(mask, colour.expand(-1, -1, IMAGE_SIZE, IMAGE_SIZE), background)
        chunks.append((image * 255).round().to(torch.uint8))
        factors.append((kind.view(n), colour.view(n, 3), torch.cat([cx, cy], 1).view(n, 2), radius.view(n)))
    kinds, colours, centres, radii = (torch.cat(parts) for parts in zip(*factors))
    return torch.cat(chunks), {"kind": kinds, "colour": colours, "centre": centres, "radius": radii}


def spread_subset(groups: list[list], size: int, seed: int) -> list:
    """`size` items drawn evenly from every group (class), in a seeded random order:
    each class is shuffled and the classes take turns, so class sizes differ by at most one."""
    generator = torch.Generator().manual_seed(seed)
    shuffled = [[group[i] for i in torch.randperm(len(group), generator=generator)] for group in groups]
    class_order = torch.randperm(len(groups), generator=generator).tolist()
    picked = []
    for rank in range(max(map(len, groups), default=0)):
        picked.extend(shuffled[c][rank] for c in class_order if rank < len(shuffled[c]))
    if size > len(picked):
        tqdm.write(f"note: --subset {size} is more than the {len(picked)} images there are; using all")
    return picked[:size]


def find_tinyimagenet(data_root: Path) -> Path:
    """DATA_ROOT/tiny-imagenet-200, or DATA_ROOT itself when it is that folder;
    downloaded and extracted when missing."""
    if (data_root / "wnids.txt").exists() or (data_root / "train").is_dir():
        folder = data_root
    else:
        folder = data_root / "tiny-imagenet-200"
        if not folder.exists():
            download_tinyimagenet(data_root)
    wnids_file = folder / "wnids.txt"
    broken = (
        f"{folder} is not a complete Tiny ImageNet folder ({{}}). Delete it and run again to download it, "
        f"or extract the official tiny-imagenet-200.zip ({TINYIMAGENET_URL}) into {data_root}."
    )
    if not wnids_file.is_file():
        raise DataError(broken.format("no wnids.txt"))
    wnids = wnids_file.read_text().split()
    if not wnids:
        raise DataError(broken.format("wnids.txt is empty"))
    for wnid in wnids:
        images = folder / "train" / wnid / "images"
        if not images.is_dir() or not any(images.glob("*.JPEG")):
            raise DataError(broken.format(f"no images in train/{wnid}/images"))
    return folder


def download_tinyimagenet(data_root: Path) -> None:
    """The official zip, checked against its MD5 and extracted, through torchvision's
    downloader (a damaged or partial zip fails the check and is downloaded again)."""
    from torchvision.datasets.utils import download_and_extract_archive

    url = os.environ.get("CASMO_TINYIMAGENET_URL", TINYIMAGENET_URL)
    tqdm.write(f"Tiny ImageNet is not in {data_root}; downloading {url}")
    socket.setdefaulttimeout(30)  # urllib would otherwise wait forever offline
    try:
        download_and_extract_archive(url, str(data_root), md5=TINYIMAGENET_MD5)
    except (urllib.error.URLError, OSError, ValueError) as error:
        raise DataError(
            f"Tiny ImageNet is not in {data_root} and downloading it from {url} failed ({error}). "
            f"Download tiny-imagenet-200.zip ({TINYIMAGENET_BYTES:,} bytes, MD5 {TINYIMAGENET_MD5}) "
            f"on a machine with internet access and extract it into {data_root}, so that "
            f"{data_root / 'tiny-imagenet-200' / 'wnids.txt'} exists, or point --data-root at it. "
            "To try the script without any download, run it with --dataset shapes."
        ) from None
    except RuntimeError:  # torchvision's "File not found or corrupted." after the MD5 check
        raise DataError(
            f"the file downloaded from {url} is not the official archive (MD5 {TINYIMAGENET_MD5}); "
            "run again to download it afresh, or download and extract it by hand"
        ) from None


def decode_image(path: Path) -> torch.Tensor:
    """RGB (some Tiny ImageNet images are grayscale), shorter side 64, centre crop 64x64."""
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            scale = IMAGE_SIZE / min(image.size)
            if scale != 1:
                size = (
                    max(IMAGE_SIZE, round(image.width * scale)),
                    max(IMAGE_SIZE, round(image.height * scale)),
                )
                image = image.resize(size, Image.BICUBIC)
            left, top = (image.width - IMAGE_SIZE) // 2, (image.height - IMAGE_SIZE) // 2
            image = image.crop((left, top, left + IMAGE_SIZE, top + IMAGE_SIZE))
            pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    except (OSError, UnidentifiedImageError) as error:
        raise DataError(f"cannot read image {path} ({error}); the dataset folder looks damaged") from None
    return pixels.view(IMAGE_SIZE, IMAGE_SIZE, 3).permute(2, 0, 1)


def decode_files(paths: list[Path], workers: int) -> torch.Tensor:
    # Threads suffice: Pillow releases the GIL while decoding.
    with ThreadPoolExecutor(workers) as pool:
        images = list(tqdm(pool.map(decode_image, paths), total=len(paths), desc="decoding", unit="img"))
    return torch.stack(images)


def tinyimagenet_subset(data_root: Path, size: int, seed: int, workers: int) -> tuple[torch.Tensor, list]:
    folder = find_tinyimagenet(data_root)
    wnids = (folder / "wnids.txt").read_text().split()
    groups = [sorted((folder / "train" / wnid / "images").glob("*.JPEG")) for wnid in wnids]
    paths = spread_subset(groups, size, seed)
    return decode_files(paths, workers), [str(path.relative_to(folder)) for path in paths]


def folder_subset(data_root: Path, size: int, seed: int, workers: int) -> tuple[torch.Tensor, list]:
    if not data_root.is_dir():
        raise DataError(f"--dataset folder needs --data-root to be a folder of images; {data_root} is not")
    by_parent: dict[Path, list[Path]] = {}
    for path in sorted(data_root.rglob("*")):
        if path.suffix.lower() in IMAGE_SUFFIXES and "cache" not in path.relative_to(data_root).parts[:1]:
            by_parent.setdefault(path.parent, []).append(path)
    if not by_parent:
        raise DataError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {data_root}")
    paths = spread_subset(list(by_parent.values()), size, seed)
    return decode_files(paths, workers), [str(path.relative_to(data_root)) for path in paths]


def torchvision_subset(name: str, data_root: Path, size: int, seed: int) -> tuple[torch.Tensor, list]:
    import torchvision.datasets

    dataset_class = {
        "cifar10": torchvision.datasets.CIFAR10,
        "mnist": torchvision.datasets.MNIST,
        "fashion-mnist": torchvision.datasets.FashionMNIST,
    }[name]
    socket.setdefaulttimeout(30)  # torchvision's download would otherwise wait forever offline
    try:
        dataset = dataset_class(str(data_root), train=True, download=True)
    except Exception as error:  # torchvision raises many kinds; all mean "no data here"
        raise DataError(
            f"{name} is not in {data_root} and torchvision could not download it ({error}). Run once with "
            f"internet access (or copy the torchvision {name} folder into {data_root}); to try the script "
            "without any download, run it with --dataset shapes."
        ) from None
    pixels = torch.as_tensor(dataset.data)
    pixels = pixels.permute(0, 3, 1, 2) if pixels.dim() == 4 else pixels.unsqueeze(1).expand(-1, 3, -1, -1)
    labels = torch.as_tensor(dataset.targets)
    groups = [torch.nonzero(labels == label).flatten().tolist() for label in labels.unique()]
    indices = spread_subset(groups, size, seed)
    images = F.interpolate(pixels[indices].float(), size=IMAGE_SIZE, mode="bilinear", align_corners=False)
    return images.round().clamp(0, 255).to(torch.uint8), indices


def load_images(dataset: str, data_root: Path, subset: int, seed: int, workers: int = 4) -> torch.Tensor:
    """The run's images as uint8 (N, 3, 64, 64). Real datasets are decoded once and cached
    in DATA_ROOT/cache, keyed by dataset, subset and seed; shapes are generated afresh.
    The decoding is this file's own (Pillow, bicubic, centre crop) rather than torchvision's
    transforms, whose resampling differs, so that cached subsets and results stay the same."""
    if dataset == "shapes":
        return make_shapes(subset, seed)
    data_root = Path(data_root)
    cache = data_root / "cache" / f"{dataset}-{subset}-s{seed}.pt"
    if cache.is_file():
        try:
            images = torch.load(cache, weights_only=True)["images"]
            if images.dtype == torch.uint8 and images.shape[1:] == (3, IMAGE_SIZE, IMAGE_SIZE):
                return images
        except Exception:  # a damaged cache is rebuilt below
            pass
        tqdm.write(f"note: {cache} is damaged; decoding the images again")
    if dataset == "tinyimagenet":
        images, sources = tinyimagenet_subset(data_root, subset, seed, workers)
    elif dataset == "folder":
        images, sources = folder_subset(data_root, subset, seed, workers)
    else:
        images, sources = torchvision_subset(dataset, data_root, subset, seed)
    cache.parent.mkdir(parents=True, exist_ok=True)
    payload = {"images": images, "sources": sources, "dataset": dataset, "seed": seed}
    gan_common.save_checkpoint(cache, payload)  # atomic: a temporary file, then a rename
    tqdm.write(f"cached {len(images)} decoded images in {cache}")
    return images


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


# ---------------------------------------------------------------------------------------
# Measures


def mean_pairwise_distance(images: torch.Tensor) -> torch.Tensor:
    # cdist, not pdist: pdist's sum differs in the 6th digit, which would change the logged
    # ratios of runs made before.
    flat = images.flatten(1).float()
    return torch.cdist(flat, flat).sum() / (len(flat) * (len(flat) - 1))


def diversity_ratio(generated: torch.Tensor, real: torch.Tensor) -> float:
    """Mean pairwise L2 distance among generated images over the same among real ones:
    about 1 when G is as varied as the data, far below 1 under mode collapse."""
    return (mean_pairwise_distance(generated) / mean_pairwise_distance(real)).item()


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] to the float [-1, 1] that Tanh produces."""
    return images.float() / 127.5 - 1.0


# ---------------------------------------------------------------------------------------

# ---------------------------------------------------------------------------------------
# Processes: torchrun starts one per device and sets WORLD_SIZE, RANK and LOCAL_RANK.
# A plain `python train_dcgan.py` is one process with no process group and no DDP wrapper.


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


# ---------------------------------------------------------------------------------------
# The run's state


@dataclass
class Run:
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
    g_ema: torch.optim.swa_utils.AveragedModel | None = None  # with --g-ema
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
    """log.csv and quality.csv (rank 0 only) and what the log rows need between steps."""

    log: gan_common.CSVLog | None
    quality: gan_common.CSVLog | None
    last_time: float
    last_step: int
    dominated_streak: int = 0
    last_row_step: int = -1  # step of this session's latest quality.csv row

    def write(self, name: str, row: dict) -> None:
        target = getattr(self, name)
        if target is not None:
            target.write(row)

    def close(self) -> None:
        for target in (self.log, self.quality):
            if target is not None:
                target.close()


# ---------------------------------------------------------------------------------------
# Setup


def prepare_run(args: argparse.Namespace, ranks: Ranks, run_dir: Path) -> Run:
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
    grid_noise = torch.randn(GRID_SAMPLES, NZ, 1, 1, generator=fixed).to(ranks.device)
    diversity_noise = torch.randn(DIVERSITY_SAMPLES, NZ, 1, 1, generator=fixed).to(ranks.device)
    reference = images[torch.randperm(len(images), generator=fixed)[:DIVERSITY_SAMPLES].to(ranks.device)]
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    data_order = torch.Generator().manual_seed(args.seed)
    eval_noise = torch.randn(args.eval_samples, NZ, 1, 1, generator=fixed).to(ranks.device)
    run = Run(
        args, ranks, run_dir, images, steps_per_epoch, amp_dtype, grid_noise, diversity_noise,
        to_unit(reference), data_order, eval_noise,
    )  # fmt: skip
    if ranks.is_main and not args.no_fid:
        run.feature_space, run.reference = quality_reference(args, images.cpu(), ranks.device)
    return run


def quality_reference(args: argparse.Namespace, images: torch.Tensor, device: torch.device) -> tuple:
    """The dataset's feature space and the features of --eval-samples of its images (a
    seeded draw, cached beside the data). Fails before any training when the feature space
    cannot be had (e.g. Inception weights offline)."""
    space = sample_quality.feature_space_for(args.dataset, args.data_root, args.inception_weights).to(device)
    count = min(args.eval_samples, len(images))
    real = images[torch.randperm(len(images), generator=torch.Generator().manual_seed(args.seed + 3))[:count]]
    cache = sample_quality.reference_cache_path(
        args.data_root, args.dataset, args.subset, args.seed, count, space
    )
    return space, sample_quality.reference_features(real, space, cache)


def build_nets(args: argparse.Namespace, ranks: Ranks) -> Nets:
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
    if args.amp != "fp16":  # under fp16 the scaler's skipped steps leave infinite gradients
        nets.noise_g = gan_common.GradientNoise(generator.parameters())
        nets.noise_d = gan_common.GradientNoise(discriminator.parameters())
    return nets


def wrap_for_ddp(nets: Nets, ranks: Ranks) -> None:
    nets.g_net, nets.d_net = nets.generator, nets.discriminator
    if not ranks.distributed:
        return
    # BatchNorm's running statistics are never used in training (sample grids too use batch
    # statistics), and re-broadcasting them at every forward breaks D's two forwards (real,
    # fake) before one backward: each rank keeps its own.
    device_ids = [ranks.device] if ranks.device.type == "cuda" else None
    nets.g_net = DistributedDataParallel(nets.generator, device_ids=device_ids, forward_sync_buffers=False)
    nets.d_net = DistributedDataParallel(
        nets.discriminator, device_ids=device_ids, forward_sync_buffers=False
    )


def trajectory(args: argparse.Namespace) -> dict:
    return {name: getattr(args, name) for name in TRAJECTORY_ARGS}


def resume(run: Run, nets: Nets, counters: Counters, sums: IntervalSums) -> None:
    """Loads the checkpoint into the nets, counters, sums and RNG streams."""
    path = run.run_dir / "checkpoint.pt"
    checkpoint = gan_common.load_checkpoint(path)
    if checkpoint.get("kind") != "dcgan" or checkpoint.get("trajectory_args") != trajectory(run.args):
        raise RunError(f"{path} is not a checkpoint of the run in {run.run_dir / 'config.json'}")
    nets.load_state_dicts(checkpoint, path)
    counters.step, counters.epoch = checkpoint["step"], checkpoint["epoch"]
    counters.batch_in_epoch, counters.d_figures = checkpoint["batch_in_epoch"], checkpoint["d_figures"]
    run.data_order.set_state(checkpoint["data_order_state"])
    ranks = run.ranks
    if checkpoint["world_size"] == ranks.world_size:
        if ranks.is_main:  # the other ranks' share of the sums is in rank 0's
            sums.values.copy_(checkpoint["interval_sums"])
        gan_common.set_rng_state(checkpoint["rng_by_rank"][ranks.rank])
        return
    # Another world size slices each epoch's shuffle differently, so a half-done epoch cannot
    # be finished exactly: skip its rest and start the next one. `step` goes on counting
    # optimizer steps, now of the new global batch.
    note = (
        f"note: {run.run_dir} ran on {checkpoint['world_size']} process(es) and resumes on "
        f"{ranks.world_size}: the global batch is now {run.global_batch}; the step count goes on from "
        f"{counters.step}"
    )
    if counters.batch_in_epoch:
        skipped = counters.epoch + 1
        note += f"; the rest of epoch {skipped} is skipped, training resumes at epoch {skipped + 1}"
        torch.randperm(len(run.images), generator=run.data_order)  # the skipped epoch's shuffle
        counters.epoch, counters.batch_in_epoch = counters.epoch + 1, 0
    ranks.say(note)
    # Fresh noise streams: the saved ones belong to ranks that no longer match.
    gan_common.seed_everything(hash((run.args.seed, ranks.rank, counters.step)) % 2**32)


def start_or_resume(run: Run, nets: Nets) -> tuple[Counters, IntervalSums]:
    counters, sums = Counters(), IntervalSums.zeros(run.ranks.device)
    if run.args.resume is not None:
        resume(run, nets, counters, sums)
    if run.ranks.is_main:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        space = run.feature_space
        facts = {"world_size": run.ranks.world_size, "global_batch": run.global_batch}
        facts["feature_space"] = None if space is None else space.name
        facts["feature_space_accuracy"] = None if space is None else space.classifier_accuracy
        facts["speed_settings"] = run.speed_settings
        gan_common.write_config(run.run_dir, SCRIPT, run.args, run.ranks.device, **facts)
    # The epochs left at this world size; with one world size throughout, this is
    # --epochs x steps per epoch.
    left = (run.args.epochs - counters.epoch) * run.steps_per_epoch - counters.batch_in_epoch
    counters.total_steps = counters.step + left
    if run.args.max_steps is not None:
        counters.total_steps = min(counters.total_steps, run.args.max_steps)
    counters.epoch_order_state = run.data_order.get_state()
    return counters, sums


def open_logs(run: Run, step: int) -> Logs:
    if not run.ranks.is_main:
        return Logs(None, None, time.perf_counter(), step)
    (run.run_dir / "samples").mkdir(exist_ok=True)
    log = gan_common.CSVLog(run.run_dir / "log.csv", gan_common.LOG_COLUMNS + LOG_EXTRA_COLUMNS, step)
    quality = gan_common.CSVLog(run.run_dir / "quality.csv", QUALITY_COLUMNS, step)
    return Logs(log, quality, time.perf_counter(), step)


def save(run: Run, nets: Nets, counters: Counters, sums: IntervalSums) -> None:
    """Every rank takes part (the sums and the RNG states are gathered); rank 0 writes."""
    sums_over_ranks = run.ranks.sum(sums.values).cpu()
    rng_by_rank = run.ranks.gather(gan_common.rng_state())
    if not run.ranks.is_main:
        return
    # The order generator as the current epoch's shuffle found it: resuming mid-epoch
    # replays that shuffle and skips the batches done.
    order_state = counters.epoch_order_state if counters.batch_in_epoch else run.data_order.get_state()
    payload = {
        "kind": "dcgan",
        "trajectory_args": trajectory(run.args),
        **nets.state_dicts(),
        "rng_by_rank": rng_by_rank,
        "world_size": run.ranks.world_size,
        "data_order_state": order_state,
        "step": counters.step,
        "epoch": counters.epoch,
        "batch_in_epoch": counters.batch_in_epoch,
        "interval_sums": sums_over_ranks,
        "d_figures": counters.d_figures,
    }
    gan_common.save_checkpoint(run.run_dir / "checkpoint.pt", payload)


# ---------------------------------------------------------------------------------------
# Training


def d_inputs(run: Run, batch: torch.Tensor, step: int, total_steps: int) -> torch.Tensor:
    """Instance noise on what D sees, annealed linearly to 0 over the run."""
    if run.args.instance_noise == 0:
        return batch
    std = run.args.instance_noise * max(0.0, 1.0 - step / total_steps)
    return batch + std * torch.randn_like(batch)


def targets(run: Run, bounds: list[float] | None, value: float, n: int) -> torch.Tensor:
    if bounds is None:
        return torch.full((n,), value, device=run.ranks.device)
    return torch.empty(n, device=run.ranks.device).uniform_(*bounds)


def d_loss(run: Run, d_net: nn.Module, real, fake, counters: Counters) -> tuple[torch.Tensor, ...]:
    """D's loss on a real and a fake batch, and its logits of each."""
    args, n = run.args, len(real)
    with run.autocast():
        logits_real = d_net(d_inputs(run, real, counters.step, counters.total_steps))
        logits_fake = d_net(d_inputs(run, fake, counters.step, counters.total_steps))
        loss = F.binary_cross_entropy_with_logits(
            logits_real, targets(run, args.real_label_range, args.label_smooth, n)
        ) + F.binary_cross_entropy_with_logits(logits_fake, targets(run, args.fake_label_range, 0.0, n))
    return loss, logits_real.detach().float(), logits_fake.detach().float()


@contextlib.contextmanager
def scoring_only(module: nn.Module, device: torch.device):
    """No graph, and the training goes on as if the forward passes inside never ran: they
    draw none of its random numbers and leave BatchNorm's running statistics as they were."""
    buffers = [buffer.clone() for buffer in module.buffers()]
    with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        yield
        for buffer, saved in zip(module.buffers(), buffers):
            buffer.copy_(saved)


def train_step(run: Run, nets: Nets, real: torch.Tensor, counters: Counters, logged: bool) -> StepResult:
    """D's step (every --d-every steps), then G's; the figures stay on the device."""
    device, scaler = run.ranks.device, nets.scaler
    with run.autocast():
        fake = nets.g_net(torch.randn(len(real), NZ, 1, 1, device=device))
    trained_d = counters.step % run.args.d_every == 0
    scores, grad_norm_d = None, None
    if trained_d:
        nets.opt_d.zero_grad(set_to_none=True)
        scores = d_loss(run, nets.d_net, real, fake.detach(), counters)
        scaler.scale(scores[0]).backward()
        if logged:  # DDP averaged the gradients: every rank sees the global batch's norm
            scaler.unscale_(nets.opt_d)
            grad_norm_d = gan_common.grad_norm(nets.discriminator.parameters())
        scaler.step(nets.opt_d)
        if nets.noise_d is not None:
            nets.noise_d.update()
    elif logged:
        with scoring_only(nets.discriminator, device):
            scores = d_loss(run, nets.d_net, real, fake.detach(), counters)

    # Non-saturating G loss: G wants D to call its images real (target 1). This backward
    # also fills D's gradients, which D's next step zeroes unused: under DDP they are left
    # local rather than all-reduced.
    nets.opt_g.zero_grad(set_to_none=True)
    with nets.d_net.no_sync() if run.ranks.distributed else contextlib.nullcontext():
        with run.autocast():
            logits_g = nets.d_net(d_inputs(run, fake, counters.step, counters.total_steps))
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
        result.dominated = gan_common.d_dominated(result.d_x, result.d_g_z, run.real_label)
    return result


def log_step(run: Run, nets: Nets, counters: Counters, result: StepResult, logs: Logs, bar: tqdm) -> None:
    """A log.csv row: means over ranks; D's optimizer figures and gradient norm are those of
    its latest update."""
    ranks, now = run.ranks, time.perf_counter()
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
    logs.dominated_streak = logs.dominated_streak + run.args.log_every if dominated.item() > 0.5 else 0
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


@torch.no_grad()
def write_grid(run: Run, nets: Nets, name: str) -> None:
    # Train-mode BatchNorm, as in the PyTorch example: early running statistics lag far
    # behind the batch ones. The running statistics this updates are never used in training.
    # Every rank runs G (SyncBatchNorm's forward is a collective); rank 0 saves.
    with run.autocast():
        grid = nets.generator(run.grid_noise).float()
    if run.ranks.is_main:
        save_image(grid, run.run_dir / "samples" / name, nrow=8, normalize=True, value_range=(-1, 1))
    if nets.g_ema is not None:
        with scoring_only(nets.g_ema.module, run.ranks.device), run.autocast():
            grid = nets.g_ema.module(run.grid_noise).float()
        if run.ranks.is_main:
            (run.run_dir / "samples" / "ema").mkdir(exist_ok=True)
            save_image(
                grid, run.run_dir / "samples" / "ema" / name, nrow=8, normalize=True, value_range=(-1, 1)
            )


@torch.no_grad()
def measure_diversity(run: Run, nets: Nets, step: int) -> float:
    with run.autocast():
        generated = nets.generator(run.diversity_noise[: len(run.real_reference)]).float()
    ratio = diversity_ratio(generated, run.real_reference)
    # A fresh G draws near-identical images; judge collapse only once it had time to spread.
    if ratio < COLLAPSE_RATIO and step >= min(run.steps_per_epoch, COLLAPSE_GRACE_STEPS):
        run.ranks.say(
            f"warning: step {step}: generated images are far less varied than real ones (diversity "
            f"ratio {ratio:.2f}), a sign of mode collapse; {STABILISER_HINT}"
        )
    return ratio


@torch.no_grad()
def sample_metrics(run: Run, generator: nn.Module, suffix: str = "") -> dict:
    """sample_quality's measures of --eval-samples images of `generator` (rank 0, without
    --no-fid), named with `suffix`. Every rank generates (SyncBatchNorm's forward is a
    collective); generating changes nothing in the training (scoring_only)."""
    # Only rank 0 scores; the other ranks generate only to join SyncBatchNorm's collectives.
    if run.args.no_fid or (run.reference is None and not run.args.sync_bn):
        return {}
    images = []
    with scoring_only(generator, run.ranks.device):
        for noise in run.eval_noise.split(EVAL_BATCH):
            with run.autocast():
                images.append(sample_quality.from_tanh(generator(noise).float()))
    if run.reference is None:
        return {}
    metrics = sample_quality.evaluate(torch.cat(images), run.reference, run.feature_space)
    return {f"{name}{suffix}": metrics[name] for name in SAMPLE_COLUMNS if name in metrics}


def evaluate(run: Run, nets: Nets, counters: Counters, sums: IntervalSums, logs: Logs) -> None:
    """quality.csv's row: the means over the steps since the last row, the diversity ratio
    and the sample-quality measures, of G and of its moving average (--g-ema)."""
    start = time.perf_counter()
    row = {"epoch": counters.epoch, "step": counters.step, **sums.means(run.ranks)}
    row["diversity_ratio"] = measure_diversity(run, nets, counters.step)
    row.update(sample_metrics(run, nets.generator))
    if nets.g_ema is not None:
        ema = nets.g_ema.module
        with scoring_only(ema, run.ranks.device), run.autocast():
            generated = ema(run.diversity_noise[: len(run.real_reference)]).float()
        row["diversity_ratio_ema"] = diversity_ratio(generated, run.real_reference)
        row.update(sample_metrics(run, ema, "_ema"))
    row["eval_seconds"] = time.perf_counter() - start
    logs.write("quality", row)
    logs.last_row_step = counters.step
    shown = [key for key in QUALITY_SHOWN if key in row]
    summary = " ".join(f"{key} {row[key]:.4g}" for key in shown)
    run.ranks.say(f"epoch {counters.epoch}/{run.args.epochs} step {counters.step}: {summary}")
    sums.values.zero_()


def end_epoch(run: Run, nets: Nets, counters: Counters, sums: IntervalSums, logs: Logs) -> None:
    """quality.csv's row (without --eval-every), the epoch's grid and a checkpoint."""
    counters.epoch += 1
    counters.batch_in_epoch = 0
    if run.args.eval_every is None:
        evaluate(run, nets, counters, sums, logs)
    write_grid(run, nets, f"epoch_{counters.epoch:03d}.png")
    save(run, nets, counters, sums)


def train_epochs(
    run: Run, nets: Nets, counters: Counters, sums: IntervalSums, stop: gan_common.StopSignal
) -> None:
    """Steps until --epochs, --max-steps or a signal; an epoch's end writes its row, grid
    and checkpoint."""
    args, ranks = run.args, run.ranks
    logs = open_logs(run, counters.step)
    bar = tqdm(
        total=counters.total_steps,
        initial=counters.step,
        unit="step",
        dynamic_ncols=True,
        disable=not ranks.is_main,
    )
    while counters.step < counters.total_steps and not ranks.agreed_stop(stop.signum):
        counters.epoch_order_state = run.data_order.get_state()
        # Every rank draws the same shuffle and takes its own --bs images of each global batch.
        order = torch.randperm(len(run.images), generator=run.data_order).to(ranks.device)
        while counters.batch_in_epoch < run.steps_per_epoch and counters.step < counters.total_steps:
            start = counters.batch_in_epoch * run.global_batch + ranks.rank * args.bs
            real = to_unit(run.images[order[start : start + args.bs]])
            if args.channels_last:
                real = real.contiguous(memory_format=torch.channels_last)
            logged = (counters.step + 1) % args.log_every == 0
            result = train_step(run, nets, real, counters, logged)
            sums.add(result)
            counters.step += 1
            counters.batch_in_epoch += 1
            bar.update()
            if logged:
                log_step(run, nets, counters, result, logs, bar)
            after_step(run, nets, counters, sums, logs)
            if ranks.agreed_stop(stop.signum):
                break
        if counters.batch_in_epoch < run.steps_per_epoch:
            break  # stopped mid-epoch: --max-steps or a signal
        end_epoch(run, nets, counters, sums, logs)
    finished = counters.step == counters.total_steps and not ranks.agreed_stop(stop.signum)
    if finished and logs.last_row_step != counters.step:
        evaluate(run, nets, counters, sums, logs)  # the run's final state always gets a row
    bar.close()
    logs.close()


def after_step(run: Run, nets: Nets, counters: Counters, sums: IntervalSums, logs: Logs) -> None:
    """The grid of --sample-every and the evaluation of --eval-every, when due."""
    args, step = run.args, counters.step
    epoch_done = counters.batch_in_epoch == run.steps_per_epoch
    if args.sample_every is not None and step % args.sample_every == 0 and not epoch_done:
        write_grid(run, nets, f"step_{step:06d}.png")
        measure_diversity(run, nets, step)
    if args.eval_every is not None and step % args.eval_every == 0:
        evaluate(run, nets, counters, sums, logs)


def train(args: argparse.Namespace) -> None:
    ranks = join_processes(args)
    check_args(args, ranks.device)
    speed = speed_settings.resolve(args, ranks.device)
    ranks.say(f"speed settings: --amp {args.amp}, channels_last {args.channels_last} ({speed['why']})")
    torch.backends.cudnn.benchmark = False  # its kernel choice varies from run to run
    gan_common.seed_everything(args.seed)
    run_dir = Path(args.out or f"runs/dcgan-{args.dataset}-{args.g_opt}_{args.d_opt}-s{args.seed}")
    gan_common.check_run_folder(run_dir, resuming=args.resume is not None)
    run = prepare_run(args, ranks, run_dir)
    run.speed_settings = speed
    nets = build_nets(args, ranks)
    counters, sums = start_or_resume(run, nets)
    if counters.step >= counters.total_steps:
        ranks.say(
            f"{run_dir} already ran {counters.step} steps; pass a larger --epochs or --max-steps to go on"
        )
        return
    wrap_for_ddp(nets, ranks)
    first_step, start_time = counters.step, time.perf_counter()
    stop = gan_common.StopSignal(announce=ranks.is_main)
    train_epochs(run, nets, counters, sums, stop)
    steps_per_sec = (counters.step - first_step) / (time.perf_counter() - start_time)
    stop.restore()
    if counters.batch_in_epoch > 0:  # mid-epoch stop: the epoch-end save did not cover it
        save(run, nets, counters, sums)
    # After the checkpoint: this forward pass updates G's BatchNorm running statistics.
    write_grid(run, nets, "final.png")
    if ranks.distributed:
        check_replicas([nets.generator, nets.discriminator], run_dir, ranks)
    stopped_by = ranks.agreed_stop(stop.signum)
    if stopped_by:
        launcher = f"torchrun --nproc_per_node {ranks.world_size}" if ranks.distributed else "python"
        if not ranks.is_main:
            sys.exit(128 + stopped_by)
        gan_common.exit_stopped(stopped_by, counters.step, f"{launcher} {SCRIPT} --resume {run_dir}")
    if ranks.is_main:
        print(
            f"done: {counters.step} steps ({steps_per_sec:.2f} steps/s this session). Outputs in {run_dir}/: "
            "config.json, log.csv, quality.csv, checkpoint.pt, samples/ (final grid: samples/final.png)"
        )


def score_images(args: argparse.Namespace) -> None:
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
            score_images(args)
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
