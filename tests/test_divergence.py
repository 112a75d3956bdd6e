"""A run whose losses or weights stop being finite ends as "diverged" (issue #28): status.json
says so, the exit code is 3, nothing is drawn, evaluated or saved from that state (the last
checkpoint stays the last finite one), and the run cannot be resumed."""

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gan_common
import run_log
import train_dcgan
import train_toy2d

ROOT = Path(__file__).resolve().parents[1]
# 16 images in batches of 4: 4 steps an epoch, a quality row, a grid and a checkpoint after each.
DCGAN = ["--dataset", "shapes", "--subset", 16, "--bs", 4, "--no-fid", "--device", "cpu"]
# 512 points in batches of 64: 8 steps an epoch, an evaluation and a checkpoint after each.
TOY = ["--points", 512, "--bs", 64, "--eval-every", 1, "--log-every", 1, "--device", "cpu"]


# ---------------------------------------------------------------------------------------
# The pieces


def test_the_watch_names_the_first_non_finite_loss_and_its_step():
    watch = gan_common.DivergenceWatch(("loss_d", "loss_g"), torch.device("cpu"))
    networks = {"generator": torch.nn.Linear(2, 2), "discriminator": torch.nn.Linear(2, 1)}
    finite = torch.tensor(0.7)
    watch.observe(1, loss_d=finite, loss_g=finite)
    watch.observe(2, loss_d=None, loss_g=finite)  # D did not learn: its loss was not computed
    watch.check(2, networks)  # all finite: no exception
    watch.observe(3, loss_d=finite, loss_g=torch.tensor(math.inf))
    watch.observe(4, loss_d=torch.tensor(math.nan), loss_g=torch.tensor(math.nan))
    watch.observe(5, loss_d=finite, loss_g=finite)
    with pytest.raises(gan_common.Diverged) as found:
        watch.check(5, networks)
    assert (found.value.step, found.value.cause) == (3, "loss_g is inf")
    assert str(found.value) == "diverged at step 3: loss_g is inf"
    # Under torchrun every process stops at the earliest finding of any of them.
    with pytest.raises(gan_common.Diverged) as found:
        watch.check(6, networks, gather=lambda mine: [mine, gan_common.Diverged(2, "loss_d is -inf")])
    assert (found.value.step, found.value.cause) == (2, "loss_d is -inf")


def test_the_watch_checks_the_parameters_and_buffers():
    watch = gan_common.DivergenceWatch(("loss_d", "loss_g"), torch.device("cpu"))
    generator, discriminator = torch.nn.BatchNorm1d(2), torch.nn.Linear(2, 1)
    networks = {"generator": generator, "discriminator": discriminator}
    watch.observe(1, loss_d=torch.tensor(0.5), loss_g=torch.tensor(0.5))
    generator.running_var.fill_(math.inf)  # BatchNorm's statistics of activations past fp32's range
    with pytest.raises(gan_common.Diverged) as found:
        watch.check(1, networks)
    assert (found.value.step, found.value.cause) == (1, "generator buffers are not finite")
    generator.running_var.fill_(1.0)
    with torch.no_grad():
        discriminator.bias.fill_(-math.inf)
    with pytest.raises(gan_common.Diverged) as found:
        watch.check(2, networks)
    assert (found.value.step, found.value.cause) == (2, "discriminator parameters are not finite")


def test_a_checkpoint_of_a_non_finite_state_is_not_written(tmp_path):
    path = tmp_path / "checkpoint.pt"
    gan_common.save_checkpoint(path, {"opt_g": {"m": torch.ones(3)}, "step": 4}, finite=("opt_g",))
    before = path.read_bytes()
    payload = {"opt_g": {"state": {0: {"m": torch.tensor([1.0, math.nan])}}}, "rng": None, "step": 9}
    with pytest.raises(gan_common.Diverged) as found:
        gan_common.save_checkpoint(path, payload, finite=("opt_g",))
    assert (found.value.step, found.value.cause) == (9, "opt_g state is not finite")
    assert path.read_bytes() == before and [file.name for file in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_two_writers_of_one_path_each_rename_a_complete_file(tmp_path):
    # Two runs of a grid cache the same real images' features at once: their writes overlap.
    path = tmp_path / "features.pt"
    with gan_common.atomic_file(path) as first:
        first.write_text("first")
        with gan_common.atomic_file(path) as second:
            second.write_text("second")
        assert path.read_text() == "second"
    assert path.read_text() == "first"
    with pytest.raises(OSError), gan_common.atomic_file(path) as failed:
        failed.write_text("partial")
        raise OSError("disk full")
    assert path.read_text() == "first" and [file.name for file in tmp_path.iterdir()] == ["features.pt"]


def test_status_json_round_trip_and_a_diverged_run_is_not_resumable(tmp_path, capsys):
    status = run_log.RunStatus(tmp_path, checkpoint_step=None)
    status.write("running", 0)
    assert run_log.read_status(tmp_path) == {
        "status": "running",
        "step": 0,
        "cause": None,
        "checkpoint_step": None,
    }
    status.saved(8)
    assert run_log.read_status(tmp_path)["checkpoint_step"] == 8
    run_log.check_resumable(tmp_path)  # running: resumable
    with pytest.raises(SystemExit) as stop:
        status.exit_diverged(gan_common.Diverged(11, "loss_d is nan"))
    assert stop.value.code == run_log.EXIT_DIVERGED == 3
    expected = "diverged at step 11: loss_d is nan; last good checkpoint: step 8 in "
    assert capsys.readouterr().err == f"{expected}{tmp_path / 'checkpoint.pt'}\n"
    assert run_log.read_status(tmp_path) == {
        "status": "diverged", "step": 11, "cause": "loss_d is nan", "checkpoint_step": 8
    }  # fmt: skip
    with pytest.raises(gan_common.RunError, match="status.json: the run diverged at step 11"):
        run_log.check_resumable(tmp_path)
    (tmp_path / "status.json").write_text("[1]")
    with pytest.raises(gan_common.RunError, match="is none of"):
        run_log.read_status(tmp_path)


# ---------------------------------------------------------------------------------------
# The scripts


def run_script(script: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / script), *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        cwd=ROOT,
        timeout=300,
    )


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def check_diverged(code: int, stderr: str, run_dir: Path) -> dict:
    """Exit code 3, one line on stderr naming the step and the cause, and status.json."""
    assert code == run_log.EXIT_DIVERGED, stderr
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "diverged" and status["step"] >= 1, status
    line = f"diverged at step {status['step']}: {status['cause']}; no checkpoint was written before it"
    assert [text for text in stderr.splitlines() if text.startswith("diverged")] == [line], stderr
    assert "Traceback" not in stderr
    return status


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


def exit_code(main, argv: list) -> int:
    with pytest.raises(SystemExit) as stop:
        main([str(arg) for arg in argv])
    return stop.value.code


def check_finite_checkpoint(run_dir: Path, step: int) -> None:
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert checkpoint["step"] == step
    floats = [tensor for tensor in gan_common.state_tensors(checkpoint) if tensor.is_floating_point()]
    assert floats and all(tensor.isfinite().all() for tensor in floats)


def refused_resume(main, run_dir: Path) -> str:
    """--resume of a diverged run: exit status 1 with a one-line message naming status.json."""
    with pytest.raises(SystemExit) as stop:
        main(["--resume", str(run_dir)])
    message = stop.value.code
    assert isinstance(message, str) and message.startswith("error: ") and "\n" not in message, message
    assert f"{run_dir / 'status.json'}: the run diverged at step" in message
    return message


def test_dcgan_with_an_absurd_learning_rate(tmp_path):
    """As a user meets it: a subprocess, exit code 3 and one line."""
    run_dir = tmp_path / "run"
    result = run_script("train_dcgan.py", *DCGAN, "--data-root", tmp_path / "data", "--epochs", 2,
                        "--log-every", 1, "--d-opt", "casmo", "--lr-d", "1e30", "--out", run_dir)  # fmt: skip
    status = check_diverged(result.returncode, result.stderr, run_dir)
    assert status["checkpoint_step"] is None and not (run_dir / "checkpoint.pt").exists()
    assert read_csv(run_dir / "quality.csv") == [] and not any((run_dir / "samples").iterdir())
    assert all(int(row["step"]) < status["step"] for row in read_csv(run_dir / "log.csv"))
    before = snapshot(run_dir)
    refused_resume(train_dcgan.main, run_dir)  # for its status, before it sees no checkpoint
    assert snapshot(run_dir) == before


def test_toy_with_an_absurd_learning_rate(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = exit_code(train_toy2d.main, [*TOY, "--epochs", 2, "--lr-d", "1e30", "--out", run_dir])
    status = check_diverged(code, capsys.readouterr().err, run_dir)
    assert status["checkpoint_step"] is None and not (run_dir / "checkpoint.pt").exists()
    assert read_csv(run_dir / "quality.csv") == [] and not any((run_dir / "samples").iterdir())
    assert all(int(row["step"]) < status["step"] for row in read_csv(run_dir / "log.csv"))
    refused_resume(train_toy2d.main, run_dir)


def test_dcgan_nan_loss_after_a_checkpoint(tmp_path, monkeypatch, capsys):
    """D's loss made NaN at step 6, in the second epoch (in this process, at a known step),
    and seen at step 8's log row: no row, grid or checkpoint of epoch 2; epoch 1's stay."""
    train_step = train_dcgan.train_step

    def nan_at_step_6(training, real, logged):
        result = train_step(training, real, logged)
        if training.counters.step == 5:  # counted after the step: this is step 6
            result.loss_d = torch.tensor(math.nan)
        return result

    monkeypatch.setattr(train_dcgan, "train_step", nan_at_step_6)
    run_dir = tmp_path / "run"
    argv = [*DCGAN, "--data-root", tmp_path / "data", "--epochs", 3, "--log-every", 4, "--out", run_dir]
    assert exit_code(train_dcgan.main, argv) == run_log.EXIT_DIVERGED
    status = {"status": "diverged", "step": 6, "cause": "loss_d is nan", "checkpoint_step": 4}
    assert json.loads((run_dir / "status.json").read_text()) == status
    line = f"diverged at step 6: loss_d is nan; last good checkpoint: step 4 in {run_dir / 'checkpoint.pt'}"
    assert line in capsys.readouterr().err.splitlines()
    check_finite_checkpoint(run_dir, 4)
    assert [row["step"] for row in read_csv(run_dir / "log.csv")] == ["4"]
    assert [row["step"] for row in read_csv(run_dir / "quality.csv")] == ["4"]
    assert sorted(path.name for path in (run_dir / "samples").iterdir()) == ["epoch_001.png"]
    before = snapshot(run_dir)
    refused_resume(train_dcgan.main, run_dir)
    assert snapshot(run_dir) == before


def test_toy_nan_weight_after_a_checkpoint(tmp_path, monkeypatch, capsys):
    """A weight of D turns NaN in step 10, the second epoch's second: seen at its log row."""
    train_step = train_toy2d.train_step

    def nan_weight_at_step_10(session, nets, real, counters, train_d):
        figures = train_step(session, nets, real, counters, train_d)
        if counters.step == 9:  # counted after the step: this is step 10
            with torch.no_grad():
                nets.discriminator.net[0].weight[0, 0] = math.nan
        return figures

    monkeypatch.setattr(train_toy2d, "train_step", nan_weight_at_step_10)
    run_dir = tmp_path / "run"
    assert exit_code(train_toy2d.main, [*TOY, "--epochs", 3, "--out", run_dir]) == run_log.EXIT_DIVERGED
    cause = "discriminator parameters are not finite"
    status = {"status": "diverged", "step": 10, "cause": cause, "checkpoint_step": 8}
    assert json.loads((run_dir / "status.json").read_text()) == status
    assert f"diverged at step 10: {cause}; last good checkpoint: step 8" in capsys.readouterr().err
    check_finite_checkpoint(run_dir, 8)
    assert [int(row["step"]) for row in read_csv(run_dir / "log.csv")] == list(range(1, 10))
    assert [row["step"] for row in read_csv(run_dir / "quality.csv")] == ["8"]
    assert sorted(path.name for path in (run_dir / "samples").iterdir()) == ["epoch_001.png"]
    refused_resume(train_toy2d.main, run_dir)
