"""Steps/s of the DCGAN on this machine in fp32, channels_last, bf16 autocast and both, beside
what `--amp auto` chooses here, so a user can check the choice (make speed-check).

Each setting trains train_dcgan.py on the built-in shapes data for a few steps in its own
process; the figure is the median of the logged steps after the first. Run it alone: another
busy process on the same cores makes every figure meaningless."""

from __future__ import annotations

import argparse
import csv
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import speed_settings  # noqa: E402
from casmo_ext.bench import machine  # noqa: E402

SETTINGS = {
    "fp32": ["--amp", "off", "--no-channels-last"],
    "fp32 + channels_last": ["--amp", "off", "--channels-last"],
    "bf16": ["--amp", "bf16", "--no-channels-last"],
    "bf16 + channels_last": ["--amp", "bf16", "--channels-last"],
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6, help="steps per setting (the first is not timed)")
    parser.add_argument("--bs", type=int, default=16, help="batch size")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--data-root", default="data", help="train_dcgan.py's --data-root")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be at least 2: the first step is not timed")
    return args


def steps_per_second(log_csv: Path) -> float:
    """The median of the logged steps/s, the first step (start-up, first allocations) left out."""
    with open(log_csv, newline="") as handle:
        rates = [float(row["steps_per_sec"]) for row in csv.DictReader(handle)][1:]
    return statistics.median(rates)


def measure(args: argparse.Namespace, options: list[str], out: Path) -> float:
    command = [sys.executable, str(ROOT / "train_dcgan.py"), "--dataset", "shapes", "--subset", "256"]
    command += ["--bs", str(args.bs), "--max-steps", str(args.steps), "--log-every", "1", "--no-fid"]
    command += ["--device", args.device, "--data-root", args.data_root, "--out", str(out), *options]
    subprocess.run(command, check=True, capture_output=True, text=True)
    return steps_per_second(out / "log.csv")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    auto = argparse.Namespace(amp="auto", channels_last=None)
    record = speed_settings.resolve(auto, device)
    host = machine()
    print(f"{host['cpu']}, {torch.get_num_threads()} threads, torch {torch.__version__}, {host['date']}")
    print(f"--amp auto chooses here: --amp {auto.amp}, channels_last {auto.channels_last} ({record['why']})")
    rates = {}
    with tempfile.TemporaryDirectory() as folder:
        for name, options in SETTINGS.items():
            rates[name] = measure(args, options, Path(folder) / name.replace(" + ", "-"))
            print(f"  {name:<22} {rates[name]:7.2f} steps/s  ({rates[name] / rates['fp32']:.2f}x fp32)")
    fastest = max(rates, key=rates.get)
    print(f"fastest here: {fastest}")


if __name__ == "__main__":
    main()
