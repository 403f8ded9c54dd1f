"""The pipeline scripts parse, explain their usage, and stay thin wrappers over the CLI."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO

SCRIPTS = ["bootstrap.sh", "server.sh", "model-pull.sh", "export.sh", "health.sh"]


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_parses_and_uses_the_shared_setup(name):
    path = REPO / "scripts" / name
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    text = path.read_text()
    setup = 'source "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/lib/setup.sh"'
    assert setup in text and "exec \"$TF_VENV/bin/tensorforge\"" in text
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


def fake_venv(tmp_path: Path) -> Path:
    """A venv whose `tensorforge` prints its arguments, stamped as installed, so a script
    runs to its `exec` without pip."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to("/bin/true")
    tool = venv / "bin" / "tensorforge"
    tool.write_text('#!/bin/sh\nprintf "%s|" "$@"\n')
    tool.chmod(0o755)
    stamp = hashlib.sha256((REPO / "pyproject.toml").read_bytes()).hexdigest()
    (venv / ".tensorforge-cpu").write_text(stamp + "\n")
    return venv


def run_script(link: Path, *args: str, venv: Path, **env: str) -> str:
    done = subprocess.run(["bash", str(link), *args], capture_output=True, text=True, timeout=30,
                          env={"PATH": "/usr/bin:/bin", "TF_VENV": str(venv), **env})  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_scripts_work_through_a_symlink_and_keep_their_flags(tmp_path):
    """Installed as links in a bin directory (the setup is found next to the real script);
    arguments with spaces arrive intact; `server.sh --config F` means start."""
    venv = fake_venv(tmp_path)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("export.sh", "server.sh", "health.sh"):
        (bin_dir / f"tf-{name}").symlink_to(REPO / "scripts" / name)
    out = run_script(bin_dir / "tf-export.sh", "--input", "a b.json", "--format", "csv", venv=venv)
    assert out == "export|--input|a b.json|--format|csv|"
    assert run_script(bin_dir / "tf-server.sh", "--config", "h.yaml", venv=venv) == "server|start|--config|h.yaml|"
    out = run_script(bin_dir / "tf-health.sh", "--json", venv=venv, LLAMACPP_URL="http://127.0.0.1:9")
    assert out == "health|--llamacpp-url|http://127.0.0.1:9|--json|"


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_shellcheck_finds_nothing():
    scripts = sorted(str(p) for p in (REPO / "scripts").rglob("*.sh"))
    done = subprocess.run(["shellcheck", "-S", "warning", *scripts], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout
