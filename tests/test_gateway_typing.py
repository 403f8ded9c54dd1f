"""reconciler/gateway/ passes `mypy --strict` (issue 15). Modules outside the gateway that it
imports are read for their types but not judged here (--follow-imports=silent): they have
their own, less strict, check. reconciler/gateway/testing.py is a test double on its way to
tests/ and is left out."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_the_gateway_passes_mypy_strict():
    pytest.importorskip("mypy", reason="mypy comes with the test extra: pip install -e .[test]")
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--follow-imports=silent", "--no-error-summary",
         "--exclude", r"reconciler/gateway/testing\.py", "reconciler/gateway"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
