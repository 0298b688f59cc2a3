"""The code's own checks run with the tests: mypy --strict on the package, ruff on everything."""

from __future__ import annotations

import subprocess
import sys

from .conftest import ROOT


def test_mypy_strict() -> None:
    done = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_ruff() -> None:
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "pipeline", "scripts", "tests"],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
