"""The images the DCGAN trains on, and the toy's points: every image dataset becomes one uint8
tensor (N, 3, 64, 64), decoded once and cached in DATA_ROOT/cache; the built-in shapes are
generated from a seed, together with the factors that drew them (the shapes classifier of
sample_quality learns its classes from those).

    images = load_images("tinyimagenet", Path("data"), subset=20000, seed=0)
"""

from __future__ import annotations

import math
import os
import socket
import urllib.error
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from tqdm import tqdm

import gan_common

DATASETS = ("tinyimagenet", "folder", "cifar10", "mnist", "fashion-mnist", "shapes")
TINYIMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINYIMAGENET_BYTES = 248_100_043
TINYIMAGENET_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
IMAGE_SIZE = 64
RADIUS = 10.0  # of both arcs; their centres are (0, RADIUS) and (0, -RADIUS)


class DataError(Exception):
    """A problem with the data the user can fix; the scripts print it without a traceback."""


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


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] to the float [-1, 1] that Tanh produces."""
    return images.float() / 127.5 - 1.0


# ---------------------------------------------------------------------------------------
# The toy's points: two offset semicircles in the plane


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
