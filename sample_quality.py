"""Sample quality measures GAN papers report, in one feature space per dataset.

- KID (Bińkowski et al. 2018; its mean and std over subsets of large sets) and FID (by
  torchmetrics);
- precision and recall (Kynkäänniemi et al. 2019) and density and coverage (Naeem et al.
  2020), all four from k-nearest-neighbour balls around the real features;
- for the built-in shapes data, the modes a generator covers and the KL divergence of its
  class histogram from the real one (stacked-MNIST style).

Feature spaces: real image datasets use torch-fidelity's Inception-v3 (2048 features, the
standard FID network); the shapes data uses the penultimate layer of a small CNN trained
on the shapes' known factors (kind x dominant colour x quadrant = 36 classes), as a LeNet
is used for MNIST GANs. Shapes numbers are not comparable with Inception FIDs.

    space = shapes_feature_space()   # the classifier shipped in weights/
    reference = reference_features(real_uint8, space, cache_path)
    evaluate(generated_uint8, reference, space)   # {"kid": ..., "fid": ..., ...}

The same k-NN measures work on 2-D points: knn_manifold_metrics(real_points, fake_points);
point_quality() adds the toy's own (MMD, sliced Wasserstein, the share on the semicircles).
diversity_ratio() compares the spread of generated images with that of real ones in pixels.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import pickle
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from gan_common import save_checkpoint
from gan_data import IMAGE_SIZE, RADIUS, shapes_with_factors

# torchmetrics and torch-fidelity are imported where they are used: importing them takes
# seconds, which a training script's --help or a run without evaluation need not wait for.

KNN_K = 3
EMBED_BATCH = 128
# A generated sample counts towards a mode only when the classifier is this sure of it, and
# a mode counts as covered with this share of the samples a uniform generator would give
# it, at least 1 (5 of 1,000 samples over 36 classes: a stray lucky sample does not count).
MODE_CONFIDENCE = 0.9
MODE_MIN_SHARE = 0.2
# torch-fidelity's defaults; the subset shrinks to the smaller set when that is smaller.
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
MIN_SAMPLES = 10
SCORE_SUFFIXES = {".png", ".jpg", ".jpeg"}
SUPPORT_TOLERANCE = 3.0  # a point is on the support within 3 radial standard deviations
# From the arcs' radius (10) down to their spread (1), each half the one before (mmd_rbf
# relies on it).
MMD_BANDWIDTHS = (8.0, 4.0, 2.0, 1.0, 0.5)
SWD_DIRECTIONS = 64  # evenly spaced over half a turn: in 2-D this covers every direction

KINDS = ("circle", "square", "triangle")
CHANNELS = ("red", "green", "blue")
QUADRANTS = ("top-left", "top-right", "bottom-left", "bottom-right")
SHAPES_CLASSES = len(KINDS) * len(CHANNELS) * len(QUADRANTS)
SHAPES_CLASSIFIER_VERSION = 1
# Fresh images every epoch; 3 x 24k reach ~97% held-out accuracy in about a minute on one
# core. The errors left are shapes within a pixel of a quadrant's edge or with two colour
# channels within a few levels of each other.
SHAPES_TRAIN_IMAGES = 24_000
SHAPES_TEST_IMAGES = 3_000
SHAPES_EPOCHS = 3
SHAPES_LR = 3e-3
# The classifier's data seeds, far from the small seeds runs draw their shapes with.
SHAPES_SEED_BASE = 1_000_000
SHAPES_MIN_ACCURACY = 0.95
# Shipped with the code, so that every machine scores in one feature space: training the
# classifier again (on another CPU kind, or with another torch) gives other weights, and
# KIDs measured with them cannot be compared with the published ones.
SHAPES_CLASSIFIER_FILE = (
    Path(__file__).resolve().parent / "weights" / f"shapes-classifier-v{SHAPES_CLASSIFIER_VERSION}.pt"
)

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"


class SampleQualityError(Exception):
    """Input the user can fix (missing weights, unreadable images); callers print it alone."""


# ---------------------------------------------------------------------------------------
# The shapes feature space


def shapes_labels(factors: dict[str, torch.Tensor]) -> torch.Tensor:
    """Class of each shape: kind x dominant colour channel x quadrant of its centre."""
    dominant = factors["colour"].argmax(dim=1)
    right = (factors["centre"][:, 0] >= IMAGE_SIZE / 2).long()
    bottom = (factors["centre"][:, 1] >= IMAGE_SIZE / 2).long()
    quadrant = 2 * bottom + right
    return (factors["kind"] * len(CHANNELS) + dominant) * len(QUADRANTS) + quadrant


def shapes_class_name(label: int) -> str:
    rest, quadrant = divmod(label, len(QUADRANTS))
    kind, channel = divmod(rest, len(CHANNELS))
    return f"{CHANNELS[channel]} {KINDS[kind]} {QUADRANTS[quadrant]}"


def labelled_shapes(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    images, factors = shapes_with_factors(count, seed)
    return images, shapes_labels(factors)


class ShapesClassifier(nn.Module):
    """A small CNN on 64x64 uint8 images; forward gives (penultimate features, logits).
    Two kinds of extra input channels make the classes' boundaries cheap to learn: each
    channel minus the pixel's mean over channels (which channel dominates a colour), and
    pixel coordinates (which quadrant a shape's centre is in)."""

    def __init__(self, classes: int = SHAPES_CLASSES, features: int = 128) -> None:
        super().__init__()
        widths = [8, 16, 32, 64, 64]
        layers = []
        for cin, cout in zip(widths, widths[1:]):
            layers += [nn.Conv2d(cin, cout, 4, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
        self.body = nn.Sequential(*layers, nn.Flatten(), nn.Linear(64 * 4 * 4, features), nn.ReLU())
        self.head = nn.Linear(features, classes)
        ramp = torch.linspace(-1, 1, IMAGE_SIZE)
        ys, xs = torch.meshgrid(ramp, ramp, indexing="ij")
        self.register_buffer("coords", torch.stack([xs, ys]).unsqueeze(0), persistent=False)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = images.float() / 127.5 - 1
        chroma = 4 * (x - x.mean(dim=1, keepdim=True))
        x = torch.cat([x, chroma, self.coords.expand(len(x), -1, -1, -1)], dim=1)
        features = self.body(x)
        return features, self.head(features)


def train_shapes_classifier(seed: int) -> tuple[ShapesClassifier, float]:
    """Trains on freshly drawn shapes each epoch (seeds apart from any run's data) and returns
    the model with its accuracy on held-out shapes."""
    steps_per_epoch = math.ceil(SHAPES_TRAIN_IMAGES / EMBED_BATCH)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ShapesClassifier()
        optimizer = torch.optim.AdamW(model.parameters(), lr=SHAPES_LR, weight_decay=1e-4)
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=SHAPES_LR, total_steps=SHAPES_EPOCHS * steps_per_epoch
        )
        model.train()
        progress = tqdm(
            total=SHAPES_EPOCHS * steps_per_epoch, desc="shapes classifier", unit="step", leave=False
        )
        for epoch in range(SHAPES_EPOCHS):
            images, labels = labelled_shapes(SHAPES_TRAIN_IMAGES, seed=SHAPES_SEED_BASE + 100 * seed + epoch)
            for batch in torch.randperm(len(images)).split(EMBED_BATCH):
                loss = F.cross_entropy(model(images[batch])[1], labels[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                progress.update()
                progress.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        progress.close()
    model.eval()
    test_images, test_labels = labelled_shapes(SHAPES_TEST_IMAGES, seed=SHAPES_SEED_BASE + 100 * seed + 99)
    predicted = embed(model, test_images)[1].argmax(dim=1)
    return model, (predicted == test_labels).float().mean().item()


@torch.no_grad()
def embed(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(features, logits or None) of uint8 images, in batches on the model's device."""
    device = next(model.parameters()).device
    batches = images.split(EMBED_BATCH)
    features, logits = [], []
    for batch in tqdm(batches, desc="features", unit="batch", leave=False, disable=len(batches) < 8):
        out = model(batch.to(device))
        features.append((out[0] if isinstance(out, tuple) else out).float().cpu())
        logits.append(out[1].float().cpu() if isinstance(out, tuple) else None)
    return torch.cat(features), (torch.cat(logits) if logits[0] is not None else None)


@dataclass
class FeatureSpace:
    """A network from uint8 images (N, 3, 64, 64) to features; a classifier (forward giving
    (features, logits)) also gives modes. `name` goes into config.json and cache keys."""

    name: str
    model: nn.Module
    modes_total: int | None = None
    classifier_accuracy: float | None = None

    def to(self, device: str | torch.device) -> FeatureSpace:
        self.model.to(device)
        return self


def shapes_feature_space(path: str | Path = SHAPES_CLASSIFIER_FILE) -> FeatureSpace:
    """The shapes classifier's feature space, its weights read from `path` (by default the
    file shipped in weights/). Its name carries the file's fingerprint, so that features and
    scores from another classifier are never taken for this one's."""
    path = Path(path)
    retrain = f"python sample_quality.py --out {path} trains a new one (a new feature space)"
    if not path.is_file():
        raise SampleQualityError(f"{path}: no such file; it comes with the code (git checkout), or {retrain}")
    model = ShapesClassifier()
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(saved["state_dict"])
    except (RuntimeError, KeyError, EOFError, OSError, pickle.UnpicklingError) as error:
        raise SampleQualityError(
            f"{path} is not a readable shapes classifier ({first_line(error)}); restore it "
            f"from git, or {retrain}"
        ) from None
    accuracy = saved["accuracy"]
    if accuracy < SHAPES_MIN_ACCURACY:
        warnings.warn(
            f"the shapes classifier in {path} has held-out accuracy {accuracy:.2%} only", stacklevel=2
        )
    model.eval()
    name = f"shapes-cnn-v{SHAPES_CLASSIFIER_VERSION}-{hashlib.sha1(path.read_bytes()).hexdigest()[:10]}"
    return FeatureSpace(name, model, modes_total=SHAPES_CLASSES, classifier_accuracy=accuracy)


def save_shapes_classifier(path: str | Path, seed: int = 0) -> None:
    """Trains the shapes classifier (about a minute) and saves it to `path`."""
    start = time.perf_counter()
    model, accuracy = train_shapes_classifier(seed)
    seconds = time.perf_counter() - start
    save_checkpoint(path, {"state_dict": model.state_dict(), "accuracy": accuracy, "train_seconds": seconds})
    print(f"shapes classifier: held-out accuracy {accuracy:.2%}, {seconds:.0f} s to train, saved to {path}")


def inception_feature_space(weights_path: str | Path | None = None) -> FeatureSpace:
    """torch-fidelity's Inception-v3 (2048 pool features), the standard FID network. Without
    weights_path its weights are downloaded once (into torch's hub cache)."""
    from torchmetrics.image.fid import NoTrainInceptionV3

    if weights_path is not None and not Path(weights_path).is_file():
        raise SampleQualityError(f"Inception weights {weights_path}: no such file (--inception-weights)")
    try:
        # TF1-compatible resizing, as in torch-fidelity and the original FID code, so that
        # the numbers compare with published ones.
        model = NoTrainInceptionV3(
            name="inception-v3-compat",
            features_list=["2048"],
            feature_extractor_weights_path=None if weights_path is None else str(weights_path),
            antialias=False,
        )
    except (OSError, RuntimeError, KeyError, pickle.UnpicklingError) as error:
        raise SampleQualityError(inception_weights_problem(weights_path, error)) from None
    return FeatureSpace("inception-v3-2048", model)


def inception_weights_problem(weights_path: str | Path | None, error: Exception) -> str:
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    if weights_path is not None:
        reason = first_line(error)
        return f"{weights_path} is not a readable copy of torch-fidelity's {INCEPTION_FILE} ({reason})"
    if isinstance(error, OSError):
        return (
            f"the Inception weights for FID/KID could not be downloaded from {URL_INCEPTION_V3} "
            f"({first_line(error)}); download that file elsewhere and pass --inception-weights PATH, "
            "or pass --no-fid to go without"
        )
    return (
        f"the Inception weights downloaded into {torch.hub.get_dir()}/checkpoints do not load "
        f"({first_line(error)}); delete them to download afresh, or pass --inception-weights PATH"
    )


def first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def feature_space_for(dataset: str, inception_weights: str | Path | None = None) -> FeatureSpace:
    """The shapes classifier (shipped in weights/) for the shapes data, Inception for real
    image datasets."""
    if dataset == "shapes":
        return shapes_feature_space()
    return inception_feature_space(inception_weights)


# ---------------------------------------------------------------------------------------
# The real set and the measures


@dataclass
class Reference:
    """What evaluation compares against: the real set's features and, in a feature space
    with classes, its class histogram (counts of predicted classes)."""

    features: torch.Tensor
    class_counts: torch.Tensor | None
    feature_space: str


def reference_features(
    images: torch.Tensor, space: FeatureSpace, cache_path: str | Path | None = None
) -> Reference:
    """The real images' Reference, loaded from cache_path when it was made in the same
    feature space from as many images (the caller's path names the dataset and subset);
    otherwise computed and saved there."""
    cached = read_reference_cache(cache_path, space, len(images))
    if cached is not None:
        return cached
    check_images(images, "real images")
    features, logits = embed(space.model, images)
    counts = None if logits is None else torch.bincount(logits.argmax(dim=1), minlength=space.modes_total)
    reference = Reference(features, counts, space.name)
    if cache_path is not None:
        save_checkpoint(
            Path(cache_path), {"features": features, "class_counts": counts, "feature_space": space.name}
        )
    return reference


def reference_cache_path(
    data_root: str | Path, dataset: str, subset: int, seed: int, count: int, space: FeatureSpace
) -> Path:
    """Where the features of `count` images of a dataset's subset are cached: next to its
    decoded images in DATA_ROOT/cache."""
    return Path(data_root) / "cache" / f"features-{dataset}-{subset}-s{seed}-n{count}-{space.name}.pt"


def read_reference_cache(cache_path: str | Path | None, space: FeatureSpace, count: int) -> Reference | None:
    """The cached Reference, or None when there is none that fits (a damaged one is remade)."""
    if cache_path is None or not Path(cache_path).exists():
        return None
    try:
        saved = torch.load(cache_path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError):
        return None
    if saved.get("feature_space") != space.name or len(saved["features"]) != count:
        return None
    return Reference(saved["features"], saved["class_counts"], space.name)


def check_images(images: torch.Tensor, what: str) -> None:
    expected = (3, IMAGE_SIZE, IMAGE_SIZE)
    if images.dtype != torch.uint8 or images.dim() != 4 or tuple(images.shape[1:]) != expected:
        raise SampleQualityError(
            f"{what} must be uint8 of shape (N, 3, {IMAGE_SIZE}, {IMAGE_SIZE}), got {images.dtype} "
            f"{tuple(images.shape)}; convert generator output with from_tanh()"
        )
    if len(images) < MIN_SAMPLES:
        raise SampleQualityError(
            f"{what}: {len(images)} images are too few to score; use at least {MIN_SAMPLES}"
        )


def from_tanh(images: torch.Tensor) -> torch.Tensor:
    """Generator output in [-1, 1] to uint8 [0, 255], as saved images would hold it. NaN and
    infinity are refused: the cast would make them black, scored as an ordinary collapse."""
    if not images.isfinite().all():
        raise SampleQualityError(
            "generator output holds NaN or infinite values; evaluate() scores such output as NaN"
        )
    return ((images.detach().float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


# evaluate's measures; those of modes (with modes_total) only in a feature space with classes.
MEASURES = ("kid", "kid_std", "fid", "precision", "recall", "density", "coverage")
MODE_MEASURES = ("modes_covered", "mode_kl")


def evaluate(generated: torch.Tensor, reference: Reference, space: FeatureSpace, seed: int = 0) -> dict:
    """kid, kid_std, fid, precision, recall, density, coverage of generated images against
    the reference, plus modes_covered, modes_total and mode_kl in a feature space with
    classes. `generated` is uint8 images or generator output (floating point, in [-1, 1]);
    output holding NaN or infinity (a diverged generator) scores NaN in every measure, with
    a warning. `seed` fixes KID's subsets without touching the caller's random state."""
    if reference.feature_space != space.name:
        raise SampleQualityError(f"the reference was made in {reference.feature_space}, not in {space.name}")
    if generated.is_floating_point():
        broken = int((~generated.isfinite()).flatten(1).any(dim=1).sum())
        if broken:
            warnings.warn(
                f"{broken} of {len(generated)} generated images hold NaN or infinite values (a diverged "
                "generator?); every sample measure is NaN",
                stacklevel=2,
            )
            return unscored(reference)
        check_generator_range(generated)
        generated = from_tanh(generated)
    check_images(generated, "generated images")
    features, logits = embed(space.model, generated)
    metrics = frechet_and_kernel_distances(reference.features, features, seed)
    metrics.update(knn_manifold_metrics(reference.features, features))
    if logits is not None and reference.class_counts is not None:
        metrics.update(mode_metrics(logits, reference.class_counts))
    return metrics


def check_generator_range(output: torch.Tensor) -> None:
    # A little slack for output computed in half precision.
    if output.numel() and output.abs().max() > 1.01:
        raise SampleQualityError(
            f"floating-point images must be generator output in [-1, 1], got values up to "
            f"{output.abs().max():.4g}; pass images in [0, 255] as uint8"
        )


def unscored(reference: Reference) -> dict:
    """evaluate's dict for images it cannot score: every measure NaN."""
    scores = dict.fromkeys(MEASURES, math.nan)
    if reference.class_counts is not None:
        scores.update(dict.fromkeys(MODE_MEASURES, math.nan), modes_total=len(reference.class_counts))
    return scores


class PrecomputedFeatures(nn.Module):
    """Lets torchmetrics' FID take features instead of images, so both feature spaces and the
    cached real features go through one code path."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def frechet_and_kernel_distances(real: torch.Tensor, fake: torch.Tensor, seed: int = 0) -> dict:
    """FID, and KID with its std over subsets (NaN when both sets fit in one subset)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    # sync_on_compute=False: under torchrun only rank 0 evaluates, and torchmetrics would
    # otherwise wait in an all-gather for the other ranks.
    fid = FrechetInceptionDistance(feature=PrecomputedFeatures(real.shape[1]), sync_on_compute=False)
    fid.update(real, real=True)
    fid.update(fake, real=False)
    kid, kid_std = kernel_inception_distance(real, fake, seed)
    return {"kid": kid, "kid_std": kid_std, "fid": fid.compute().item()}


def kernel_inception_distance(real: torch.Tensor, fake: torch.Tensor, seed: int = 0) -> tuple[float, float]:
    """KID's mean and std over KID_SUBSETS random pairs of subsets (torch-fidelity's estimate),
    drawn with `seed`; when both sets fit in one subset, the estimate on all samples and std
    NaN. Every subset would then hold every sample: the subsets' estimates would be that one
    estimate, reordered, their std float noise; one estimate gives the same KID at a
    hundredth of the cost."""
    if max(len(real), len(fake)) <= KID_SUBSET_SIZE:
        return kernel_distance(real, fake), math.nan
    size = min(KID_SUBSET_SIZE, len(real), len(fake))
    draw = torch.Generator().manual_seed(seed)
    estimates = torch.tensor(
        [
            kernel_distance(
                real[torch.randperm(len(real), generator=draw)[:size]],
                fake[torch.randperm(len(fake), generator=draw)[:size]],
            )
            for _ in range(KID_SUBSETS)
        ]
    )
    return estimates.mean().item(), estimates.std(unbiased=False).item()


def kernel_distance(real: torch.Tensor, fake: torch.Tensor) -> float:
    """Unbiased estimate of MMD² under KID's kernel (x·y / dimension + 1)³, in float64 (float32
    sums of the kernel's large values lose KID's digits); the sets may differ in size."""
    real, fake = real.double(), fake.double()
    dimension = real.shape[1]

    def mean_over_distinct_pairs(points: torch.Tensor) -> torch.Tensor:
        kernel = (points @ points.T / dimension + 1) ** 3
        return (kernel.sum() - kernel.diagonal().sum()) / (len(points) * (len(points) - 1))

    across = ((real @ fake.T / dimension + 1) ** 3).mean()
    return (mean_over_distinct_pairs(real) + mean_over_distinct_pairs(fake) - 2 * across).item()


def row_chunks(rows: torch.Tensor, columns: torch.Tensor):
    """(row slice, distances of those rows to every column), a few million at a time."""
    step = max(1, (1 << 22) // max(1, len(columns)))
    for start in range(0, len(rows), step):
        yield slice(start, start + step), torch.cdist(rows[start : start + step], columns)


def kth_neighbour_distance(points: torch.Tensor, k: int) -> torch.Tensor:
    """Each point's distance to its k-th nearest other point: the radius of its k-NN ball."""
    radii = torch.empty(len(points))
    for rows, distances in row_chunks(points, points):
        radii[rows] = distances.topk(k + 1, dim=1, largest=False).values[:, k]
    return radii


def knn_manifold_metrics(real: torch.Tensor, fake: torch.Tensor, k: int = KNN_K) -> dict:
    """Precision and recall (Kynkäänniemi et al. 2019), density and coverage (Naeem et al.
    2020) from k-NN balls, for features or for points of any dimension (the toy's 2-D).
    Precision: share of fakes inside some real ball; recall: share of reals inside some
    fake ball; density: real balls holding a fake, per fake, over k; coverage: share of
    real balls holding a fake."""
    real, fake = real.float(), fake.float()
    if min(len(real), len(fake)) <= k:
        raise SampleQualityError(f"k-NN measures with k={k} need more than {k} real and generated samples")
    # Measured from the real set's mean: far from the origin, cdist's matrix-product shortcut
    # loses the distances' digits; a shift changes no distance.
    centre = real.mean(dim=0)
    real, fake = real - centre, fake - centre
    real_radii, fake_radii = kth_neighbour_distance(real, k), kth_neighbour_distance(fake, k)
    balls_holding_fake = torch.zeros(len(fake))
    recalled = torch.zeros(len(real), dtype=torch.bool)
    covered = torch.zeros(len(real), dtype=torch.bool)
    for rows, distances in row_chunks(real, fake):
        inside_real_balls = distances < real_radii[rows, None]
        balls_holding_fake += inside_real_balls.sum(dim=0)
        covered[rows] = inside_real_balls.any(dim=1)
        recalled[rows] = (distances < fake_radii[None, :]).any(dim=1)
    return {
        "precision": (balls_holding_fake > 0).float().mean().item(),
        "recall": recalled.float().mean().item(),
        "density": (balls_holding_fake.sum() / (k * len(fake))).item(),
        "coverage": covered.float().mean().item(),
    }


def mode_metrics(logits: torch.Tensor, real_counts: torch.Tensor) -> dict:
    """modes_covered: classes with at least mode_min_samples() confidently classified samples;
    mode_kl: KL(generated class histogram || real one), in nats (0 when they match, log 36
    when all samples fall in one of 36 equally common classes)."""
    probabilities = logits.softmax(dim=1)
    confidence, predicted = probabilities.max(dim=1)
    confident_counts = torch.bincount(predicted[confidence >= MODE_CONFIDENCE], minlength=len(real_counts))
    generated = torch.bincount(predicted, minlength=len(real_counts)).double()
    generated /= generated.sum()
    # A class no real sample fell into still gets a little mass, keeping the KL finite.
    real = real_counts.double().clamp_min(1e-3)
    real /= real.sum()
    held = generated > 0
    kl = (generated[held] * (generated[held] / real[held]).log()).sum()
    return {
        "modes_covered": int((confident_counts >= mode_min_samples(len(logits), len(real_counts))).sum()),
        "modes_total": len(real_counts),
        "mode_kl": kl.item(),
    }


def mode_min_samples(samples: int, classes: int) -> int:
    """The confident samples a covered class needs: MODE_MIN_SHARE of a uniform generator's
    count per class, at least 1. Scaled with the count so that a perfect generator covers
    every class at few samples too (a fixed 5 missed many of 36 at 200 samples)."""
    return max(1, int(MODE_MIN_SHARE * samples / classes))


# ---------------------------------------------------------------------------------------
# Diversity in pixel space


def mean_pairwise_distance(images: torch.Tensor) -> torch.Tensor:
    # cdist, not pdist: pdist's sum differs in the 6th digit, which would change the logged
    # ratios of runs made before.
    flat = images.flatten(1).float()
    return torch.cdist(flat, flat).sum() / (len(flat) * (len(flat) - 1))


def diversity_ratio(generated: torch.Tensor, real: torch.Tensor) -> float:
    """Mean pairwise L2 distance among generated images over the same among real ones:
    about 1 when G is as varied as the data, far below 1 under mode collapse."""
    return (mean_pairwise_distance(generated) / mean_pairwise_distance(real)).item()


# ---------------------------------------------------------------------------------------
# The toy's points


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


def point_quality(generated: torch.Tensor, real: torch.Tensor) -> dict:
    """How well `generated` matches `real` (two equally sized sets of points): MMD², sliced
    W1, the share of generated points on the arc of their side, each side's share, and the
    k-NN precision, recall, density and coverage."""
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
        **knn_manifold_metrics(real, generated),
    }


# ---------------------------------------------------------------------------------------
# Scoring a folder of images


def read_image_folder(folder: str | Path) -> torch.Tensor:
    """The PNG/JPEG files directly in folder as uint8 (N, 3, 64, 64), in name order. Other
    sizes are refused rather than resized: a resampling filter would change the scores."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SampleQualityError(f"{folder} is not a folder of images to score")
    paths = sorted(path for path in folder.iterdir() if path.suffix.lower() in SCORE_SUFFIXES)
    if not paths:
        raise SampleQualityError(f"{folder} holds no PNG or JPEG images to score")
    return torch.stack(
        [read_score_image(path) for path in tqdm(paths, desc="reading", unit="img", leave=False)]
    )


def read_score_image(path: Path) -> torch.Tensor:
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    except (OSError, UnidentifiedImageError) as error:
        raise SampleQualityError(f"cannot read image {path} ({error})") from None
    if image.size != (IMAGE_SIZE, IMAGE_SIZE):
        raise SampleQualityError(
            f"{path} is {image.width}x{image.height}, the dataset's images are {IMAGE_SIZE}x{IMAGE_SIZE}; "
            "resize the images first (scoring refuses to resize, which would change the scores)"
        )
    return pixels.view(IMAGE_SIZE, IMAGE_SIZE, 3).permute(2, 0, 1)


def score_images(folder: str | Path, reference: Reference, space: FeatureSpace, seed: int = 0) -> dict:
    """evaluate() on the images of a folder (--score-images DIR); the caller prints the
    dict as one JSON line. A warning on stderr when the folder holds another number of
    images than the real set has: FID and KID depend on the counts."""
    images = read_image_folder(folder)
    real = len(reference.features)
    if len(images) != real:
        print(
            f"warning: {folder} holds {len(images)} images, scored against {real} real ones; FID depends "
            f"on the counts, so scores compare at equal counts only: pass --eval-samples {len(images)}",
            file=sys.stderr,
        )
    return evaluate(images, reference, space, seed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Trains the shapes classifier whose features the shapes data's KID, FID and classes "
        f"are measured in. The code ships one (weights/{SHAPES_CLASSIFIER_FILE.name}); a new one is a new "
        "feature space, whose scores are not comparable with the published ones."
    )
    parser.add_argument("--out", type=Path, required=True, help="where to save it")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    save_shapes_classifier(args.out, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
