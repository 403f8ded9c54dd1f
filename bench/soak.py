"""Gateway soak: a bounded, steady load through the gateway against a fast local upstream,
watching the gateway's memory and open file descriptors for leaks.

    .venv/bin/python bench/soak.py [--requests 100000] [--minutes 10] [--concurrency 16]
                                   [--stream-every 10] [--sample-interval 10] [--json FILE]

Stops at whichever comes first, `--requests` or `--minutes`. As in bench/gateway_bench.py,
the upstream (FastOpenAI from tests/fakes/upstreams.py) and the gateway are pinned to core 0
and this load generator (asyncio + aiohttp) to core 1. Every `--stream-every`th request is a
streamed one (34 events). The gateway's RSS (/proc/PID/status) and open descriptors
(/proc/PID/fd) are sampled every `--sample-interval` seconds while the load runs.

Leak check, on idle snapshots (load paused one second so no request is in flight): one after
the warm-up (`--warmup` of the requests), one at the end. The run passes when the RSS grew by
less than `--max-rss-growth` percent (default 5), descriptors did not grow at all, and no
request failed. Exit status: 0 pass, 1 a target failed."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
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
BODY = {"model": "bench", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 32}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def pinned(argv: list[str], log, env: dict | None = None) -> subprocess.Popen:
    cores = os.sched_getaffinity(0)
    server_cores = {SERVER_CORE} if SERVER_CORE in cores else cores
    return subprocess.Popen(
        argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env,
        preexec_fn=lambda: os.sched_setaffinity(0, server_cores),
    )  # fmt: skip


def wait_ready(url: str, timeout: float = 30.0, healthy_backends: bool = False) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                body = json.loads(response.read() or b"{}")
                if not healthy_backends or body.get("backends_healthy", 0) > 0:
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{url} not ready within {timeout:.0f}s")


@dataclass
class Sample:
    t: float
    done: int
    rss_kib: int
    fds: int


@dataclass
class Load:
    url: str
    concurrency: int
    stream_every: int
    ok: int = 0
    errors: int = 0
    error_examples: list[str] = field(default_factory=list)
    sent: int = 0

    async def one(self, session: aiohttp.ClientSession, stream: bool) -> None:
        payload = json.dumps({**BODY, "stream": stream}).encode()
        try:
            async with session.post(
                self.url, data=payload, headers={"content-type": "application/json"}
            ) as r:
                body = await r.read()
                good = r.status == 200 and (not stream or body.endswith(b"data: [DONE]\n\n"))
                if good and stream and b'"error"' in body:
                    good = False
                if not good:
                    self._fail(f"{r.status}: {body[-200:]!r}")
                    return
        except (aiohttp.ClientError, TimeoutError) as exc:
            self._fail(f"{type(exc).__name__}: {exc}")
            return
        self.ok += 1

    def _fail(self, what: str) -> None:
        self.errors += 1
        if len(self.error_examples) < 5:
            self.error_examples.append(what)

    async def run(self, session: aiohttp.ClientSession, count: int, deadline: float) -> None:
        """Send `count` more requests (or until `deadline`) with `concurrency` workers."""
        target = self.sent + count

        async def worker() -> None:
            while self.sent < target and time.monotonic() < deadline:
                self.sent += 1
                await self.one(
                    session, self.stream_every > 0 and self.sent % self.stream_every == 0
                )

        await asyncio.gather(*(worker() for _ in range(self.concurrency)))


async def soak(args: argparse.Namespace, pid: int, url: str) -> dict:
    load = Load(url + "/v1/chat/completions", args.concurrency, args.stream_every)
    deadline = time.monotonic() + args.minutes * 60
    samples: list[Sample] = []
    started = time.monotonic()
    stop_sampling = asyncio.Event()

    def sample() -> Sample:
        s = Sample(time.monotonic() - started, load.ok + load.errors, rss_kib(pid), fd_count(pid))
        samples.append(s)
        return s

    async def sampler() -> None:
        while not stop_sampling.is_set():
            with_timeout = asyncio.wait_for(stop_sampling.wait(), args.sample_interval)
            try:
                await with_timeout
            except TimeoutError:
                row = sample()
                print(
                    f"{row.t:8.0f}{row.done:>10}{row.rss_kib / 1024:>10.1f}{row.fds:>6}", flush=True
                )

    async def idle_snapshot() -> Sample:
        await asyncio.sleep(1.0)  # nothing in flight: connections idle, buffers released
        return sample()

    connector = aiohttp.TCPConnector(limit=args.concurrency)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        start = sample()
        print(f"{'t s':>8}{'requests':>10}{'RSS MiB':>10}{'fds':>6}")
        print(
            f"{start.t:8.0f}{start.done:>10}{start.rss_kib / 1024:>10.1f}{start.fds:>6}   (idle, before load)"
        )
        task = asyncio.create_task(sampler())
        warmup = max(args.concurrency, int(args.requests * args.warmup))
        await load.run(session, warmup, deadline)
        base = await idle_snapshot()
        print(
            f"{base.t:8.0f}{base.done:>10}{base.rss_kib / 1024:>10.1f}{base.fds:>6}   (idle, after warm-up)"
        )
        await load.run(session, args.requests - load.sent, deadline)
        end = await idle_snapshot()
        print(
            f"{end.t:8.0f}{end.done:>10}{end.rss_kib / 1024:>10.1f}{end.fds:>6}   (idle, at the end)"
        )
        stop_sampling.set()
        await task
    elapsed = time.monotonic() - started
    busy = [s for s in samples if s not in (start, base, end)]
    return {
        "requests": load.ok + load.errors,
        "ok": load.ok,
        "errors": load.errors,
        "error_examples": load.error_examples,
        "seconds": round(elapsed, 1),
        "requests_per_second": round((load.ok + load.errors) / elapsed, 1),
        "concurrency": args.concurrency,
        "stream_every": args.stream_every,
        "rss_mib": {"start": start.rss_kib / 1024, "after_warmup": base.rss_kib / 1024,
                    "end": end.rss_kib / 1024, "peak": max(s.rss_kib for s in samples) / 1024},
        "rss_growth_percent": round(100.0 * (end.rss_kib - base.rss_kib) / base.rss_kib, 2),
        "fds": {"start": start.fds, "after_warmup": base.fds, "end": end.fds,
                "peak_under_load": max((s.fds for s in busy), default=end.fds)},
        "fd_growth": end.fds - base.fds,
        "samples": [s.__dict__ for s in samples],
    }  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument(
        "--stream-every", type=int, default=10, help="every Nth request streams (0: none)"
    )
    parser.add_argument(
        "--sample-interval", type=float, default=10.0, help="seconds between RSS/fd samples"
    )
    parser.add_argument(
        "--warmup", type=float, default=0.1, help="fraction of the requests that warm up"
    )
    parser.add_argument(
        "--max-rss-growth", type=float, default=5.0, help="percent, after the warm-up"
    )
    parser.add_argument("--json", help="also write the result (and every sample) here")
    args = parser.parse_args()
    # A SIGTERM (or an ignored SIGINT, in a background job) must still stop the servers below.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    cores = os.sched_getaffinity(0)
    if CLIENT_CORE in cores and len(cores) > 1:
        os.sched_setaffinity(0, {CLIENT_CORE})

    logs = tempfile.TemporaryDirectory(prefix="tf-soak-")
    up_port, gw_port = free_port(), free_port()
    direct = f"http://127.0.0.1:{up_port}"
    upstream = pinned([sys.executable, "-m", "tests.fakes.upstreams", "--port", str(up_port)],
                      open(f"{logs.name}/upstream.log", "wb"))  # fmt: skip
    gateway = None
    try:
        wait_ready(direct + "/health")
        config = Path(logs.name) / "gateway.json"
        config.write_text(json.dumps({
            "models": {"bench": {"source": "pypi:bench"}},
            "backends": {"up": {"kind": "llamacpp", "model": "bench", "port": 1, "url": direct}},
            "gateway": {"host": "127.0.0.1", "port": gw_port, "max_concurrency_per_backend": 256},
        }))  # fmt: skip
        argv = [
            sys.executable,
            "-m",
            "reconciler.cli",
            "--log-level",
            "WARNING",
            "gateway",
            "--config",
            str(config),
        ]
        gateway = pinned(argv, open(f"{logs.name}/gateway.log", "wb"))
        url = f"http://127.0.0.1:{gw_port}"
        wait_ready(url + "/health", healthy_backends=True)
        print(f"soak: {args.requests} requests or {args.minutes:g} min, concurrency {args.concurrency}, "
              f"every {args.stream_every}th streamed; gateway pid {gateway.pid}", flush=True)  # fmt: skip
        result = asyncio.run(soak(args, gateway.pid, url))
        if gateway.poll() is not None:
            result["errors"] += 1
            result["error_examples"].append(f"gateway exited with {gateway.returncode}")
    finally:
        for proc in (gateway, upstream):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if gateway is not None and gateway.returncode not in (0, -15, None):
            print(Path(logs.name, "gateway.log").read_text()[-2000:], file=sys.stderr)
        logs.cleanup()

    checks = {
        f"no failed request ({result['errors']} failed)": result["errors"] == 0,
        f"RSS growth after warm-up {result['rss_growth_percent']:+.2f}% < {args.max_rss_growth:g}%":
            result["rss_growth_percent"] < args.max_rss_growth,
        f"fd growth after warm-up {result['fd_growth']:+d} <= 0": result["fd_growth"] <= 0,
    }  # fmt: skip
    result["passed"] = all(checks.values())
    print(f"\n{result['requests']} requests in {result['seconds']:.0f}s ({result['requests_per_second']:.0f}/s); "
          f"RSS {result['rss_mib']['after_warmup']:.1f} -> {result['rss_mib']['end']:.1f} MiB "
          f"(peak {result['rss_mib']['peak']:.1f}); fds {result['fds']['after_warmup']} -> {result['fds']['end']} "
          f"(peak under load {result['fds']['peak_under_load']})")  # fmt: skip
    for text, ok in checks.items():
        print(f"  {'PASS' if ok else 'FAIL'}  {text}")
    for example in result["error_examples"]:
        print(f"  error: {example}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
