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
    assert setup in text and 'exec "$TF_VENV/bin/tensorforge"' in text
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
        ["bash", str(REPO / "scripts" / argv[0]), *argv[1:]],
        env=env,
        capture_output=True,
        text=True,
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
    (venv / ".tensorforge-cpu").write_text(install_stamp(REPO) + "\n")
    return venv


def install_stamp(root: Path) -> str:
    """What ensure_venv records after installing: the project and its pins, hashed together."""
    return hashlib.sha256(
        (root / "pyproject.toml").read_bytes() + (root / "constraints.txt").read_bytes()
    ).hexdigest()


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
    assert (
        run_script(bin_dir / "tf-server.sh", "--config", "h.yaml", venv=venv)
        == "server|start|--config|h.yaml|"
    )
    out = run_script(
        bin_dir / "tf-health.sh", "--json", venv=venv, LLAMACPP_URL="http://127.0.0.1:9"
    )
    assert out == "health|--llamacpp-url|http://127.0.0.1:9|--json|"


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_shellcheck_finds_nothing():
    scripts = sorted(str(p) for p in (REPO / "scripts").rglob("*.sh"))
    done = subprocess.run(["shellcheck", "-S", "warning", *scripts], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout


def test_ensure_venv_installs_with_the_constraints_and_again_when_they_change(tmp_path):
    """pip gets constraints.txt (the tested versions) with the extras asked for; nothing runs
    while pyproject.toml and the pins stay the same; new pins reinstall."""
    root = tmp_path / "root"
    (root / "scripts" / "lib").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "lib" / "setup.sh", root / "scripts" / "lib" / "setup.sh")
    for name in ("pyproject.toml", "constraints.txt"):
        shutil.copy(REPO / name, root / name)
    venv, calls = tmp_path / "venv", tmp_path / "pip-calls"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"  # records each pip call instead of installing
    python.write_text(f'#!/bin/sh\necho "$*" >> {calls}\n')
    python.chmod(0o755)

    def ensure(extras: str) -> list[str]:
        calls.unlink(missing_ok=True)
        script = f"source {root}/scripts/lib/setup.sh && ensure_venv {extras}"
        done = subprocess.run(["bash", "-c", script], env={"PATH": "/usr/bin:/bin", "TF_VENV": str(venv)},
                              capture_output=True, text=True, timeout=30)  # fmt: skip
        assert done.returncode == 0, done.stderr
        return calls.read_text().splitlines() if calls.exists() else []

    upgrade_pip, install = ensure("cpu,analyze")
    assert install.split() == ["-m", "pip", "install", "--disable-pip-version-check",
                               "-c", f"{root}/constraints.txt", "-e", f"{root}[cpu,analyze]"]  # fmt: skip
    assert (venv / ".tensorforge-cpu-analyze").read_text().strip() == install_stamp(root)
    assert ensure("cpu,analyze") == []
    with (root / "constraints.txt").open("a") as pins:
        pins.write("zipp==3.23.0\n")
    assert len(ensure("cpu,analyze")) == 2
