"""train_dcgan.py under torchrun: two CPU processes over gloo, then resumed by one process."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def run(*command, timeout=300):
    result = subprocess.run(
        [sys.executable, *map(str, command)],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        cwd=ROOT,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    return result


def logged_steps(run_dir: Path) -> list[int]:
    with open(run_dir / "log.csv", newline="") as handle:
        return [int(row["step"]) for row in csv.DictReader(handle)]


def test_two_processes_then_resume_on_one(shapes_data_root, tmp_path):
    out = tmp_path / "run"
    run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", 2, "train_dcgan.py",
        "--dataset", "shapes", "--subset", 64, "--bs", 8, "--epochs", 1, "--log-every", 1,
        "--g-opt", "casmo", "--d-opt", "casmo", "--data-root", shapes_data_root, "--eval-samples", 50,
        "--g-ema", 0.99, "--out", out)  # fmt: skip

    # 64 images in global batches of 2 x 8: 4 steps, each logged once (by rank 0 alone).
    assert logged_steps(out) == [1, 2, 3, 4]
    assert sorted(path.name for path in out.glob("*.pt*")) == ["checkpoint.pt"]
    config = json.loads((out / "config.json").read_text())
    assert (config["world_size"], config["global_batch"]) == (2, 16)
    replicas = json.loads((out / "replicas.json").read_text())
    assert replicas["identical"] and replicas["world_size"] == 2 and len(replicas["ranks"]) == 2
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=False)
    assert (checkpoint["step"], checkpoint["epoch"], checkpoint["world_size"]) == (4, 1, 2)
    assert not any(name.startswith("module.") for name in checkpoint["generator"])

    # One process continues at the next epoch with a global batch of 8: 8 more steps.
    resumed = run("train_dcgan.py", "--resume", out, "--epochs", 2)
    assert "resumes on 1" in resumed.stdout
    assert logged_steps(out) == list(range(1, 13))
    with open(out / "quality.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(row["epoch"], row["step"]) for row in rows] == [("1", "4"), ("2", "12")]
    assert all(row["kid"] and row["kid_ema"] for row in rows)  # rank 0 evaluates, under DDP too
