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
import signal
import socket
import sys
import time
import urllib.error
import urllib.request
import zipfile
from concurrent.futures import ThreadPoolExecutor
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
from gan_common import positive_int

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
# Health checks. D "wins outright" when it rejects fakes and is as sure of the reals as its
# labels allow (with real label 0.9 the best D(x) is 0.9, so "near 1" means near the label).
DOMINANCE_FAKE = 0.05
DOMINANCE_REAL_MARGIN = 0.15
DOMINANCE_PATIENCE_STEPS = 200
COLLAPSE_RATIO = 0.3
COLLAPSE_GRACE_STEPS = 500
STABILISER_HINT = (
    "try --lr-d 5e-5, --instance-noise 0.1, --d-every 2, --label-smooth 0.8, "
    "--real-label-range 0.7 1.0 or --d-dropout 0.3"
)
# Arguments a resumed run may change; everything else comes from the run's config.json.
RESUME_OVERRIDABLE = {"resume", "epochs", "max_steps", "device", "log_every", "sample_every", "workers"}
QUALITY_COLUMNS = [
    "epoch",
    "step",
    "loss_d_mean",
    "loss_g_mean",
    "d_x_mean",
    "d_g_z_mean",
    "diversity_ratio",
    "d_dominated_share",
]
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
        default="data",
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
    train.add_argument("--amp", choices=("off", "bf16", "fp16"), default="off", help="autocast on CUDA")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
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
    output = parser.add_argument_group("output")
    output.add_argument(
        "--out", default=None, help="run folder (default runs/dcgan-<dataset>-<g>_<d>-s<seed>)"
    )
    output.add_argument("--resume", default=None, metavar="DIR", help="continue the run in DIR")
    output.add_argument("--log-every", type=positive_int, default=50, help="log.csv row every N steps")
    output.add_argument("--sample-every", type=positive_int, default=None, help="grid every N steps")
    return parser


class DataError(Exception):
    """A problem with the data the user can fix; main() prints it without a traceback."""


class BadRun(Exception):
    """A resume that cannot continue; main() prints it without a traceback."""


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
    """Downloads the official zip to a .part file, checks its size and MD5, extracts it."""
    url = os.environ.get("CASMO_TINYIMAGENET_URL", TINYIMAGENET_URL)
    zip_path = data_root / "tiny-imagenet-200.zip"
    data_root.mkdir(parents=True, exist_ok=True)
    if not zip_path.exists():
        part = Path(f"{zip_path}.part")
        tqdm.write(f"Tiny ImageNet is not in {data_root}; downloading {url}")
        try:
            with urllib.request.urlopen(url, timeout=30) as response, open(part, "wb") as out:
                total = int(response.headers.get("Content-Length") or TINYIMAGENET_BYTES)
                with tqdm(total=total, unit="B", unit_scale=True, desc="tiny-imagenet-200.zip") as bar:
                    while chunk := response.read(1 << 20):
                        out.write(chunk)
                        bar.update(len(chunk))
        except (urllib.error.URLError, OSError, ValueError) as error:
            part.unlink(missing_ok=True)
            raise DataError(
                f"Tiny ImageNet is not in {data_root} and downloading it from {url} failed ({error}). "
                f"Download tiny-imagenet-200.zip ({TINYIMAGENET_BYTES:,} bytes, MD5 {TINYIMAGENET_MD5}) "
                f"on a machine with internet access and extract it into {data_root}, so that "
                f"{data_root / 'tiny-imagenet-200' / 'wnids.txt'} exists, or point --data-root at it. "
                "To try the script without any download, run it with --dataset shapes."
            ) from None
        os.replace(part, zip_path)
    check_zip(zip_path)
    # Extract next to the target and rename, so an interrupted extraction leaves no half folder.
    staging = data_root / ".tiny-imagenet-200.extracting"
    with zipfile.ZipFile(zip_path) as archive:
        archive.extractall(staging)
    os.replace(staging / "tiny-imagenet-200", data_root / "tiny-imagenet-200")
    staging.rmdir()


def check_zip(zip_path: Path) -> None:
    size = zip_path.stat().st_size
    md5 = hashlib.md5()
    with open(zip_path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            md5.update(chunk)
    if size != TINYIMAGENET_BYTES or md5.hexdigest() != TINYIMAGENET_MD5:
        bad = Path(f"{zip_path}.bad")
        os.replace(zip_path, bad)
        raise DataError(
            f"{zip_path} is not the official archive ({size:,} bytes, MD5 {md5.hexdigest()}; expected "
            f"{TINYIMAGENET_BYTES:,} bytes, MD5 {TINYIMAGENET_MD5}); moved it to {bad}. Run again to "
            "download it afresh."
        )


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


def load_images(args: argparse.Namespace) -> torch.Tensor:
    """The run's images as uint8 (N, 3, 64, 64). Real datasets are decoded once and cached
    in DATA_ROOT/cache, keyed by dataset, subset and seed; shapes are generated afresh."""
    if args.dataset == "shapes":
        return make_shapes(args.subset, args.seed)
    data_root = Path(args.data_root)
    cache = data_root / "cache" / f"{args.dataset}-{args.subset}-s{args.seed}.pt"
    if cache.is_file():
        try:
            cached = torch.load(cache, weights_only=True)
            images = cached["images"]
            if images.dtype == torch.uint8 and images.shape[1:] == (3, IMAGE_SIZE, IMAGE_SIZE):
                return images
        except Exception:  # a damaged cache is rebuilt below
            pass
        tqdm.write(f"note: {cache} is damaged; decoding the images again")
    if args.dataset == "tinyimagenet":
        images, sources = tinyimagenet_subset(data_root, args.subset, args.seed, args.workers)
    elif args.dataset == "folder":
        images, sources = folder_subset(data_root, args.subset, args.seed, args.workers)
    else:
        images, sources = torchvision_subset(args.dataset, data_root, args.subset, args.seed)
    cache.parent.mkdir(parents=True, exist_ok=True)
    payload = {"images": images, "sources": sources, "dataset": args.dataset, "seed": args.seed}
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
    flat = images.flatten(1).float()
    distances = torch.cdist(flat, flat)
    n = len(flat)
    return distances.sum() / (n * (n - 1))


def diversity_ratio(generated: torch.Tensor, real: torch.Tensor) -> float:
    """Mean pairwise L2 distance among generated images over the same among real ones:
    about 1 when G is as varied as the data, far below 1 under mode collapse."""
    return (mean_pairwise_distance(generated) / mean_pairwise_distance(real)).item()


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] to the float [-1, 1] that Tanh produces."""
    return images.float() / 127.5 - 1.0


# ---------------------------------------------------------------------------------------


def resolve_args(argv: list[str] | None) -> argparse.Namespace:
    """The parsed arguments; with --resume, the run's own arguments from its config.json,
    with only the ones in RESUME_OVERRIDABLE taken from the command line."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.resume is None:
        return args
    config = gan_common.read_config(Path(args.resume), SCRIPT)
    # Parse again into a namespace pre-filled with a marker: argparse fills in defaults
    # only where the namespace lacks a value, so what is not the marker was given.
    unset = object()
    probe = parser.parse_args(argv, namespace=argparse.Namespace(**dict.fromkeys(vars(args), unset)))
    given = {name: value for name, value in vars(probe).items() if value is not unset}
    # Options added since the run started take their defaults.
    defaults = {name: parser.get_default(name) for name in vars(args)}
    saved = argparse.Namespace(**{**defaults, **config["args"]})
    for name, value in given.items():
        if name in RESUME_OVERRIDABLE:
            setattr(saved, name, value)
        elif value != getattr(saved, name, None):
            option = "--" + name.replace("_", "-")
            raise BadRun(
                f"{option} cannot change when resuming (the run used {getattr(saved, name, None)!r})"
            )
    saved.out = args.resume
    return saved


def check_args(args: argparse.Namespace, device: torch.device) -> None:
    if args.amp != "off" and device.type != "cuda":
        raise BadRun(f"--amp {args.amp} needs a CUDA device; leave --amp off on {device}")
    if not 0.0 <= args.d_dropout < 1.0:
        raise BadRun(f"--d-dropout must lie in [0, 1), got {args.d_dropout}")
    if args.instance_noise < 0:
        raise BadRun(f"--instance-noise must be >= 0, got {args.instance_noise}")
    for option, bounds in (
        ("--real-label-range", args.real_label_range),
        ("--fake-label-range", args.fake_label_range),
    ):
        if bounds is not None and bounds[0] > bounds[1]:
            raise BadRun(f"{option} LO HI needs LO <= HI, got {bounds[0]} {bounds[1]}")


# ---------------------------------------------------------------------------------------
# Several processes: torchrun starts one per device and sets WORLD_SIZE, RANK and LOCAL_RANK.
# A plain `python train_dcgan.py` is one process with no process group and no DDP wrapper.


def join_processes(args: argparse.Namespace) -> tuple[torch.device, int, int, dist.ProcessGroup | None]:
    """The device, this process's rank and the world size. Under torchrun it also joins the
    process group (NCCL on GPUs, gloo on the CPU) and returns a gloo group for the small
    host-side exchanges (stop flags, RNG states, checksums), which so need no device sync."""
    device = gan_common.pick_device(args.device)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return device, 0, 1, None
    if device.type == "cuda":
        if device.index is not None:
            raise BadRun(
                f"--device {args.device} names one GPU; under torchrun each process takes "
                "cuda:LOCAL_RANK, so pass --device cuda or auto"
            )
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    elif args.sync_bn:
        raise BadRun("--sync-bn needs GPUs: SyncBatchNorm has no CPU implementation")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, dist.get_rank(), world_size, dist.new_group(backend="gloo")


def check_replicas(
    modules: list[nn.Module], run_dir: Path, rank: int, world_size: int, group: dist.ProcessGroup
) -> None:
    """Rank 0 gathers a checksum of every rank's parameters and writes replicas.json. DDP
    averages the gradients before each step, so identical replicas show that every rank's
    optimizer (CASMO's gate included) took the same steps. Buffers are left out: with plain
    BatchNorm each rank keeps its own running statistics, which training never reads."""
    flat = torch.cat([p.detach().float().flatten().cpu() for module in modules for p in module.parameters()])
    mine = {
        "rank": rank,
        "sum": flat.double().sum().item(),
        "sha256": hashlib.sha256(flat.numpy().tobytes()).hexdigest(),
    }
    checksums: list = [None] * world_size
    dist.all_gather_object(checksums, mine, group=group)
    if rank == 0:
        identical = len({checksum["sha256"] for checksum in checksums}) == 1
        report = {"world_size": world_size, "identical": identical, "ranks": checksums}
        gan_common.atomic_write_text(run_dir / "replicas.json", json.dumps(report, indent=2) + "\n")
        verdict = "identical" if identical else "DIFFERENT (see replicas.json)"
        print(f"parameters on the {world_size} processes: {verdict}")


# Arguments that define the training trajectory; a checkpoint must match them all.
TRAJECTORY_ARGS = (
    "dataset", "subset", "bs", "g_opt", "d_opt", "lr_g", "lr_d", "beta1", "beta2", "robustness", "c_min",
    "rel_floor", "amp", "seed", "label_smooth", "real_label_range", "fake_label_range", "instance_noise",
    "d_every", "d_dropout",
)  # fmt: skip


def train(args: argparse.Namespace) -> None:
    device, rank, world_size, control_group = join_processes(args)
    distributed = world_size > 1
    is_main = rank == 0  # the one process that prints and writes the run folder
    check_args(args, device)
    torch.backends.cudnn.benchmark = False  # its kernel choice varies from run to run
    gan_common.seed_everything(args.seed)
    run_dir = Path(args.out or f"runs/dcgan-{args.dataset}-{args.g_opt}_{args.d_opt}-s{args.seed}")
    resuming = args.resume is not None
    if not resuming and (run_dir / "checkpoint.pt").exists():
        raise BadRun(
            f"{run_dir} already holds a run; continue it with --resume {run_dir}, or pass another --out"
        )

    # Under torchrun rank 0 loads first: it alone decodes and caches a dataset, and the others
    # read its cache (on a shared file system) instead of racing it to write the same file.
    if not is_main:
        dist.barrier(group=control_group)
    images = load_images(args).to(device)  # batches are drawn on the device, no loader
    if distributed and is_main:
        dist.barrier(group=control_group)
    # One step takes --bs images on each process: one global batch of --bs x world size.
    global_batch = args.bs * world_size
    steps_per_epoch = len(images) // global_batch
    if steps_per_epoch == 0:
        processes = f" on each of {world_size} processes" if distributed else ""
        raise DataError(f"{len(images)} images cannot fill one batch of --bs {args.bs}{processes}")

    generator = Generator().to(device)
    discriminator = Discriminator(dropout=args.d_dropout).to(device)
    generator.apply(init_weights)
    discriminator.apply(init_weights)
    if distributed and args.sync_bn:
        generator = nn.SyncBatchNorm.convert_sync_batchnorm(generator)
        discriminator = nn.SyncBatchNorm.convert_sync_batchnorm(discriminator)
    if distributed:
        # The weights above come from --seed alike on every rank; noise, instance noise and
        # random labels must differ between ranks, or they would all draw the same samples.
        gan_common.seed_everything(args.seed + rank)
    try:
        opt_g = gan_common.make_optimizer(args.g_opt, generator.parameters(), args.lr_g, args)
        opt_d = gan_common.make_optimizer(args.d_opt, discriminator.parameters(), args.lr_d, args)
    except ValueError as error:
        raise BadRun(str(error)) from None
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    # bf16 keeps fp32's range; only fp16 needs its losses scaled.
    scaler = torch.amp.GradScaler("cuda", enabled=args.amp == "fp16")

    # Fixed inputs, drawn from their own generator so they use none of the training RNG.
    fixed = torch.Generator().manual_seed(args.seed + 1)
    grid_noise = torch.randn(GRID_SAMPLES, NZ, 1, 1, generator=fixed).to(device)
    diversity_noise = torch.randn(DIVERSITY_SAMPLES, NZ, 1, 1, generator=fixed).to(device)
    real_reference = to_unit(
        images[torch.randperm(len(images), generator=fixed)[:DIVERSITY_SAMPLES].to(device)]
    )
    data_order = torch.Generator().manual_seed(args.seed)  # shuffles each epoch; saved for resume

    step, epoch, batch_in_epoch = 0, 0, 0
    # loss_d, loss_g, d_x, d_g_z, dominated, D steps: this rank's sums, added over ranks
    # at the epoch's end; a checkpoint holds the sums over all ranks.
    epoch_sums = torch.zeros(6, device=device)
    if resuming:
        checkpoint = gan_common.load_checkpoint(run_dir / "checkpoint.pt")
        if checkpoint.get("kind") != "dcgan" or checkpoint.get("trajectory_args") != {
            name: getattr(args, name) for name in TRAJECTORY_ARGS
        }:
            raise BadRun(
                f"{run_dir / 'checkpoint.pt'} is not a checkpoint of the run in {run_dir / 'config.json'}"
            )
        try:
            generator.load_state_dict(checkpoint["generator"])
            discriminator.load_state_dict(checkpoint["discriminator"])
            opt_g.load_state_dict(checkpoint["opt_g"])
            opt_d.load_state_dict(checkpoint["opt_d"])
            scaler.load_state_dict(checkpoint["scaler"])
        except (RuntimeError, KeyError, ValueError) as error:
            raise BadRun(f"{run_dir / 'checkpoint.pt'} does not fit this model: {error}") from None
        step, epoch, batch_in_epoch = checkpoint["step"], checkpoint["epoch"], checkpoint["batch_in_epoch"]
        data_order.set_state(checkpoint["data_order_state"])
        saved_world_size = checkpoint.get("world_size", 1)
        if saved_world_size == world_size:
            if is_main:  # the others' share of the sums is in rank 0's
                epoch_sums = checkpoint["epoch_sums"].to(device)
            gan_common.set_rng_state(checkpoint.get("rng_by_rank", [checkpoint["rng"]])[rank])
        else:
            # Another world size slices each epoch's shuffle differently, so a half-done epoch
            # cannot be finished exactly: skip its rest and start the next one. `step` goes on
            # counting optimizer steps, now of the new global batch.
            note = (
                f"note: {run_dir} ran on {saved_world_size} process(es) and resumes on {world_size}: "
                f"the global batch is now {global_batch}; the step count goes on from {step}"
            )
            if batch_in_epoch:
                note += f"; the rest of epoch {epoch + 1} is skipped, training resumes at epoch {epoch + 2}"
                torch.randperm(len(images), generator=data_order)  # the skipped epoch's shuffle
                epoch, batch_in_epoch = epoch + 1, 0
            if is_main:
                tqdm.write(note)
            # Fresh noise streams: the saved ones belong to ranks that no longer match.
            gan_common.seed_everything(hash((args.seed, rank, step)) % 2**32)
    elif is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        run_facts = {"world_size": world_size, "global_batch": global_batch}
        gan_common.write_config(run_dir, SCRIPT, args, device, extra=run_facts)
    # The epochs left at this world size; with the same world size throughout, this is
    # --epochs x steps per epoch.
    total_steps = step + (args.epochs - epoch) * steps_per_epoch - batch_in_epoch
    if args.max_steps is not None:
        total_steps = min(total_steps, args.max_steps)
    if step >= total_steps:
        if is_main:
            tqdm.write(f"{run_dir} already ran {step} steps; pass a larger --epochs or --max-steps to go on")
        return

    # Training runs through DDP's wrappers, which average the gradients over ranks in the
    # backward pass; checkpoints and sample grids use the modules inside (no "module." prefix).
    g_net, d_net = generator, discriminator
    if distributed:
        # BatchNorm's running statistics are never used in training (sample grids too use
        # batch statistics), and re-broadcasting them at every forward breaks D's two forwards
        # (real, fake) before one backward: each rank keeps its own.
        device_ids = [device] if device.type == "cuda" else None
        g_net = DistributedDataParallel(generator, device_ids=device_ids, forward_sync_buffers=False)
        d_net = DistributedDataParallel(discriminator, device_ids=device_ids, forward_sync_buffers=False)

    epoch_start_order_state = data_order.get_state()
    if is_main:
        (run_dir / "samples").mkdir(exist_ok=True)
        # Rows past the checkpoint's step (all of them in a fresh run over one that died before
        # its first checkpoint) are dropped: they will be logged again.
        log = gan_common.CSVLog(
            run_dir / "log.csv",
            gan_common.LOG_COLUMNS + LOG_EXTRA_COLUMNS,
            resume_after_step=step,
        )
        quality_log = gan_common.CSVLog(run_dir / "quality.csv", QUALITY_COLUMNS, resume_after_step=step)

    def summed_over_ranks(values: torch.Tensor) -> torch.Tensor:
        """A copy summed over ranks, on the device (NCCL's all-reduce takes device tensors)."""
        if not distributed:
            return values
        total = values.clone()
        dist.all_reduce(total)
        return total

    def mean_over_ranks(*values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """What a user reads as one number (a loss, D(x)) is the mean over ranks: an
        all-reduce, so called on logged steps only."""
        if not distributed:
            return values
        stacked = torch.stack([value.detach().float() for value in values])
        return tuple(summed_over_ranks(stacked) / world_size)

    def save(path: Path) -> None:
        # Every rank takes part (the sums and the RNG states are gathered); rank 0 writes.
        sums_over_ranks = summed_over_ranks(epoch_sums).cpu()
        rng_by_rank = [gan_common.rng_state()]
        if distributed:
            rng_by_rank = [None] * world_size
            dist.all_gather_object(rng_by_rank, gan_common.rng_state(), group=control_group)
        if not is_main:
            return
        gan_common.save_checkpoint(
            path,
            {
                "kind": "dcgan",
                "trajectory_args": {name: getattr(args, name) for name in TRAJECTORY_ARGS},
                "generator": generator.state_dict(),
                "discriminator": discriminator.state_dict(),
                "opt_g": opt_g.state_dict(),
                "opt_d": opt_d.state_dict(),
                "scaler": scaler.state_dict(),
                "rng": rng_by_rank[0],
                "rng_by_rank": rng_by_rank,
                "world_size": world_size,
                # The order generator as the current epoch's shuffle found it: resuming
                # mid-epoch replays that shuffle and skips the batches done.
                "data_order_state": epoch_start_order_state if batch_in_epoch else data_order.get_state(),
                "step": step,
                "epoch": epoch,
                "batch_in_epoch": batch_in_epoch,
                "epoch_sums": sums_over_ranks,
            },
        )

    @torch.no_grad()
    def write_grid(name: str) -> None:
        # Train-mode BatchNorm, as in the PyTorch example: early running statistics lag far
        # behind the batch ones. The running statistics this updates are never used in training.
        # Every rank runs G (SyncBatchNorm's forward is a collective); rank 0 saves.
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            grid = generator(grid_noise).float()
        if is_main:
            save_image(grid, run_dir / "samples" / name, nrow=8, normalize=True, value_range=(-1, 1))

    @torch.no_grad()
    def measure_diversity() -> float:
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            generated = generator(diversity_noise[: len(real_reference)]).float()
        ratio = diversity_ratio(generated, real_reference)
        # A fresh G draws near-identical images; judge collapse only once it had time to spread.
        if is_main and ratio < COLLAPSE_RATIO and step >= min(steps_per_epoch, COLLAPSE_GRACE_STEPS):
            tqdm.write(
                f"warning: step {step}: generated images are far less varied than real ones (diversity "
                f"ratio {ratio:.2f}), a sign of mode collapse; {STABILISER_HINT}"
            )
        return ratio

    def d_inputs(batch: torch.Tensor) -> torch.Tensor:
        """Instance noise on what D sees, annealed linearly to 0 over the run."""
        if args.instance_noise == 0:
            return batch
        std = args.instance_noise * max(0.0, 1.0 - step / total_steps)
        return batch + std * torch.randn_like(batch)

    def targets(bounds: list[float] | None, value: float, n: int) -> torch.Tensor:
        if bounds is None:
            return torch.full((n,), value, device=device)
        return torch.empty(n, device=device).uniform_(*bounds)

    # The first Ctrl-C (or SIGTERM) stops after the current step, so the checkpoint is exact;
    # a second one interrupts at once.
    stop_signal: list[int] = []

    def request_stop(signum, frame):
        stop_signal.append(signum)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if is_main:
            tqdm.write("stopping after this step (Ctrl-C again to abort without saving)")

    def agreed_stop_signal() -> int:
        """The signal that stops the run, 0 while none came. Under torchrun the ranks agree
        after every step (over gloo, no device sync): a rank stopping alone would leave the
        others waiting in DDP's all-reduce."""
        signum = stop_signal[0] if stop_signal else 0
        if not distributed:
            return signum
        flag = torch.tensor(signum)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=control_group)
        return int(flag)

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)

    real_target_mean = args.label_smooth if args.real_label_range is None else sum(args.real_label_range) / 2
    dominated_streak = 0
    last_log_time, last_log_step = time.perf_counter(), step
    bar = tqdm(total=total_steps, initial=step, unit="step", dynamic_ncols=True, disable=not is_main)
    first_step, start_time = step, time.perf_counter()
    while step < total_steps and not agreed_stop_signal():
        epoch_start_order_state = data_order.get_state()
        # Every rank draws the same shuffle and takes its own --bs images of each global batch.
        order = torch.randperm(len(images), generator=data_order).to(device)
        while batch_in_epoch < steps_per_epoch and step < total_steps and not agreed_stop_signal():
            start = batch_in_epoch * global_batch + rank * args.bs
            real = to_unit(images[order[start : start + args.bs]])
            n = len(real)
            logged = (step + 1) % args.log_every == 0
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                fake = g_net(torch.randn(n, NZ, 1, 1, device=device))

            train_d = step % args.d_every == 0
            if train_d:
                opt_d.zero_grad(set_to_none=True)
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    logits_real = d_net(d_inputs(real))
                    logits_fake = d_net(d_inputs(fake.detach()))
                    loss_d = F.binary_cross_entropy_with_logits(
                        logits_real, targets(args.real_label_range, args.label_smooth, n)
                    ) + F.binary_cross_entropy_with_logits(
                        logits_fake, targets(args.fake_label_range, 0.0, n)
                    )
                scaler.scale(loss_d).backward()
                if logged:  # DDP averaged the gradients: every rank sees the global batch's norm
                    scaler.unscale_(opt_d)
                    grad_norm_d = gan_common.grad_norm(discriminator.parameters())
                scaler.step(opt_d)
                d_x = torch.sigmoid(logits_real.detach().float()).mean()
                d_g_z = torch.sigmoid(logits_fake.detach().float()).mean()
                dominated = (d_g_z < DOMINANCE_FAKE) & (d_x > real_target_mean - DOMINANCE_REAL_MARGIN)

            # Non-saturating G loss: G wants D to call its images real (target 1).
            # This backward also fills D's gradients, which D's next step zeroes unused: under
            # DDP they are left local rather than all-reduced.
            opt_g.zero_grad(set_to_none=True)
            with d_net.no_sync() if distributed else contextlib.nullcontext():
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    logits_g = d_net(d_inputs(fake))
                    loss_g = F.binary_cross_entropy_with_logits(logits_g, torch.ones(n, device=device))
                scaler.scale(loss_g).backward()
            if logged:
                scaler.unscale_(opt_g)
                grad_norm_g = gan_common.grad_norm(generator.parameters())
            scaler.step(opt_g)
            scaler.update()

            # Sums stay on the device: no host sync except on logged steps.
            if train_d:
                epoch_sums[[0, 2, 3, 4, 5]] += torch.stack(
                    [loss_d.detach().float(), d_x, d_g_z, dominated.float(), torch.ones((), device=device)]
                )
            epoch_sums[1] += loss_g.detach().float()
            step += 1
            batch_in_epoch += 1
            bar.update()

            if logged:
                now = time.perf_counter()
                agar_g, conf_g = gan_common.optimizer_metrics(opt_g)
                # D's columns, like its loss, only on rows where D learned.
                agar_d, conf_d = gan_common.optimizer_metrics(opt_d) if train_d else (None, None)
                loss_g, d_g_z_after_d = mean_over_ranks(
                    loss_g, torch.sigmoid(logits_g.detach().float()).mean()
                )
                row = {"step": step, "epoch": epoch + 1, "loss_g": loss_g, "grad_norm_g": grad_norm_g}
                row.update(agar_g=agar_g, conf_g=conf_g, agar_d=agar_d, conf_d=conf_d)
                row["d_g_z_after_d"] = d_g_z_after_d
                row["steps_per_sec"] = (step - last_log_step) / (now - last_log_time)
                if train_d:
                    loss_d, d_x, d_g_z, dominated = mean_over_ranks(loss_d, d_x, d_g_z, dominated.float())
                    row.update(loss_d=loss_d, d_x=d_x, d_g_z=d_g_z, grad_norm_d=grad_norm_d)
                    # Under torchrun: D won outright on most ranks.
                    dominated_streak = dominated_streak + args.log_every if dominated.item() > 0.5 else 0
                    if is_main and dominated_streak >= DOMINANCE_PATIENCE_STEPS:
                        tqdm.write(
                            f"warning: step {step}: D has won outright for {dominated_streak} steps "
                            f"(D(x) {d_x.item():.2f}, D(G(z)) {d_g_z.item():.3f}, "
                            f"loss_D {loss_d.item():.3f}); G gets almost no signal. {STABILISER_HINT}"
                        )
                        dominated_streak = 0
                    bar.set_postfix_str(
                        f"loss_D {loss_d.item():.3f} loss_G {loss_g.item():.3f} "
                        f"D(x) {d_x.item():.3f} D(G(z)) {d_g_z.item():.3f}/{row['d_g_z_after_d'].item():.3f}",
                        refresh=False,
                    )
                if is_main:
                    log.write(row)
                last_log_time, last_log_step = now, step

            epoch_done = batch_in_epoch == steps_per_epoch
            if args.sample_every is not None and step % args.sample_every == 0 and not epoch_done:
                write_grid(f"step_{step:06d}.png")
                measure_diversity()

        if batch_in_epoch < steps_per_epoch:
            break  # stopped mid-epoch: --max-steps or a signal
        epoch += 1
        batch_in_epoch = 0
        sums = summed_over_ranks(epoch_sums).tolist()  # D steps counted once per rank
        d_steps = max(sums[5], 1.0)
        quality = {
            "epoch": epoch,
            "step": step,
            "loss_d_mean": sums[0] / d_steps,
            "loss_g_mean": sums[1] / (steps_per_epoch * world_size),
            "d_x_mean": sums[2] / d_steps,
            "d_g_z_mean": sums[3] / d_steps,
            "diversity_ratio": measure_diversity(),
            "d_dominated_share": sums[4] / d_steps,
        }
        if is_main:
            quality_log.write(quality)
            summary = " ".join(
                f"{key} {value:.4f}" for key, value in quality.items() if key not in ("epoch", "step")
            )
            tqdm.write(f"epoch {epoch}/{args.epochs} step {step}: {summary}")
        epoch_sums.zero_()
        write_grid(f"epoch_{epoch:03d}.png")
        save(run_dir / "checkpoint.pt")
    bar.close()
    steps_per_sec = (step - first_step) / (time.perf_counter() - start_time)
    if is_main:
        log.close()
        quality_log.close()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)

    if batch_in_epoch > 0:  # mid-epoch stop: the epoch-end save did not cover it
        save(run_dir / "checkpoint.pt")
    # After the checkpoint: this forward pass updates G's BatchNorm running statistics.
    write_grid("final.png")
    if distributed:
        check_replicas([generator, discriminator], run_dir, rank, world_size, control_group)
    stopped_by = agreed_stop_signal()
    if stopped_by:
        if is_main:
            launcher = f"torchrun --nproc_per_node {world_size}" if distributed else "python"
            print(f"stopped at step {step}; continue with: {launcher} {SCRIPT} --resume {run_dir}")
        sys.exit(128 + stopped_by)
    if is_main:
        print(
            f"done: {step} steps ({steps_per_sec:.2f} steps/s this session). Outputs in {run_dir}/: "
            "config.json, log.csv, quality.csv, checkpoint.pt, samples/ (final grid: samples/final.png)"
        )


def main(argv: list[str] | None = None) -> None:
    try:
        train(resolve_args(argv))
    except (DataError, BadRun) as error:
        sys.exit(f"error: {error}")
    except KeyboardInterrupt:
        sys.exit("interrupted; nothing saved since the last checkpoint")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
