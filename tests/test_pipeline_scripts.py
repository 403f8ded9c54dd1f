"""The pipeline scripts parse, explain their usage, and stay thin wrappers over the CLI."""

from __future__ import annotations

import subprocess

import pytest

from tests.conftest import REPO

SCRIPTS = ["bootstrap.sh", "server.sh", "model-pull.sh", "export.sh", "health.sh"]


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_parses_and_uses_the_shared_setup(name):
    path = REPO / "scripts" / name
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    text = path.read_text()
    assert "source \"$(dirname \"$0\")/lib/setup.sh\"" in text and "exec \"$TF_VENV/bin/tensorforge\"" in text
    assert path.stat().st_mode & 0o111


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["model-pull.sh"], "usage: "),
        (["model-pull.sh", "--revision", "main"], "--model NAME"),
        (["server.sh", "launch"], "start|stop|restart|status"),
        (["export.sh"], "--format csv"),
    ],
)
def test_usage_errors_exit_2_before_touching_the_venv(argv, message, tmp_path):
    env = {"PATH": "/usr/bin:/bin", "TF_VENV": str(tmp_path / "no-venv")}
    done = subprocess.run(
        ["bash", str(REPO / "scripts" / argv[0]), *argv[1:]], env=env, capture_output=True, text=True
    )
    assert done.returncode == 2 and message in done.stderr
    assert not (tmp_path / "no-venv").exists()
