"""train_dcgan.py end to end (as a subprocess, on tiny data) and its pieces."""

import csv
import functools
import hashlib
import http.server
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the training scripts live at the repository root

import dcgan_eval  # noqa: E402
import gan_data  # noqa: E402
import run_log  # noqa: E402
import sample_quality  # noqa: E402
import train_dcgan  # noqa: E402

WNIDS = ["n01443537", "n01629819", "n01641577", "n01644900", "n01698640"]
IMAGES_PER_CLASS = 16
# Nothing listens on port 9 (discard): the download fails at once, with no internet touched.
OFFLINE = {"CASMO_TINYIMAGENET_URL": "http://127.0.0.1:9/tiny-imagenet-200.zip"}


def run(*args, env=None, timeout=300, measures=False):
    """The script in a subprocess; a new run without `measures` gets --no-fid (no feature
    space), a resumed one keeps its own."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **OFFLINE, **(env or {})}
    args = args if measures or "--resume" in args else (*args, "--no-fid")
    return subprocess.run(
        [sys.executable, str(ROOT / "train_dcgan.py"), *map(str, args)],
        capture_output=True,
        text=True,
        env=environment,
        cwd=ROOT,
        timeout=timeout,
    )


def check_ok(result):
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    return result


def check_fails(result, *phrases):
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    for phrase in phrases:
        assert phrase in result.stderr, result.stderr
    return result


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def untimed(path):
    """A CSV's rows without the columns that time the run."""
    return [
        {k: v for k, v in row.items() if k not in ("steps_per_sec", "eval_seconds")} for row in read_csv(path)
    ]


def make_fake_tinyimagenet(data_root: Path) -> Path:
    """The official layout, in miniature; every third image is grayscale ('L')."""
    folder = data_root / "tiny-imagenet-200"
    generator = torch.Generator().manual_seed(0)
    for wnid in WNIDS:
        images = folder / "train" / wnid / "images"
        images.mkdir(parents=True)
        boxes = []
        for k in range(IMAGES_PER_CLASS):
            pixels = torch.randint(0, 256, (64, 64, 3), generator=generator, dtype=torch.uint8).numpy()
            image = Image.fromarray(pixels)
            if k % 3 == 0:
                image = image.convert("L")
            image.save(images / f"{wnid}_{k}.JPEG", format="JPEG")
            boxes.append(f"{wnid}_{k}.JPEG\t0\t0\t63\t63")
        (folder / "train" / wnid / f"{wnid}_boxes.txt").write_text("\n".join(boxes) + "\n")
    (folder / "val" / "images").mkdir(parents=True)
    Image.new("RGB", (64, 64)).save(folder / "val" / "images" / "val_0.JPEG", format="JPEG")
    (folder / "val" / "val_annotations.txt").write_text(f"val_0.JPEG\t{WNIDS[0]}\t0\t0\t63\t63\n")
    (folder / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    (folder / "words.txt").write_text("".join(f"{wnid}\tthing {i}\n" for i, wnid in enumerate(WNIDS)))
    return folder


@pytest.fixture
def fake_data(tmp_path) -> Path:
    data_root = tmp_path / "data"
    make_fake_tinyimagenet(data_root)
    return data_root


def test_tinyimagenet_run_writes_everything(fake_data, tmp_path):
    out = tmp_path / "run"
    check_ok(run("--data-root", fake_data, "--g-opt", "casmo", "--d-opt", "adam", "--bs", 16, "--epochs", 1,
                 "--subset", 64, "--log-every", 1, "--out", out))  # fmt: skip
    config = json.loads((out / "config.json").read_text())
    assert config["script"] == "train_dcgan.py" and config["args"]["g_opt"] == "casmo"
    rows = read_csv(out / "log.csv")
    assert [int(row["step"]) for row in rows] == [1, 2, 3, 4]
    assert all(row["agar_g"] and row["conf_g"] and not row["agar_d"] and not row["conf_d"] for row in rows)
    assert all(0 < float(row["d_x"]) < 1 and float(row["steps_per_sec"]) > 0 for row in rows)
    (quality,) = read_csv(out / "quality.csv")
    assert quality["epoch"] == "1" and quality["step"] == "4" and float(quality["diversity_ratio"]) > 0
    assert (out / "samples" / "epoch_001.png").is_file() and (out / "samples" / "final.png").is_file()
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=False)
    assert (checkpoint["step"], checkpoint["epoch"], checkpoint["batch_in_epoch"]) == (4, 1, 0)

    cache = torch.load(fake_data / "cache" / "tinyimagenet-64-s0.pt", weights_only=True)
    assert cache["images"].shape == (64, 3, 64, 64) and cache["images"].dtype == torch.uint8
    classes = [source.split("/")[1] for source in cache["sources"]]
    assert sorted(set(classes)) == WNIDS  # spread over all classes, not the first ones
    assert max(map(classes.count, WNIDS)) - min(map(classes.count, WNIDS)) <= 1

    # --data-root may also name the tiny-imagenet-200 folder itself.
    inner = fake_data / "tiny-imagenet-200"
    check_ok(run("--data-root", inner, "--subset", 32, "--max-steps", 1, "--out", tmp_path / "inner"))
    assert (inner / "cache" / "tinyimagenet-32-s0.pt").is_file()


def test_resume_continues_exactly(fake_data, tmp_path):
    common = [
        "--data-root",
        fake_data,
        "--g-opt",
        "casmo",
        "--d-opt",
        "adam",
        "--subset",
        32,
        "--log-every",
        1,
        "--d-every",
        3,  # D learns on steps 1 and 4: step 3, the first after resuming, carries step 1's figures
    ]
    check_ok(run(*common, "--epochs", 1, "--out", tmp_path / "split"))
    # Later runs read the cached tensor only: the JPEGs can go.
    shutil.rmtree(fake_data / "tiny-imagenet-200")
    # The original command with --resume: repeating the run's own values is fine.
    check_ok(run(*common, "--epochs", 2, "--resume", tmp_path / "split"))
    check_ok(run(*common, "--epochs", 2, "--out", tmp_path / "whole"))

    assert [int(row["step"]) for row in read_csv(tmp_path / "split" / "log.csv")] == [1, 2, 3, 4]
    assert [row["epoch"] for row in read_csv(tmp_path / "split" / "quality.csv")] == ["1", "2"]
    split = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=False)
    whole = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=False)
    assert split["step"] == whole["step"] == 4
    for key in ("generator", "discriminator"):
        for name, tensor in whole[key].items():
            assert torch.equal(split[key][name], tensor), f"{key}.{name}"
    for key in ("opt_g", "opt_d"):
        for index, state in whole[key]["state"].items():
            for name, value in state.items():
                assert torch.equal(torch.as_tensor(split[key]["state"][index][name]), torch.as_tensor(value))
    assert untimed(tmp_path / "split" / "quality.csv") == untimed(tmp_path / "whole" / "quality.csv")
    # D's columns on steps where it did not learn too: its last update's figures carry over.
    split, whole = untimed(tmp_path / "split" / "log.csv"), untimed(tmp_path / "whole" / "log.csv")
    assert split == whole and split[2]["grad_norm_d"] == split[0]["grad_norm_d"] != ""


def test_ctrl_c_saves_and_resume_matches(tmp_path):
    common = ["--dataset", "shapes", "--subset", 32, "--epochs", 2, "--log-every", 1, "--no-fid"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    split = tmp_path / "split"
    command = [sys.executable, str(ROOT / "train_dcgan.py"), *map(str, common), "--out", str(split)]
    process = subprocess.Popen(
        command, env=environment, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    deadline = time.time() + 120
    while not (split / "log.csv").is_file() or not read_csv(split / "log.csv"):  # wait for step 1
        assert process.poll() is None and time.time() < deadline, process.communicate()
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGINT and b"Traceback" not in stderr
    stopped = torch.load(split / "checkpoint.pt", weights_only=False)
    assert 1 <= stopped["step"] < 4

    check_ok(run("--resume", split))
    check_ok(run(*common, "--out", tmp_path / "whole"))
    assert [int(row["step"]) for row in read_csv(split / "log.csv")] == [1, 2, 3, 4]
    split_state = torch.load(split / "checkpoint.pt", weights_only=False)["generator"]
    whole_state = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=False)["generator"]
    for name, tensor in whole_state.items():
        assert torch.equal(split_state[name], tensor), name


def test_missing_data_offline_fails_with_a_short_message(tmp_path):
    result = check_fails(
        run("--data-root", tmp_path / "empty", "--out", tmp_path / "run"), "--dataset shapes"
    )
    assert "tiny-imagenet-200" in result.stderr and len(result.stderr) < 1500
    assert not (tmp_path / "empty" / "tiny-imagenet-200.zip.part").exists()


def test_damaged_dataset_folders(fake_data, tmp_path):
    folder = fake_data / "tiny-imagenet-200"
    (folder / "train" / WNIDS[0] / "images" / f"{WNIDS[0]}_1.JPEG").write_bytes(b"not a jpeg")
    check_fails(run("--data-root", fake_data, "--subset", 80, "--out", tmp_path / "a"), "cannot read image")
    shutil.rmtree(folder / "train" / WNIDS[2])
    check_fails(
        run("--data-root", fake_data, "--out", tmp_path / "b"), "not a complete Tiny ImageNet", WNIDS[2]
    )


def write_fake_run(folder: Path, checkpoint_bytes: bytes | None = None, payload: dict | None = None) -> Path:
    data_root = folder.parent / "data"  # shared by the fake runs of a test; nothing should write it
    args = train_dcgan.build_parser().parse_args(
        ["--dataset", "shapes", "--subset", "32", "--out", str(folder), "--data-root", str(data_root)]
    )
    folder.mkdir()
    config = {"script": "train_dcgan.py", "args": vars(args)}
    (folder / "config.json").write_text(json.dumps(config, default=str))
    if checkpoint_bytes is not None:
        (folder / "checkpoint.pt").write_bytes(checkpoint_bytes)
    if payload is not None:
        torch.save(payload, folder / "checkpoint.pt")
    return folder


def fails_in_process(capsys, argv, phrase):
    """Bad input ends in SystemExit with a message (no other exception, so no traceback);
    checked in-process because starting Python with torch is the slow part of a run."""
    with pytest.raises(SystemExit) as stopped:
        train_dcgan.main([str(arg) for arg in argv])
    assert stopped.value.code not in (None, 0)
    message = capsys.readouterr().err + str(stopped.value.code)  # argparse prints; sys.exit carries it
    assert phrase in message, message


@pytest.mark.parametrize(
    "case, arguments, phrase",
    [
        ("unknown optimizer", ["--g-opt", "sgd"], "invalid choice"),
        ("zero batch", ["--bs", "0"], "must be a positive integer"),
        ("negative subset", ["--subset", "-5"], "must be a positive integer"),
        (
            "fp16 on the cpu",
            ["--dataset", "shapes", "--device", "cpu", "--amp", "fp16"],
            "--amp fp16 needs a CUDA device; on cpu use --amp bf16",
        ),
        ("bad label range", ["--dataset", "shapes", "--real-label-range", "1.0", "0.7"], "LO <= HI"),
        ("grid of 65", ["--grid-samples", "65"], "at most 64 images, got 65"),
    ],
)
def test_bad_arguments(case, arguments, phrase, tmp_path, capsys):
    fails_in_process(capsys, [*arguments, "--out", tmp_path / "run"], phrase)


def test_bad_resume_folders(tmp_path, capsys):
    plain = tmp_path / "plain"
    plain.mkdir()
    fails_in_process(capsys, ["--resume", plain], "not a run folder")
    corrupt = write_fake_run(tmp_path / "corrupt", b"\x00garbage")
    fails_in_process(capsys, ["--resume", corrupt], "cannot read checkpoint")
    foreign = write_fake_run(tmp_path / "foreign", payload={"kind": "toy2d", "step": 3})
    fails_in_process(capsys, ["--resume", foreign], "is not a checkpoint of the run")
    fails_in_process(capsys, ["--resume", foreign, "--lr-g", "1e-3"], "--lr-g cannot change when resuming")
    fails_in_process(capsys, ["--resume", foreign, "--out", plain], "name different folders")
    started = write_fake_run(tmp_path / "started")  # died before its first checkpoint
    fails_in_process(capsys, ["--resume", started], "cannot be resumed")
    # The same, as a user meets it: a short message and no traceback.
    check_fails(run("--resume", corrupt), "cannot read checkpoint")
    # Refused before the data and the real features are prepared.
    assert not (tmp_path / "data").exists()


def test_shapes_are_seeded_rgb_images():
    images = gan_data.make_shapes(40, seed=3)
    assert images.shape == (40, 3, 64, 64) and images.dtype == torch.uint8
    assert torch.equal(images, gan_data.make_shapes(40, seed=3))
    assert not torch.equal(images, gan_data.make_shapes(40, seed=4))
    assert (images[:, 0] != images[:, 1]).any()  # colour, not gray
    for image in images:  # a plain dark background and one brighter shape, at least 12 px across
        colours, counts = image.flatten(1).unique(dim=1, return_counts=True)
        assert colours.shape[1] == 2 and counts.min() >= 12 * 12
        background, shape = colours[:, counts.argmax()], colours[:, counts.argmin()]
        assert (shape > background).all()


def test_model_shapes():
    generator, discriminator = train_dcgan.Generator(), train_dcgan.Discriminator(dropout=0.3)
    fake = generator(torch.randn(2, train_dcgan.NZ, 1, 1))
    assert fake.shape == (2, 3, 64, 64) and fake.abs().max() <= 1
    assert discriminator(fake).shape == (2,)
    assert sum(p.numel() for p in generator.parameters()) == 3_576_704  # the PyTorch example's G


def test_diversity_ratio_flags_collapse():
    real = gan_data.to_unit(gan_data.make_shapes(256, seed=1))
    other = gan_data.to_unit(gan_data.make_shapes(256, seed=2))
    assert 0.9 < sample_quality.diversity_ratio(other, real) < 1.1
    collapsed = other[:1] + 0.01 * torch.randn(256, 3, 64, 64)
    assert sample_quality.diversity_ratio(collapsed, real) < 0.1


def test_spread_subset_takes_every_class_in_turn():
    groups = [[f"{c}{i}" for i in range(n)] for c, n in zip("abc", (10, 2, 10))]
    picked = gan_data.spread_subset(groups, 12, seed=0)
    assert len(set(picked)) == 12 and picked == gan_data.spread_subset(groups, 12, seed=0)
    counts = [sum(item[0] == c for item in picked) for c in "abc"]
    assert counts == [5, 2, 5]


def test_folder_dataset_is_decoded_once_and_cached(tmp_path):
    folder = make_fake_tinyimagenet(tmp_path / "data") / "train"
    Image.new("L", (80, 50)).save(folder / "wide_gray.png")  # resized and centre-cropped to 64x64
    images = gan_data.load_images("folder", folder, subset=81, seed=0)
    assert images.shape == (81, 3, 64, 64) and images.dtype == torch.uint8
    assert (folder / "cache" / "folder-81-s0.pt").is_file()
    for wnid in WNIDS:  # a second load reads only the cache
        shutil.rmtree(folder / wnid)
    assert torch.equal(gan_data.load_images("folder", folder, subset=81, seed=0), images)


class ShellCommand:
    """Unpickling this runs a shell command: the payload a hostile checkpoint would carry."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_a_checkpoint_carrying_code_is_refused_unrun(tmp_path, capsys):
    marker = tmp_path / "payload-ran"
    hostile = write_fake_run(
        tmp_path / "hostile", payload={"kind": "dcgan", "x": ShellCommand(f"touch {marker}")}
    )
    fails_in_process(capsys, ["--resume", hostile], "refusing checkpoint")
    check_fails(run("--resume", hostile), "refusing checkpoint", "posix.system")
    assert not marker.exists()


def serve_folder(folder: Path):
    """An HTTP server on 127.0.0.1 serving `folder`, in a thread; returns it (shut it down)."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_download_checks_the_md5_and_extracts(tmp_path, monkeypatch, capsys):
    """The download path end to end, against a local server holding a miniature zip."""
    source = make_fake_tinyimagenet(tmp_path / "source")
    served = tmp_path / "served"
    served.mkdir()
    archive = Path(shutil.make_archive(str(served / "tiny-imagenet-200"), "zip", source.parent, source.name))
    server = serve_folder(served)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/{archive.name}"
        monkeypatch.setenv("CASMO_TINYIMAGENET_URL", url)
        with pytest.raises(gan_data.DataError, match="not the official archive"):
            gan_data.find_tinyimagenet(tmp_path / "wrong-md5")
        monkeypatch.setattr(gan_data, "TINYIMAGENET_MD5", hashlib.md5(archive.read_bytes()).hexdigest())
        folder = gan_data.find_tinyimagenet(tmp_path / "data")
    finally:
        server.shutdown()
    assert folder == tmp_path / "data" / "tiny-imagenet-200"
    assert sorted(p.name for p in (folder / "train").iterdir()) == WNIDS


# ---------------------------------------------------------------------------------------
# Sample quality, the generator's moving average and the gradient noise ratio

MEASURED = ["--dataset", "shapes", "--subset", 48, "--bs", 8, "--log-every", 1, "--eval-every", 3,
            "--eval-samples", 20, "--g-ema", 0.9, "--g-opt", "casmo"]  # fmt: skip


@pytest.fixture(scope="module")
def measured_runs(shapes_data_root, tmp_path_factory) -> tuple[Path, Path]:
    """MEASURED's runs of 6 steps: one stopped at step 3 and resumed, one whole."""
    folder = tmp_path_factory.mktemp("measured")
    common = [*MEASURED, "--data-root", shapes_data_root]
    check_ok(run(*common, "--max-steps", 3, "--out", folder / "split", measures=True))
    check_ok(run(*common, "--max-steps", 6, "--resume", folder / "split", measures=True))
    check_ok(run(*common, "--max-steps", 6, "--out", folder / "whole", measures=True))
    return folder / "split", folder / "whole"


def test_short_run_evaluates_every_new_column(measured_runs):
    out = measured_runs[1]
    rows = read_csv(out / "quality.csv")
    assert [row["step"] for row in rows] == ["3", "6"]
    # kid_std is NaN: 48 real and 20 generated images fit in one KID subset.
    assert all(row["kid_std"] == row["kid_std_ema"] == "nan" for row in rows)
    for name in set(run_log.DCGAN_QUALITY_COLUMNS) - {"kid_std", "kid_std_ema"}:
        assert all(math.isfinite(float(row[name])) for row in rows), name
    assert all(0 <= float(row["precision"]) <= 1 and 0 <= int(row["modes_covered"]) <= 36 for row in rows)
    log = read_csv(out / "log.csv")
    assert all(0 <= float(row["grad_noise_g"]) <= 1 and 0 <= float(row["grad_noise_d"]) <= 1 for row in log)
    config = json.loads((out / "config.json").read_text())
    assert config["feature_space"].startswith("shapes-cnn") and config["feature_space_accuracy"] >= 0.95
    assert (out / "samples" / "ema" / "final.png").is_file()


def test_moving_average_and_noise_ratios_resume_exactly(measured_runs):
    split_folder, whole_folder = measured_runs
    split = torch.load(split_folder / "checkpoint.pt", weights_only=True)
    whole = torch.load(whole_folder / "checkpoint.pt", weights_only=True)
    for name, tensor in whole["g_ema"].items():
        assert torch.equal(split["g_ema"][name], tensor), name
    assert untimed(split_folder / "quality.csv") == untimed(whole_folder / "quality.csv")
    assert untimed(split_folder / "log.csv") == untimed(whole_folder / "log.csv")


def test_score_images_prints_one_json_line(shapes_data_root, tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    for index, image in enumerate(gan_data.make_shapes(40, seed=9)):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{index:03d}.png")
    score = ["--dataset", "shapes", "--subset", 64, "--eval-samples", 40, "--data-root", shapes_data_root]
    train_dcgan.main([str(arg) for arg in ["--score-images", folder, *score]])
    scores = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert scores["modes_total"] == 36 and scores["precision"] > 0.5 and scores["recall"] > 0.5
    assert set(run_log.SAMPLE_MEASURES) <= set(scores)

    empty = tmp_path / "empty"
    empty.mkdir()
    fails_in_process(capsys, ["--score-images", empty, *score], "no PNG or JPEG")
    Image.new("RGB", (32, 32)).save(folder / "small.png")
    fails_in_process(capsys, ["--score-images", folder, *score], "32x32")
    (folder / "small.png").write_bytes(b"not a png")
    fails_in_process(capsys, ["--score-images", folder, *score], "small.png")


def test_offline_inception_stops_before_training(fake_data, tmp_path, capsys):
    fails_in_process(
        capsys,
        [
            "--data-root",
            fake_data,
            "--subset",
            32,
            "--out",
            tmp_path / "run",
            "--inception-weights",
            tmp_path / "x",
        ],
        "--inception-weights",
    )
    assert not (tmp_path / "run" / "log.csv").exists()


def test_bf16_and_channels_last_on_the_cpu_train_and_resume_exactly(shapes_data_root, tmp_path):
    # Batches of 2, 8 images (the diversity check generates as many), grids of 4 and no sample
    # scoring: without bf16 units (AVX2 EPYC) a bf16 step is 20-30x an fp32 one, and every
    # image G draws in bf16 costs a third of a second.
    common = ["--dataset", "shapes", "--subset", 8, "--bs", 2, "--log-every", 1, "--g-opt", "casmo",
              "--data-root", shapes_data_root, "--no-fid", "--grid-samples", 4]  # fmt: skip
    fast = [*common, "--amp", "bf16", "--channels-last"]
    check_ok(run(*fast, "--max-steps", 1, "--out", tmp_path / "split"))
    check_ok(run(*fast, "--max-steps", 2, "--resume", tmp_path / "split"))
    check_ok(run(*fast, "--max-steps", 2, "--out", tmp_path / "whole"))
    check_ok(run(*common, "--amp", "off", "--max-steps", 2, "--out", tmp_path / "fp32"))
    split = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)
    whole = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)
    # Weights only: BatchNorm's running statistics also saw the split run's extra final grid.
    for name, tensor in whole["generator"].items():
        if "running_" not in name and "num_batches" not in name:
            assert torch.equal(split["generator"][name], tensor), name
            assert tensor.dtype == torch.float32, name  # autocast computes in bf16, keeps fp32 weights
    assert untimed(tmp_path / "split" / "log.csv") == untimed(tmp_path / "whole" / "log.csv")
    # Autocast did run: bf16 arithmetic gives other weights than fp32 from the same seed (the
    # default, --amp auto, is bf16 on this CPU; the logged losses can agree where D saturates).
    fp32 = torch.load(tmp_path / "fp32" / "checkpoint.pt", weights_only=True)
    assert any(
        not torch.equal(fp32["generator"][name], tensor) for name, tensor in whole["generator"].items()
    )
    args = json.loads((tmp_path / "whole" / "config.json").read_text())["args"]
    assert (args["amp"], args["channels_last"]) == ("bf16", True)
    assert Image.open(tmp_path / "whole" / "samples" / "final.png").size == (2 + 4 * 66, 2 + 66)  # 4 a row


def test_sample_grids_are_torchvisions_layout_pixel_for_pixel(tmp_path):
    from torchvision.utils import save_image  # what the grids were drawn with before

    generator = torch.Generator().manual_seed(0)
    for count, channels in ((10, 3), (64, 3), (3, 1)):
        images = torch.rand(count, channels, 8, 8, generator=generator) * 2 - 1
        dcgan_eval.save_grid(images, tmp_path / "ours.png")
        save_image(images, tmp_path / "torchvision.png", nrow=8, normalize=True, value_range=(-1, 1))
        ours = numpy.asarray(Image.open(tmp_path / "ours.png"))
        theirs = numpy.asarray(Image.open(tmp_path / "torchvision.png"))
        # torchvision repeats a single channel three times; ours saves it as a grey image.
        assert numpy.array_equal(ours if channels == 3 else numpy.repeat(ours[..., None], 3, axis=2), theirs)


def test_ramped_moving_average_follows_stylegan2_ada():
    generator = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    average = train_dcgan.RampedAverage(generator, kimg=0.1, rampup=0.05, global_batch=10)

    def step_generator():
        with torch.no_grad():
            for param in generator.parameters():
                param.add_(1.0)
        generator(torch.randn(4, 2))  # train mode: BatchNorm's running statistics move

    # Step 1: no image seen yet, so a half-life of 0: the average becomes G, buffers and all.
    step_generator()
    average.update_parameters(generator)
    assert all(map(torch.equal, average.module.state_dict().values(), generator.state_dict().values()))
    # Step 2: 10 images seen, a half-life of min(100, 10 x 0.05) images: beta = 0.5 ** (10 / 0.5).
    before = [param.clone() for param in average.module.parameters()]
    step_generator()
    average.update_parameters(generator)
    beta = 0.5**20
    for mine, old, theirs in zip(average.module.parameters(), before, generator.parameters()):
        assert torch.allclose(mine, beta * old + (1 - beta) * theirs)
    assert torch.equal(average.module[1].running_mean, generator[1].running_mean)
    assert average.beta(10_000) == 0.5 ** (10 / 100)  # the ramp passed the 100-image half-life
    assert train_dcgan.RampedAverage(generator, 0.1, 0.0, 10).beta(0) == 0.5 ** (10 / 100)  # no ramp


def test_ramped_moving_average_resumes_exactly(tmp_path):
    # An evaluation at the split too: its forward passes move G's BatchNorm statistics, which
    # the average takes over, so both runs must make the same ones.
    common = ["--dataset", "shapes", "--subset", 32, "--bs", 8, "--log-every", 1, "--eval-every", 2,
              "--data-root", tmp_path / "data", "--g-ema-kimg", 0.05, "--g-ema-rampup", 0.5]  # fmt: skip
    check_ok(run(*common, "--max-steps", 2, "--out", tmp_path / "split"))  # mid-epoch: 4 steps an epoch
    check_ok(run(*common, "--max-steps", 4, "--resume", tmp_path / "split"))
    check_ok(run(*common, "--max-steps", 4, "--out", tmp_path / "whole"))
    split = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)
    whole = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)
    assert whole["g_ema"]["n_averaged"] == 4
    for name, tensor in whole["g_ema"].items():
        assert torch.equal(split["g_ema"][name], tensor), name
    # An average indeed: neither G's weights nor its first ones.
    weight = whole["g_ema"]["module.main.0.weight"]
    assert not torch.equal(weight, whole["generator"]["main.0.weight"])
    assert untimed(tmp_path / "split" / "quality.csv") == untimed(tmp_path / "whole" / "quality.csv")
    assert read_csv(tmp_path / "whole" / "quality.csv")[0]["diversity_ratio_ema"]
    assert (tmp_path / "whole" / "samples" / "ema" / "final.png").is_file()
    status = json.loads((tmp_path / "whole" / "status.json").read_text())
    assert status == {"status": "finished", "step": 4, "cause": None, "checkpoint_step": 4}


def test_ema_flags_refused_together_or_alone(tmp_path, capsys):
    shapes = ["--dataset", "shapes", "--out", tmp_path / "run"]
    fails_in_process(capsys, [*shapes, "--g-ema", "0.9", "--g-ema-kimg", "5"], "not allowed with argument")
    fails_in_process(capsys, [*shapes, "--g-ema-rampup", "0.1"], "pass --g-ema-kimg K too")
