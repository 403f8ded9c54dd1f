"""Gateway overhead benchmark: a fast local OpenAI-compatible upstream, measured directly and
through the gateway, alternating, in one run.

    .venv/bin/python bench/gateway_bench.py [--seconds 1.5] [--rounds 2] [--concurrency 1 8 64]
        [--baseline DIR]

`--baseline DIR` runs a second gateway from another checkout (say `git worktree add DIR
cc5e518`) beside this one, measured in the same rounds, so a regression is a ratio from one
run rather than two runs on a machine whose load moves. The order of the targets rotates
each round: use a multiple of their number for `--rounds`.

The upstream and the gateway are pinned to core 0, this load generator (asyncio + aiohttp)
to core 1. Reported per mode and concurrency: requests/s, p50/p99 latency, time to first
chunk (streams), added p50 latency, gateway CPU per request (utime+stime from /proc/PID/stat),
the gateway/direct throughput ratio, and the gateway's RSS before and after."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parent.parent
SERVER_CORE, CLIENT_CORE = 0, 1
TICKS = os.sysconf("SC_CLK_TCK")
BODY = {"model": "bench", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 32}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def pinned(argv: list[str], env: dict | None = None, cwd: Path = REPO) -> subprocess.Popen:
    return subprocess.Popen(
        argv, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
        preexec_fn=lambda: os.sched_setaffinity(0, {SERVER_CORE}),
    )  # fmt: skip


def wait_ready(url: str, timeout: float = 20.0, healthy_backends: bool = False) -> float:
    import urllib.request

    started = time.monotonic()
    while time.monotonic() - started < timeout:
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                body = json.loads(response.read() or b"{}")
                if not healthy_backends or body.get("backends_healthy", 0) > 0:
                    return time.monotonic() - started
        except OSError:
            pass
        time.sleep(0.01)
    raise TimeoutError(url)


@dataclass
class Run:
    latencies: list[float] = field(default_factory=list)
    first_chunks: list[float] = field(default_factory=list)
    errors: int = 0
    elapsed: float = 0.0
    cpu: float = 0.0

    def add(self, other: Run) -> None:
        self.latencies += other.latencies
        self.first_chunks += other.first_chunks
        self.errors += other.errors
        self.elapsed += other.elapsed
        self.cpu += other.cpu


async def load(url: str, stream: bool, concurrency: int, seconds: float, pid: int | None) -> Run:
    run = Run()
    payload = json.dumps({**BODY, "stream": stream}).encode()
    headers = {"content-type": "application/json"}
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one() -> None:
            started = time.perf_counter()
            try:
                async with session.post(url, data=payload, headers=headers) as response:
                    if stream:
                        first = True
                        async for _ in response.content.iter_any():
                            if first:
                                run.first_chunks.append(time.perf_counter() - started)
                                first = False
                    else:
                        await response.read()
                    if response.status != 200:
                        run.errors += 1
                        return
            except aiohttp.ClientError:
                run.errors += 1
                return
            run.latencies.append(time.perf_counter() - started)

        async def worker(deadline: float) -> None:
            while time.perf_counter() < deadline:
                await one()

        for _ in range(concurrency):  # warm the connections
            await one()
        run.latencies.clear()
        run.first_chunks.clear()
        cpu_before = cpu_seconds(pid) if pid else 0.0
        started = time.perf_counter()
        await asyncio.gather(*(worker(started + seconds) for _ in range(concurrency)))
        run.elapsed = time.perf_counter() - started
        run.cpu = (cpu_seconds(pid) if pid else 0.0) - cpu_before
    return run


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] * 1000


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=1.5, help="length of one measurement")
    parser.add_argument("--rounds", type=int, default=2, help="alternations of direct and gateway")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--transport", choices=["lean", "aiohttp"], nargs="+", default=["lean"],
                        help="upstream transport(s) of the gateway for http:// backends; with two, "
                        "two gateways run side by side and are measured alternately")  # fmt: skip
    parser.add_argument("--baseline", type=Path, metavar="DIR",
                        help="also run the gateway of the checkout at DIR (same venv), side by side")  # fmt: skip
    args = parser.parse_args()
    os.sched_setaffinity(0, {CLIENT_CORE})

    up_port = free_port()
    upstream = pinned([sys.executable, "-m", "tests.fakes.upstreams", "--port", str(up_port)])
    direct = f"http://127.0.0.1:{up_port}"
    wait_ready(direct + "/health")
    gateways: dict[str, tuple[subprocess.Popen, str]] = {}
    files = []
    try:
        sources = [(f"gw-{t}", t, REPO) for t in args.transport]
        if args.baseline is not None:
            sources.append(
                (f"base-{args.transport[0]}", args.transport[0], args.baseline.resolve())
            )
        for label, transport, source in sources:
            port = free_port()
            config = {
                "models": {"bench": {"source": "pypi:bench"}},
                "backends": {
                    "up": {"kind": "llamacpp", "model": "bench", "port": 1, "url": direct}
                },
                "gateway": {"host": "127.0.0.1", "port": port, "max_concurrency_per_backend": 256},
            }
            with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
                json.dump(config, f)
            files.append(f.name)
            # PYTHONPATH first: the checkout's own package, not the venv's installed one.
            env = {**os.environ, "TF_GATEWAY_TRANSPORT": transport, "PYTHONPATH": str(source)}
            argv = [
                sys.executable,
                "-m",
                "reconciler.cli",
                "--log-level",
                "WARNING",
                "gateway",
                "--config",
                f.name,
            ]
            proc = pinned(argv, env, cwd=source)
            url = f"http://127.0.0.1:{port}"
            ready = wait_ready(url + "/health", healthy_backends=True)
            gateways[label] = (proc, url)
            time.sleep(0.5)
            print(
                f"{label}: healthy {ready:.2f}s after start; idle RSS {rss_mib(proc.pid):.1f} MiB"
            )
        idle = {name: rss_mib(proc.pid) for name, (proc, _) in gateways.items()}
        print(f"{'mode':<10}{'c':>4} {'target':<12}{'req/s':>8}{'p50 ms':>8}{'p99 ms':>8}{'ttfc ms':>8}"
              f"{'added p50':>10}{'CPU ms/req':>11}{'ratio':>6}{'err':>4}")  # fmt: skip
        targets = [("direct", direct, None), *((n, u, p.pid) for n, (p, u) in gateways.items())]
        for stream in (False, True):
            for concurrency in args.concurrency:
                results = {name: Run() for name, _, _ in targets}
                for round_ in range(args.rounds):
                    # Rotated: measured identical code side by side, a fixed order favoured
                    # the later target by 6-10 % of CPU per request on a busy machine.
                    shift = round_ % len(targets)
                    for name, base, pid in targets[shift:] + targets[:shift]:
                        url = base + "/v1/chat/completions"
                        results[name].add(
                            asyncio.run(load(url, stream, concurrency, args.seconds, pid))
                        )
                d = results["direct"]
                d_rps = len(d.latencies) / d.elapsed
                for name, run in results.items():
                    rps = len(run.latencies) / run.elapsed
                    ttfc = f"{pct(run.first_chunks, 0.5):8.2f}" if stream else f"{'-':>8}"
                    extra = f"{'':10}{'':11}{'':6}"
                    if name != "direct":
                        added = pct(run.latencies, 0.5) - pct(d.latencies, 0.5)
                        cpu_per = run.cpu / max(1, len(run.latencies)) * 1000
                        extra = f"{added:10.2f}{cpu_per:11.3f}{rps / d_rps:6.2f}"
                    mode = "stream34" if stream else "json"
                    print(f"{mode:<10}{concurrency:>4} {name:<12}{rps:8.0f}{pct(run.latencies, 0.5):8.2f}"
                          f"{pct(run.latencies, 0.99):8.2f}{ttfc}{extra}{run.errors:4d}", flush=True)  # fmt: skip
        for name, (proc, _) in gateways.items():
            print(
                f"{name}: RSS {idle[name]:.1f} MiB idle, {rss_mib(proc.pid):.1f} MiB after the load"
            )
    finally:
        for proc in [p for p, _ in gateways.values()] + [upstream]:
            proc.terminate()
            proc.wait(10)
        for name in files:
            os.unlink(name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
