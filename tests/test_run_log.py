"""--tensorboard in both scripts: the event files hold log.csv's and quality.csv's rows as
scalars, a resumed run continues the same stream without a step twice, and without the
package the flag says how to install it."""

import csv
import shutil
import sys

import pytest

import run_log
import train_dcgan
import train_toy2d

TOY = ["--points", "512", "--bs", "128", "--log-every", "1", "--eval-every", "1", "--device", "cpu"]


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def events(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_dir / run_log.TENSORBOARD_FOLDER), size_guidance={"scalars": 0})
    accumulator.Reload()
    return accumulator


def check_scalars_match_csv(run_dir):
    """Every non-empty cell of log.csv and quality.csv is a scalar <file>/<column> at its row's
    step, with the same value; no step appears twice."""
    accumulator = events(run_dir)
    tags = set(accumulator.Tags()["scalars"])
    for name in ("log", "quality"):
        rows = read_csv(run_dir / f"{name}.csv")
        for column in rows[0]:
            cells = [(int(row["step"]), row[column]) for row in rows if row[column] != ""]
            if column == "step" or not cells:
                continue
            assert f"{name}/{column}" in tags, column
            scalars = [(event.step, event.value) for event in accumulator.Scalars(f"{name}/{column}")]
            assert [step for step, _ in scalars] == [step for step, _ in cells], column
            for (_, value), (_, cell) in zip(scalars, cells):
                expected = {"True": 1.0, "False": 0.0}[cell] if cell in ("True", "False") else float(cell)
                assert value == pytest.approx(expected, rel=1e-5, abs=1e-6), column
    return accumulator


def test_toy_scalars_and_a_resume_after_a_crash(tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    train_toy2d.main([*TOY, "--epochs", "1", "--tensorboard", "--out", str(out)])
    shutil.copyfile(out / "checkpoint.pt", tmp_path / "epoch1.pt")
    train_toy2d.main(["--resume", str(out), "--epochs", "2"])
    # A crash just before epoch 2's checkpoint: its rows and events are written, the
    # checkpoint is epoch 1's. Resuming writes epoch 2 again, in the CSV and the events.
    shutil.copyfile(tmp_path / "epoch1.pt", out / "checkpoint.pt")
    train_toy2d.main(["--resume", str(out), "--epochs", "3"])
    assert [int(row["step"]) for row in read_csv(out / "log.csv")] == list(range(1, 13))
    accumulator = check_scalars_match_csv(out)
    assert [event.step for event in accumulator.Images("samples")] == [4, 8, 12]


def test_dcgan_scalars_and_grids(tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    common = ["--dataset", "shapes", "--subset", "32", "--bs", "8", "--log-every", "1", "--no-fid",
              "--data-root", str(tmp_path / "data"), "--g-ema", "0.9", "--device", "cpu"]  # fmt: skip
    train_dcgan.main([*common, "--max-steps", "3", "--sample-every", "2", "--tensorboard", "--out", str(out)])
    train_dcgan.main(["--resume", str(out), "--max-steps", "6"])
    accumulator = check_scalars_match_csv(out)
    assert [event.step for event in accumulator.Scalars("log/loss_g")] == list(range(1, 7))
    # Step 2's grid; 4, the epoch's; 6 (--sample-every) of the resumed session.
    assert [event.step for event in accumulator.Images("samples")] == [2, 4, 6]
    assert [event.step for event in accumulator.Images("samples_ema")] == [2, 4, 6]


def test_without_the_package_the_flag_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # its import now fails
    for main in (train_toy2d.main, train_dcgan.main):
        with pytest.raises(SystemExit) as stopped:
            main(
                ["--dataset", "shapes"] * (main is train_dcgan.main)
                + ["--tensorboard", "--out", str(tmp_path / "run")]
            )
        message = str(stopped.value.code)
        assert message.startswith("error: --tensorboard needs") and "pip install tensorboard" in message
        assert "\n" not in message
    assert not (tmp_path / "run").exists()
