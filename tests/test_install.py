"""Installing: without torch importable at build time (pip's isolated build environment)
the build stops with one line that gives the working command; the pip config that
`make install` puts in .venv turns build isolation off, so plain `pip install -e .`
builds there."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(code: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300
    )


def test_build_without_torch_fails_with_one_line_naming_the_fix():
    # The first stage of `pip install -e .`: pip asks the build backend (setuptools'
    # legacy one: pyproject.toml names none) for its requirements, in an environment
    # where the installed torch cannot be imported.
    result = run_python(
        "import sys; sys.modules['torch'] = None\n"
        "from setuptools import build_meta\n"
        "build_meta.__legacy__.get_requires_for_build_editable()"
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    ours = [line for line in result.stderr.splitlines() if "casmo_ext" in line]
    assert len(ours) == 1 and ours[0].endswith("then run: pip install -e . --no-build-isolation")


def test_venv_pip_config_turns_build_isolation_off():
    env = {key: value for key, value in os.environ.items() if not key.startswith("PIP_")}
    code = (
        "from pip._internal.commands import create_command\n"
        "options, _ = create_command('install').parse_args([])\n"
        "print(bool(options.build_isolation))"
    )
    plain = run_python(code, {**env, "PIP_CONFIG_FILE": os.devnull})  # devnull: no config files
    configured = run_python(code, {**env, "PIP_CONFIG_FILE": os.path.join(ROOT, "venv-pip.conf")})
    assert plain.returncode == 0 and configured.returncode == 0, plain.stderr + configured.stderr
    assert (plain.stdout.strip(), configured.stdout.strip()) == ("True", "False")
