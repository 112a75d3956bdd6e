"""The benchmark runs and reports every optimizer; no timing is asserted here (speed
is shown by running `python -m casmo_ext.bench` alone on a quiet machine)."""

import json
import os
import subprocess
import sys

import pytest

import casmo_ext


@pytest.mark.skipif(not casmo_ext.build_info()["cpu_kernel"], reason="casmo_ext._C not built")
def test_bench_writes_table_and_json(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "casmo_ext.bench", "--device", "cpu", "--sets", "400_x_256"]
    cmd += ["--min-rounds", "2", "--min-seconds", "0", "--json", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "| cpu | 400_x_256 | casmo_kernel |" in result.stdout
    capability = casmo_ext.build_info()["cpu_kernel_capability"]
    assert f"# CPU kernel capability: {capability} (torch runs " in result.stdout
    report = json.loads(out.read_text())
    rows = {row["optimizer"]: row for row in report["rows"]}
    assert set(rows) == {"casmo_kernel", "casmo_reference", "adam_fused", "adam_foreach"}
    assert rows["adam_fused"]["vs_adam_fused"] == 1.0
    assert all(row["median_ms"] > 0 and row["elements"] == 400 * 256 for row in rows.values())
    # The fast optimizers are timed in the same rounds; the ratio is bracketed by its quartiles.
    interleaved = {rows[name]["steps_timed"] for name in ("casmo_kernel", "adam_fused", "adam_foreach")}
    assert len(interleaved) == 1 and interleaved.pop() >= 2
    for row in rows.values():
        low, high = row["vs_adam_fused_quartiles"]
        assert low <= row["vs_adam_fused"] <= high
    assert report["machine"]["build"]["cpu_kernel"] is True
    assert report["machine"]["build"]["cpu_kernel_capability"] == capability
