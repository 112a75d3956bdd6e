"""Bad input and damage, case by case (issue 27): a refusal is one line without a traceback
and leaves the run folder byte for byte as it was; damage a resume can survive, it survives
and says what it dropped. The scripts run in this process (importing torch again in a
subprocess is the slow part of a run), but for a check of the exit status users see."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gan_common
import plot_logs
import train_dcgan
import train_toy2d
from casmo_ext import CASMO

ROOT = Path(__file__).resolve().parents[1]
DCGAN = ["--dataset", "shapes", "--subset", "64", "--bs", "16", "--max-steps", "2", "--log-every", "1"]
DCGAN += ["--no-fid", "--device", "cpu"]
TOY = ["--epochs", "1", "--points", "128", "--bs", "64", "--eval-every", "1", "--log-every", "1"]
TOY += ["--device", "cpu"]
MAINS = {"dcgan": (train_dcgan.main, DCGAN), "toy": (train_toy2d.main, TOY)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """One finished tiny run of each script, trained once; tests work on copies."""
    folders = {}
    for kind, (main, argv) in MAINS.items():
        folders[kind] = tmp_path_factory.mktemp(kind) / "base"
        main([*argv, "--out", str(folders[kind])])
    return folders


def copy_run(source: Path, target: Path, checkpoint: bool = True) -> Path:
    """A copy of a run folder; its checkpoint (100 MB for the DCGAN) a hard link, which a
    resumed run replaces (save_checkpoint renames a new file over it) and never writes into."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("checkpoint.pt"))
    if checkpoint:
        os.link(source / "checkpoint.pt", target / "checkpoint.pt")
    return target


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


def refused(main, argv: list, capsys) -> str:
    """Runs a script's main, which must stop with sys.exit("error: ...") (exit status 1, the
    message on stderr) and print nothing else to stderr; returns the message."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        main([str(arg) for arg in argv])
    message = stop.value.code
    assert isinstance(message, str) and message.startswith("error: "), message
    assert "\n" not in message and "Traceback" not in message
    assert capsys.readouterr().err == ""
    return message


def edit_config(run_dir: Path, **values) -> None:
    config = json.loads((run_dir / "config.json").read_text())
    config["args"].update(values)
    (run_dir / "config.json").write_text(json.dumps(config))


def csv_lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


# 1. A run folder is never overwritten.


@pytest.mark.parametrize("kind", MAINS)
def test_a_finished_run_without_its_checkpoint_is_not_overwritten(kind, runs, tmp_path, capsys):
    run_dir = copy_run(runs[kind], tmp_path / "run", checkpoint=False)
    before = snapshot(run_dir)
    main, argv = MAINS[kind]
    message = refused(main, [*argv, "--out", run_dir], capsys)
    assert "no checkpoint.pt, so it cannot be resumed" in message and "another --out" in message
    assert snapshot(run_dir) == before


def test_a_folder_holding_a_log_is_not_overwritten(runs, tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(runs["toy"] / "log.csv", run_dir)
    message = refused(train_toy2d.main, [*TOY, "--out", run_dir], capsys)
    assert "holds a run's files (log.csv)" in message
    assert snapshot(run_dir) == {"log.csv": (runs["toy"] / "log.csv").read_bytes()}


# 2. Resume survives a damaged log.


def test_resume_drops_a_garbage_line_and_keeps_the_original(runs, tmp_path, capsys):
    run_dir = copy_run(runs["dcgan"], tmp_path / "run")
    with open(run_dir / "log.csv", "a") as handle:
        handle.write("garbage\n")
    damaged = (run_dir / "log.csv").read_bytes()
    capsys.readouterr()
    train_dcgan.main(["--resume", str(run_dir), "--max-steps", "3"])
    assert "dropped 1 row(s) that do not parse" in capsys.readouterr().err
    assert (run_dir / "log.csv.bak").read_bytes() == damaged
    lines = csv_lines(run_dir / "log.csv")
    assert lines[:3] == csv_lines(runs["dcgan"] / "log.csv") and [line[:2] for line in lines[3:]] == ["3,"]
    # Every stored argument came back through the parser as it was (--no-fid too).
    original = json.loads((runs["dcgan"] / "config.json").read_text())["args"]
    resumed = {**original, "out": str(run_dir), "resume": str(run_dir), "max_steps": 3}
    assert json.loads((run_dir / "config.json").read_text())["args"] == resumed


def test_resume_drops_a_torn_row_and_rows_past_the_checkpoint(runs, tmp_path, capsys):
    """A crash after step 3's row (the checkpoint is of step 2) and in the middle of step 4's."""
    run_dir = copy_run(runs["toy"], tmp_path / "run")
    original = csv_lines(run_dir / "log.csv")
    with open(run_dir / "log.csv", "a") as handle:
        handle.write(original[-1].replace("2,1,", "3,2,", 1) + "\r\n" + "4,2,0.69")
    capsys.readouterr()
    train_toy2d.main(["--resume", str(run_dir), "--epochs", "2"])
    err = capsys.readouterr().err
    assert "dropped 1 row(s) that do not parse and 1 row(s) past the checkpoint's step 2" in err
    lines = csv_lines(run_dir / "log.csv")
    assert lines[:3] == original and [line[:4] for line in lines[3:]] == ["3,2,", "4,2,"]
    assert "4,2,0.69" in (run_dir / "log.csv.bak").read_text()


# 3. config.json's values pass the command line's checks.


@pytest.mark.parametrize(
    "values, phrase",
    [
        ({"log_every": 0}, "argument --log-every: must be a positive integer, got 0"),
        ({"bs": 0}, "argument --bs: must be a positive integer, got 0"),
        ({"dataset": "nope"}, "argument --dataset: invalid choice: 'nope'"),
        ({"subset": None}, "subset is null; --subset needs a value"),
        ({"device": "gpu"}, "argument --device: unknown device 'gpu'"),
    ],
)
def test_a_bad_value_in_config_json_is_refused(values, phrase, runs, tmp_path, capsys):
    run_dir = copy_run(runs["dcgan"], tmp_path / "run")
    edit_config(run_dir, **values)
    before = snapshot(run_dir)
    message = refused(train_dcgan.main, ["--resume", run_dir, "--max-steps", "3"], capsys)
    assert f"{run_dir / 'config.json'} (edited?): {phrase}" in message
    assert snapshot(run_dir) == before


def test_config_json_values_are_parsed_as_the_command_line_parses_them(runs, tmp_path):
    run_dir = copy_run(runs["toy"], tmp_path / "run")
    edit_config(run_dir, bs="64")  # as typed on a command line
    train_toy2d.main(["--resume", str(run_dir), "--epochs", "2"])
    assert json.loads((run_dir / "config.json").read_text())["args"]["bs"] == 64


# 4. Folders compare as paths.


def test_resume_with_a_trailing_slash_and_the_original_out(runs, tmp_path):
    run_dir = copy_run(runs["dcgan"], tmp_path / "run")
    train_dcgan.main([*DCGAN, "--out", str(run_dir), "--resume", f"{run_dir}/", "--max-steps", "3"])
    assert csv_lines(run_dir / "log.csv")[-1].startswith("3,")


def test_resume_with_a_relative_out_and_an_absolute_resume(runs, tmp_path, monkeypatch):
    run_dir = copy_run(runs["toy"], tmp_path / "run")
    monkeypatch.chdir(tmp_path)
    train_toy2d.main(["--out", "run", "--resume", str(run_dir.absolute()), "--epochs", "2"])
    assert csv_lines(run_dir / "log.csv")[-1].startswith("4,")


# 5. Start-up errors are one line, before anything is loaded.


@pytest.mark.parametrize("kind", MAINS)
@pytest.mark.parametrize(
    "device, phrase",
    [("gpu", "unknown device 'gpu'; use auto, cpu, cuda, cuda:N or mps"), ("mps", "no usable Apple GPU")],
)
def test_an_unknown_or_absent_device(kind, device, phrase, tmp_path, capsys):
    main, argv = MAINS[kind]
    assert phrase in refused(main, [*argv, "--device", device, "--out", tmp_path / "run"], capsys)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("kind", MAINS)
def test_out_naming_a_file(kind, tmp_path, capsys):
    (tmp_path / "file").write_text("mine")
    main, argv = MAINS[kind]
    assert "is a file, not a folder" in refused(main, [*argv, "--out", tmp_path / "file"], capsys)
    assert (tmp_path / "file").read_text() == "mine"


def refuse_writing_in(monkeypatch, folder: Path) -> None:
    """os.access as for a user who may not write in `folder` (the tests may run as root,
    whom permission bits do not stop)."""
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != folder and access(path, mode))


def test_out_in_a_folder_one_cannot_write(tmp_path, monkeypatch, capsys):
    refuse_writing_in(monkeypatch, tmp_path)
    message = refused(train_dcgan.main, [*DCGAN, "--out", tmp_path / "run"], capsys)
    assert f"no permission to write in {tmp_path}" in message
    assert not (tmp_path / "run").exists()


def test_plot_logs_out_naming_a_file_or_an_unwritable_folder(runs, tmp_path, monkeypatch, capsys):
    (tmp_path / "file").write_text("mine")
    refuse_writing_in(monkeypatch, tmp_path / "locked")
    (tmp_path / "locked").mkdir()
    for out, phrase in [("file", "is a file, not a folder"), ("locked/plots", "no permission to write in")]:
        capsys.readouterr()
        assert plot_logs.main([str(runs["toy"]), "--out", str(tmp_path / out)]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: --out") and phrase in err
    assert (tmp_path / "file").read_text() == "mine" and not (tmp_path / "locked" / "plots").exists()


def test_as_a_user_sees_it():
    """The exit status and the whole of stderr of a script as a command (once: the other
    script's main ends the same way, and starting Python with torch is slow)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "train_toy2d.py", "--device", "gpu"]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    assert (
        result.stderr
        == "error: argument --device: unknown device 'gpu'; use auto, cpu, cuda, cuda:N or mps\n"
    )


# 6. CASMO refuses what it cannot step, and a step that raises changes nothing.


def test_casmo_refuses_complex_parameters():
    complex_param = torch.zeros(3, dtype=torch.complex64, requires_grad=True)
    with pytest.raises(ValueError, match="not torch.complex64"):
        CASMO([complex_param])
    optimizer = CASMO([torch.zeros(3, requires_grad=True)])
    with pytest.raises(ValueError, match="not torch.complex64"):
        optimizer.add_param_group({"params": [complex_param]})
    assert len(optimizer.param_groups) == 1


def made_complex(param: torch.Tensor, state: dict) -> None:
    param.data = param.data.to(torch.complex64)
    param.grad = torch.ones_like(param)


def state_of_another_model(param: torch.Tensor, state: dict) -> None:
    state["m"] = torch.zeros(5)


@pytest.mark.parametrize("breakage", [made_complex, state_of_another_model])
def test_a_step_that_raises_changes_nothing(breakage):
    """Group 0 is fine; the second group's parameter breaks after a first step."""
    params = [torch.nn.Parameter(torch.randn(4)) for _ in range(2)]
    optimizer = CASMO([{"params": [params[0]]}, {"params": [params[1]]}], lr=0.1)
    for param in params:
        param.grad = torch.randn(4)
    optimizer.step()
    breakage(params[1], optimizer.state[params[1]])
    before = [p.tolist() for p in params], state_values(optimizer)
    with pytest.raises((ValueError, RuntimeError)):  # whatever the failure, it must come first
        optimizer.step()
    assert ([p.tolist() for p in params], state_values(optimizer)) == before


def state_values(optimizer: CASMO) -> list:
    return [(state["step"], state["m"].tolist(), state["s"].tolist()) for state in optimizer.state.values()]


# 7. Infinite hyper-parameters.


@pytest.mark.parametrize("name", ["lr", "eps", "weight_decay"])
def test_casmo_refuses_infinite_hyper_parameters(name):
    with pytest.raises(ValueError, match="Invalid"):
        CASMO([torch.zeros(3, requires_grad=True)], **{name: float("inf")})


def test_an_infinite_learning_rate_flag(tmp_path, capsys):
    message = refused(train_toy2d.main, [*TOY, "--lr-d", "inf", "--out", tmp_path / "run"], capsys)
    assert message == "error: argument --lr-d: must be positive and finite, got inf"


# 8. Messages name their flag; a CASMO flag with Adam alone says it does nothing.


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--eval-samples", "5"], "error: argument --eval-samples: at least 10 images are needed, got 5"),
        (["--beta1", "1.5"], "error: argument --beta1: must lie in [0, 1), got 1.5"),
    ],
)
def test_the_message_names_the_flag(argv, message, tmp_path, capsys):
    assert refused(train_dcgan.main, [*DCGAN, *argv, "--out", tmp_path / "run"], capsys) == message


def test_casmo_flags_with_adam_alone_are_said_to_do_nothing(capsys):
    argv = ["--robustness", "0.3", "--c-min", "0.2", "--device", "cpu"]
    gan_common.resolve_args(train_toy2d.build_parser(), argv, train_toy2d.SCRIPT, set())
    warning = "warning: --robustness, --c-min act only on CASMO; both networks use Adam: ignored\n"
    assert capsys.readouterr().err == warning
    gan_common.resolve_args(
        train_toy2d.build_parser(), [*argv, "--d-opt", "casmo"], train_toy2d.SCRIPT, set()
    )
    assert capsys.readouterr().err == ""
