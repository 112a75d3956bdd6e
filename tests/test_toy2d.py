"""train_toy2d.py: the data, the quality measure, and short runs of the script itself."""

import csv
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train_toy2d
from gan_data import SemicircleDataset, sample_semicircles
from run_log import LOG_COLUMNS
from sample_quality import point_quality
from train_toy2d import EVAL_POINTS

ROOT = Path(__file__).resolve().parents[1]
# 8 batches per epoch, an evaluation every epoch, a log row every step.
SMALL = ["--points", "512", "--bs", "64", "--eval-every", "1", "--log-every", "1", "--device", "cpu"]
CASMO_COLUMNS = ["agar_g", "conf_g", "agar_d", "conf_d"]


def script(*args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(ROOT / "train_toy2d.py"), *args]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run(*args: str) -> subprocess.CompletedProcess:
    process = script(*args)
    stdout, stderr = process.communicate(timeout=300)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def train(*args: str) -> subprocess.CompletedProcess:
    result = run(*args)
    assert result.returncode == 0, result.stderr
    return result


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def without_timing(rows: list[dict]) -> list[dict]:
    return [{key: value for key, value in row.items() if key != "steps_per_sec"} for row in rows]


@pytest.fixture(scope="module")
def adam_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("toy") / "adam"
    train("--epochs", "2", *SMALL, "--out", str(run_dir))
    return run_dir


@pytest.fixture(scope="module")
def three_epochs(tmp_path_factory) -> Path:
    """The uninterrupted run that resumed runs must reproduce."""
    run_dir = tmp_path_factory.mktemp("toy") / "three"
    train("--epochs", "3", *SMALL, "--out", str(run_dir))
    return run_dir


# ------------------------------------------------------------------------ the data


def test_points_lie_on_two_offset_semicircles():
    dataset = SemicircleDataset(20_000, seed=3)
    assert len(dataset) == 20_000
    assert torch.equal(dataset[5], dataset.points[5]) and dataset[5].shape == (2,)
    x, y = dataset.points[:, 0], dataset.points[:, 1]
    left = x <= 0
    assert 0.48 < left.float().mean() < 0.52
    for side, centre_y in ((left, 10.0), (~left, -10.0)):
        radius = torch.hypot(x[side], y[side] - centre_y)
        assert abs(radius.mean() - 10) < 0.05 and abs(radius.std() - 1) < 0.05
        assert ((radius - 10).abs() <= 3).float().mean() > 0.99
        # Each half circle is symmetric about its centre's height.
        assert abs(y[side].mean() - centre_y) < 0.2
    # The left arc's mean x is -(2/π)·10.
    assert abs(x[left].mean() + 20 / math.pi) < 0.1


def test_data_is_seeded():
    assert torch.equal(SemicircleDataset(100, seed=1).points, SemicircleDataset(100, seed=1).points)
    assert not torch.equal(SemicircleDataset(100, seed=1).points, SemicircleDataset(100, seed=2).points)


# ------------------------------------------------------------------ the quality measure


def test_quality_of_real_against_real():
    real_a = sample_semicircles(EVAL_POINTS, torch.Generator().manual_seed(1))
    real_b = sample_semicircles(EVAL_POINTS, torch.Generator().manual_seed(2))
    quality = point_quality(real_a, real_b)
    assert quality["on_support"] > 0.95
    assert abs(quality["mmd"]) < 1e-3
    assert quality["swd"] < 0.5
    assert abs(quality["left_share"] + quality["right_share"] - 1) < 1e-6
    assert quality["coverage_ok"]
    assert quality["precision"] > 0.9 and quality["recall"] > 0.9 and quality["coverage"] > 0.8
    assert 0.8 < quality["density"] < 1.2


def test_quality_of_collapsed_samples():
    real = sample_semicircles(EVAL_POINTS, torch.Generator().manual_seed(1))
    # All at one spot of the left arc: on the support, but one half is missing.
    one_spot = torch.tensor([-10.0, 10.0]).repeat(EVAL_POINTS, 1)
    quality = point_quality(one_spot, real)
    assert quality["on_support"] == 1.0 and quality["left_share"] == 1.0
    assert not quality["coverage_ok"]
    assert quality["mmd"] > 0.1 and quality["swd"] > 3
    # All at one spot off the support.
    assert point_quality(torch.tensor([5.0, 5.0]).repeat(EVAL_POINTS, 1), real)["on_support"] == 0.0


def test_two_spot_collapse_passes_coverage_but_not_mmd():
    """coverage_ok looks only at sides and radii: MMD and SWD are what see a collapse
    onto one point per arc."""
    real = sample_semicircles(EVAL_POINTS, torch.Generator().manual_seed(1))
    two_spots = torch.tensor([[-10.0, 10.0], [10.0, -10.0]]).repeat(EVAL_POINTS // 2, 1)
    quality = point_quality(two_spots, real)
    assert quality["coverage_ok"]
    assert quality["mmd"] > 0.1 and quality["swd"] > 3
    # k-NN recall sees it too: the samples' balls have radius 0 and hold no real point.
    assert quality["precision"] == 1.0 and quality["recall"] == 0.0 and quality["coverage"] < 0.01


# ---------------------------------------------------------------------- the script


def test_run_writes_every_output(adam_run):
    for name in ("config.json", "log.csv", "quality.csv", "checkpoint.pt", "real.png", "generated.png"):
        assert (adam_run / name).is_file(), name
    assert (adam_run / "overlay.png").is_file()
    assert sorted(path.name for path in (adam_run / "samples").iterdir()) == [
        "epoch_001.png",
        "epoch_002.png",
    ]
    for name in ("real.csv", "generated.csv"):
        rows = read_csv(adam_run / name)
        assert len(rows) == EVAL_POINTS and list(rows[0]) == ["x", "y"]
        assert all(math.isfinite(float(row["x"])) and math.isfinite(float(row["y"])) for row in rows)
    config = json.loads((adam_run / "config.json").read_text())
    assert config["script"] == "train_toy2d.py" and config["args"]["epochs"] == 2
    assert config["device"] == "cpu" and "torch" in config["environment"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    if head.returncode == 0:  # a checkout: the run names its commit
        assert config["environment"]["code"]["commit"] == head.stdout.strip()
        assert isinstance(config["environment"]["code"]["modified"], bool)
    else:
        assert config["environment"]["code"] is None


def test_log_of_an_adam_run(adam_run):
    rows = read_csv(adam_run / "log.csv")
    assert list(rows[0]) == LOG_COLUMNS + ["steps_per_sec"]
    assert [int(row["step"]) for row in rows] == list(range(1, 17))
    assert [int(row["epoch"]) for row in rows] == [1] * 8 + [2] * 8
    for row in rows:
        assert all(row[column] == "" for column in CASMO_COLUMNS)
        # D's loss and outputs are there on the batches D skips too.
        for column in ("loss_d", "loss_g", "d_x", "d_g_z", "grad_norm_g", "grad_norm_d", "steps_per_sec"):
            assert math.isfinite(float(row[column])), column
        assert 0 < float(row["d_x"]) < 1 and 0 < float(row["d_g_z"]) < 1


def test_quality_log(adam_run):
    rows = read_csv(adam_run / "quality.csv")
    assert [(row["epoch"], row["step"]) for row in rows] == [("1", "8"), ("2", "16")]
    for row in rows:
        assert math.isfinite(float(row["mmd"])) and float(row["swd"]) >= 0
        assert 0 <= float(row["on_support"]) <= 1
        assert abs(float(row["left_share"]) + float(row["right_share"]) - 1) < 1e-3
        assert row["coverage_ok"] in ("True", "False")


def test_casmo_run_logs_its_metrics(tmp_path):
    run_dir = tmp_path / "casmo"
    result = train("--g-opt", "casmo", "--d-opt", "casmo", "--epochs", "1", *SMALL, "--out", str(run_dir))
    assert "coverage over the last evaluations" in result.stdout
    rows = read_csv(run_dir / "log.csv")
    assert len(rows) == 8
    for row in rows:
        for column in CASMO_COLUMNS:
            assert math.isfinite(float(row[column])), column
        assert 0 <= float(row["conf_g"]) <= 1 and 0 <= float(row["conf_d"]) <= 1


def test_resume_to_more_epochs_matches_an_uninterrupted_run(adam_run, three_epochs, tmp_path):
    run_dir = tmp_path / "resumed"
    shutil.copytree(adam_run, run_dir)
    # The original command with --resume: repeating the run's own values is fine.
    train("--epochs", "3", *SMALL, "--resume", str(run_dir))
    steps = [int(row["step"]) for row in read_csv(run_dir / "log.csv")]
    assert steps == list(range(1, 25))
    assert [row["epoch"] for row in read_csv(run_dir / "quality.csv")] == ["1", "2", "3"]
    assert json.loads((run_dir / "config.json").read_text())["args"]["epochs"] == 3
    # Same seed, same run: resuming changes nothing but the timing.
    assert without_timing(read_csv(run_dir / "log.csv")) == without_timing(read_csv(three_epochs / "log.csv"))
    assert read_csv(run_dir / "quality.csv") == read_csv(three_epochs / "quality.csv")


def test_ctrl_c_saves_a_checkpoint_to_resume_from(tmp_path):
    """CASMO on both networks: a mid-epoch resume must also restore D's figures, which
    rows of batches where D does not learn carry over (CASMO keeps them outside its
    state dict)."""
    casmo = ["--g-opt", "casmo", "--d-opt", "casmo"]
    three_epochs = tmp_path / "three"
    train("--epochs", "3", *SMALL, *casmo, "--out", str(three_epochs))
    run_dir = tmp_path / "interrupted"
    process = script("--epochs", "50", *SMALL, *casmo, "--out", str(run_dir))
    while not (run_dir / "log.csv").is_file() or len(read_csv(run_dir / "log.csv")) < 3:
        assert process.poll() is None, process.communicate()[1]
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGINT and "Traceback" not in stderr, stderr
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert checkpoint["epoch"] < 3, "interrupted too late to compare with the 3-epoch run"
    step = checkpoint["step"]
    stopped = {"status": "stopped", "step": step, "cause": None, "checkpoint_step": step}
    assert json.loads((run_dir / "status.json").read_text()) == stopped

    train("--resume", str(run_dir), "--epochs", "3")
    assert without_timing(read_csv(run_dir / "log.csv")) == without_timing(read_csv(three_epochs / "log.csv"))
    finished = {"status": "finished", "step": 24, "cause": None, "checkpoint_step": 24}
    assert json.loads((run_dir / "status.json").read_text()) == finished


def refusal(monkeypatch, capsys, *argv: str) -> str:
    """Runs the script in this process (no second import of torch): it must exit with
    an error, by SystemExit, so with a message and no traceback. Returns the message."""
    monkeypatch.setattr(sys, "argv", ["train_toy2d.py", *argv])
    with pytest.raises(SystemExit) as exit_info:
        train_toy2d.main()
    code = exit_info.value.code
    assert code not in (0, None)
    return capsys.readouterr().err + (code if isinstance(code, str) else "")


def test_resume_refuses_a_finished_run_and_a_changed_argument(adam_run, monkeypatch, capsys):
    assert "larger --epochs" in refusal(monkeypatch, capsys, "--resume", str(adam_run), "--epochs", "2")
    message = refusal(monkeypatch, capsys, "--resume", str(adam_run), "--seed", "3")
    assert "--seed cannot change when resuming (the run used 0, given 3)" in message
    assert "--seed" in refusal(monkeypatch, capsys, "--seed=3", "--resume", str(adam_run), "--epochs", "4")


def test_a_new_run_refuses_a_folder_holding_one(adam_run, monkeypatch, capsys):
    assert "--resume" in refusal(monkeypatch, capsys, "--epochs", "1", *SMALL, "--out", str(adam_run))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--g-opt", "sgd"], "invalid choice"),
        (["--bs", "0"], "positive integer"),
        (["--epochs", "-3"], "positive integer"),
        (["--lr-d", "0"], "must be positive"),
        (["--label-smooth", "1.5"], "must be in (0, 1]"),
        (["--d-opt", "casmo", "--c-min", "2"], "--c-min"),
    ],
)
def test_bad_arguments_fail_with_a_message(args, message, tmp_path, monkeypatch, capsys):
    assert message in refusal(monkeypatch, capsys, *args, "--device", "cpu", "--out", str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_resume_from_a_folder_that_is_no_toy_run(tmp_path, monkeypatch, capsys):
    assert "not a run folder" in refusal(monkeypatch, capsys, "--resume", str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"script": "train_dcgan.py", "args": {}}))
    assert "train_dcgan.py" in refusal(monkeypatch, capsys, "--resume", str(tmp_path))


def test_a_checkpoint_carrying_code_is_refused_unrun(adam_run, tmp_path, monkeypatch, capsys):
    run_dir, marker = tmp_path / "hostile", tmp_path / "payload-ran"
    shutil.copytree(adam_run, run_dir)

    class ShellCommand:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"generator": ShellCommand()}, run_dir / "checkpoint.pt")
    assert "refusing checkpoint" in refusal(monkeypatch, capsys, "--resume", str(run_dir), "--epochs", "3")
    assert not marker.exists()
