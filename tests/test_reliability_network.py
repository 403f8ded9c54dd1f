"""A network partition between the gateway and one of two replicas, on test hosts made of
network namespaces and veth pairs that this test creates and removes itself.

Topology: namespace gw (the gateway and the load client) linked by one veth pair to each of
b1 and b2 (a fast OpenAI-compatible upstream each). Cutting b1's end of its link makes its
packets vanish silently, like a pulled cable: no refusal, only silence."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


class Netns:
    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:6]
        self.gw, self.b1, self.b2 = f"tfgw{tag}", f"tfb1{tag}", f"tfb2{tag}"
        self.links = {self.b1: (f"g1{tag}", f"p1{tag}", 1), self.b2: (f"g2{tag}", f"p2{tag}", 2)}
        self.procs: list[subprocess.Popen] = []

    def up(self) -> None:
        for ns in (self.gw, self.b1, self.b2):
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        for ns, (gw_end, far_end, net) in self.links.items():
            sh(
                "ip",
                "link",
                "add",
                gw_end,
                "netns",
                self.gw,
                "type",
                "veth",
                "peer",
                "name",
                far_end,
                "netns",
                ns,
            )
            sh("ip", "-n", self.gw, "addr", "add", f"10.203.{net}.1/24", "dev", gw_end)
            sh("ip", "-n", ns, "addr", "add", f"10.203.{net}.2/24", "dev", far_end)
            sh("ip", "-n", self.gw, "link", "set", gw_end, "up")
            sh("ip", "-n", ns, "link", "set", far_end, "up")

    def run(self, ns: str, *argv: str, **kw) -> subprocess.Popen:
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv], cwd=REPO, **kw)
        self.procs.append(proc)
        return proc

    def cut(self, ns: str) -> None:
        _, far_end, _ = self.links[ns]
        sh("ip", "-n", ns, "link", "set", far_end, "down")

    def down(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait()
        for ns in (self.gw, self.b1, self.b2):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@pytest.fixture
def netns():
    if os.geteuid() != 0 or not shutil.which("ip"):
        pytest.skip("network namespaces need root and iproute2 (CI has both)")
    probe = subprocess.run(["ip", "netns", "add", "tfprobe"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot create network namespaces here: {probe.stderr.strip()}")
    subprocess.run(["ip", "netns", "del", "tfprobe"], capture_output=True)
    net = Netns()
    try:
        net.up()
        yield net
    finally:
        net.down()


def in_ns_get(net: Netns, url: str) -> dict:
    out = subprocess.run(
        ["ip", "netns", "exec", net.gw, sys.executable, "-c",
         f"import httpx,json;print(json.dumps(httpx.get({url!r},timeout=2).json()))"],
        capture_output=True, text=True, timeout=10,
    )  # fmt: skip
    return json.loads(out.stdout) if out.returncode == 0 else {}


def served_by_both(net: Netns) -> bool:
    """Both backends have answered requests through the gateway (its /metrics says)."""
    out = subprocess.run(
        ["ip", "netns", "exec", net.gw, sys.executable, "-c",
         "import httpx;print(httpx.get('http://127.0.0.1:8000/metrics',timeout=2).text)"],
        capture_output=True, text=True, timeout=20,
    )  # fmt: skip
    served = {
        name for name in ("b1", "b2")
        if any(line.startswith("tensorforge_gateway_requests_total") and f'backend="{name}"' in line
               and 'status="200"' in line for line in out.stdout.splitlines())
    }  # fmt: skip
    return served == {"b1", "b2"}


def test_partition_loses_no_request_and_routes_away(netns, tmp_path):
    for ns, (_, _, n) in netns.links.items():
        netns.run(ns, sys.executable, "-m", "tests.fakes.openai_upstream",
                  "--host", f"10.203.{n}.2", "--port", "9000", "--name", ns)  # fmt: skip
    config = {
        "models": {"m": {"source": "hf:fake/m"}},
        "backends": {
            "b1": {"kind": "vllm", "model": "m", "port": 9000, "url": "http://10.203.1.2:9000"},
            "b2": {"kind": "vllm", "model": "m", "port": 9000, "url": "http://10.203.2.2:9000"},
        },
        "gateway": {"port": 8000, "health_interval": 0.5, "connect_timeout": 0.5,
                    "idle_timeout": 5.0, "first_byte_timeout": 5.0,
                    "routing": {"strategy": "round-robin"}},
    }  # fmt: skip
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump(config))
    netns.run(netns.gw, sys.executable, "-m", "reconciler.cli", "gateway", "--config", str(path),
              stdout=(tmp_path / "gw.log").open("wb"), stderr=subprocess.STDOUT)  # fmt: skip
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        health = in_ns_get(netns, "http://127.0.0.1:8000/health")
        if health.get("backends_healthy") == 2:
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"gateway never saw both backends: {(tmp_path / 'gw.log').read_text()[-2000:]}")

    # 10 s: the cut comes once the load runs on both, it is seen within 5 s (or the test fails),
    # and the rest of the run shows where requests go afterwards (asserted below).
    load = netns.run(netns.gw, sys.executable, "-m", "tests.fakes.load_client",
                     "http://127.0.0.1:8000", "--duration", "10", "--concurrency", "4",
                     stdout=subprocess.PIPE, text=True)  # fmt: skip
    # Cut once the load runs on both (on busy cores the load client takes seconds to start).
    deadline = time.monotonic() + 30
    while served_by_both(netns) is False and time.monotonic() < deadline:
        time.sleep(0.2)
    cut_at = time.monotonic()
    netns.cut(netns.b1)
    unhealthy_after = None
    while time.monotonic() < cut_at + 5:
        health = in_ns_get(netns, "http://127.0.0.1:8000/health")
        if health and not health["backends"]["b1"]["healthy"]:
            unhealthy_after = time.monotonic() - cut_at
            break
        time.sleep(0.1)
    out, _ = load.communicate(timeout=60)
    records = [json.loads(line) for line in out.splitlines()]
    failed = [r for r in records if r["status"] != 200]
    assert len(records) > 20, "the load run was too small to mean anything"
    assert failed == [], [(r["status"], r.get("body")) for r in failed[:5]]
    # What must hold: the partitioned backend is seen down and routed away from. How fast (about
    # 1.5 s: a 0.5 s interval plus a probe timeout bounded by it) is a figure for the docs, not
    # an assertion: on two busy cores it took 2.28 s (issue 14).
    assert unhealthy_after is not None, "the gateway never saw the partitioned backend down"
    print(
        f"\npartition: b1 seen unhealthy after {unhealthy_after:.2f}s; {len(records)} requests, none failed"
    )
    # `t` is when a request started, on the system-wide monotonic clock (load_client.py).
    seen_down = cut_at + unhealthy_after
    after = [r for r in records if r["t"] > seen_down + 0.5]
    assert after, "no request started after the partition was seen: nothing shows routing away"
    late = [r for r in after if r["backend"] == "b1"]
    assert late == [], late[:5]
    both = {r["backend"] for r in records if r["t"] < cut_at}
    assert both == {"b1", "b2"}
