"""`tensorforge health`: GPUs, every backend's state, and a latency benchmark per backend.

The GPU table comes from NVML (no GPU is a normal answer, with the reason). Each declared
backend is probed directly with its protocol's health check, and the gateway says whether it
routes to it. The benchmark sends N streamed requests per model through the gateway, the way
clients see it, and groups the timings by the backend that answered (`x-tensorforge-backend`);
a llama.cpp server given by URL (LLAMACPP_URL) is measured directly."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import httpx

from reconciler.backends.health import probe
from reconciler.config.schema import DesiredState
from reconciler.gateway.router import backend_headers, served_name
from reconciler.gpu.inventory import GpuInventory
from reconciler.pipeline.run import ask

BENCH_PROMPT = "Count from one to twenty in words, separated by commas."


@dataclass(frozen=True)
class BackendState:
    name: str
    kind: str
    model: str
    url: str
    state: str  # healthy, loading, unhealthy, down
    detail: str = ""
    routed: bool | None = None  # the gateway's view; None when the gateway is unreachable


@dataclass(frozen=True)
class Benchmark:
    model: str
    backend: str
    requests: int
    errors: int
    ttft_s: dict[str, float | None]
    tokens_per_s: dict[str, float | None]
    total_s: dict[str, float | None]
    first_error: str | None = None


@dataclass
class HealthReport:
    gpus: list[dict] = field(default_factory=list)
    gpu_reason: str = ""
    gateway: dict = field(default_factory=dict)
    backends: list[BackendState] = field(default_factory=list)
    benchmarks: list[Benchmark] = field(default_factory=list)
    gateway_expected: bool = True  # declared with the gateway on: it must answer

    @property
    def problems(self) -> list[str]:
        """Why the host is not healthy; empty when it is."""
        found = [f"backend {b.name} is {b.state}" for b in self.backends if b.state != "healthy"]
        if self.gateway_expected and not self.gateway.get("reachable"):
            found.append(f"gateway {self.gateway.get('url')} unreachable (no benchmark through it)")
        found += [f"backend {b.name} is healthy but the gateway does not route to it"
                  for b in self.backends if b.state == "healthy" and b.routed is False]  # fmt: skip
        found += [f"{b.errors} of {b.requests} benchmark request(s) to {b.backend} failed"
                  for b in self.benchmarks if b.errors]  # fmt: skip
        return found

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {
            "ok": self.ok,
            "problems": self.problems,
            "gpus": self.gpus,
            "gpu_reason": self.gpu_reason,
            "gateway": self.gateway,
            "backends": [asdict(b) for b in self.backends],
            "benchmarks": [asdict(b) for b in self.benchmarks],
        }


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default); None without values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summary(values: list[float]) -> dict[str, float | None]:
    def rounded(v: float | None) -> float | None:
        return round(v, 4) if v is not None else None

    return {
        "p50": rounded(percentile(values, 0.50)),
        "p95": rounded(percentile(values, 0.95)),
        "mean": rounded(sum(values) / len(values)) if values else None,
    }


def gpu_rows(inventory: GpuInventory) -> tuple[list[dict], str]:
    rows = []
    for g in inventory.gpus():
        rows.append(
            {
                "index": g.index,
                "name": g.name,
                "memory_used_mib": g.memory_used // 2**20,
                "memory_total_mib": g.memory_total // 2**20,
                "utilization": g.utilization,
                "temperature": g.temperature,
                "power_watts": g.power_watts,
                "compute_capability": ".".join(map(str, g.compute_capability))
                if g.compute_capability
                else None,
            }
        )
    return rows, "" if rows else (inventory.reason or "no GPU")


def gateway_view(url: str, timeout: float = 2.0) -> dict:
    try:
        response = httpx.get(f"{url}/health", timeout=timeout)
        data = response.json()
        return {"url": url, "reachable": True, "backends": data.get("backends", {})}
    except (httpx.HTTPError, ValueError) as exc:
        return {"url": url, "reachable": False, "detail": f"{type(exc).__name__}: {exc}"[:200]}


def backend_states(state: DesiredState, gateway: dict, extra: dict[str, str]) -> list[BackendState]:
    """Every declared backend probed directly, plus `extra` (name -> llama.cpp URL)."""
    routed = gateway.get("backends", {}) if gateway.get("reachable") else None
    found = []
    targets = [(n, b.kind, b.model, b.base_url, b.wire_protocol) for n, b in state.backends.items()]
    declared = {t[3] for t in targets}
    targets += [
        (n, "llamacpp", "-", u.rstrip("/"), "llamacpp")
        for n, u in extra.items()
        if u.rstrip("/") not in declared  # already measured through the gateway
    ]
    for name, kind, model, url, protocol in targets:
        backend = state.backends.get(name)
        try:  # a backend behind a key is probed with it, as the gateway does
            headers = backend_headers(name, backend) if backend is not None else {}
        except ValueError as exc:
            found.append(BackendState(name, kind, model, url, "unhealthy", str(exc), None))
            continue
        served = (
            served_name(model, state.models[model].source, protocol)
            if backend is not None
            else None
        )
        health = probe(url, protocol, headers=headers, model=served)
        view = (
            None if routed is None or name in extra else bool(routed.get(name, {}).get("healthy"))
        )
        found.append(BackendState(name, kind, model, url, health.state.value, health.detail, view))
    return found


def benchmark(
    url: str,
    model: str,
    requests: int,
    concurrency: int,
    max_tokens: int,
    api_key: str | None = None,
    label: str | None = None,
    timeout: float = 300.0,
) -> list[Benchmark]:
    """`requests` streamed chat completions to `url`, timed; one result per answering backend."""
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    prompts = [BENCH_PROMPT] * requests
    with httpx.Client(timeout=timeout) as client, ThreadPoolExecutor(max(1, concurrency)) as pool:
        results = list(
            pool.map(lambda p: _timed(client, url, model, p, max_tokens, headers), prompts)
        )
    by_backend: dict[str, list[dict]] = {}
    for result in results:
        by_backend.setdefault(label or result.get("backend") or "?", []).append(result)
    out = []
    for backend, group in sorted(by_backend.items()):
        good = [r for r in group if not r["error"]]
        timings = [r["timings"] for r in good]
        out.append(
            Benchmark(
                model=model,
                backend=backend,
                requests=len(group),
                errors=len(group) - len(good),
                ttft_s=summary(
                    [t["time_to_first_token_s"] for t in timings if t["time_to_first_token_s"]]
                ),
                tokens_per_s=summary([t["tokens_per_s"] for t in timings if t["tokens_per_s"]]),
                total_s=summary([t["total_s"] for t in timings]),
                first_error=next((r["error"] for r in group if r["error"]), None),
            )
        )
    return out


def _timed(client, url, model, prompt, max_tokens, headers) -> dict:
    try:
        return ask(client, url, model, prompt, max_tokens, headers)
    except (httpx.HTTPError, ValueError) as exc:  # a dead backend is a result, not a crash
        return {"backend": None, "error": f"{type(exc).__name__}: {exc}"[:300], "timings": {}}


def collect(
    state: DesiredState,
    gateway_url: str,
    inventory: GpuInventory,
    requests: int = 5,
    concurrency: int = 1,
    max_tokens: int = 32,
    llamacpp_urls: dict[str, str] | None = None,
    api_key: str | None = None,
    gateway_expected: bool = True,
) -> HealthReport:
    report = HealthReport(gateway_expected=gateway_expected)
    report.gpus, report.gpu_reason = gpu_rows(inventory)
    report.gateway = gateway_view(gateway_url)
    extra = llamacpp_urls or {}
    report.backends = backend_states(state, report.gateway, extra)
    if requests <= 0:
        return report
    if report.gateway["reachable"]:
        served = sorted({b.model for b in state.backends.values()})
        for model in served:
            report.benchmarks += benchmark(
                gateway_url, model, requests, concurrency, max_tokens, api_key
            )
    for b in report.backends:
        if b.name in extra and b.state == "healthy":
            report.benchmarks += benchmark(
                b.url, "default", requests, concurrency, max_tokens, label=b.name
            )
    return report


def render(report: HealthReport) -> str:
    lines = []
    if report.gpus:
        lines.append(_table(
            ["GPU", "NAME", "MEM USED/TOTAL MiB", "UTIL %", "TEMP C", "POWER W", "CC"],
            [[g["index"], g["name"], f"{g['memory_used_mib']}/{g['memory_total_mib']}",
              g["utilization"], g["temperature"], g["power_watts"], g["compute_capability"]]
             for g in report.gpus],
        ))  # fmt: skip
    else:
        lines.append(f"GPUs: none ({report.gpu_reason})")
    gw = report.gateway
    lines.append(f"\ngateway {gw['url']}: " + ("reachable" if gw["reachable"] else gw["detail"]))
    if report.backends:
        lines.append(_table(
            ["BACKEND", "KIND", "MODEL", "URL", "STATE", "ROUTED", "DETAIL"],
            [[b.name, b.kind, b.model, b.url, b.state, "-" if b.routed is None else "yes" if b.routed else "no",
              b.detail] for b in report.backends],
        ))  # fmt: skip
    if report.benchmarks:
        lines.append(_table(
            ["MODEL", "BACKEND", "N", "ERR", "TTFT p50/p95 s", "TOK/S p50/p95", "TOTAL p50/p95 s"],
            [[b.model, b.backend, b.requests, b.errors, _pair(b.ttft_s), _pair(b.tokens_per_s),
              _pair(b.total_s)] for b in report.benchmarks],
        ))  # fmt: skip
        for b in report.benchmarks:
            if b.first_error:
                lines.append(f"  {b.backend}: {b.errors} error(s), first: {b.first_error}")
    lines.append("\nhealthy" if report.ok else "\nNOT healthy: " + "; ".join(report.problems))
    return "\n".join(lines)


def _pair(values: dict) -> str:
    return f"{_num(values['p50'])}/{_num(values['p95'])}"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def _table(header: list[str], rows: list[list]) -> str:
    cells = [header] + [["-" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n" + "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells
    )
