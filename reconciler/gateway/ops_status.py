"""What the operations API reports: the documents behind /status, /vram, /backends and
/models, built from what the gateway sees live (routing table, health, load), the reconciler's
status file, the admin requests, the GPU inventory and the model registry. Read-only: nothing
here changes what runs."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from reconciler.admin_requests import AdminRequest, admin_requests_dir, read_requests
from reconciler.gateway.core import GatewayCore
from reconciler.gateway.router import Upstream
from reconciler.gpu.vram import estimate_vram
from reconciler.models.pull import local_path
from reconciler.models.registry import ModelRecord, Registry, open_database
from reconciler.paths import models_dir, state_dir

log = logging.getLogger(__name__)
MIB = 1024 * 1024


class OpsState:
    """What the operations documents read beside the core: the reconciler's status file, the
    admin requests it has not acted on yet, and VRAM estimates."""

    def __init__(self, core: GatewayCore):
        self.core = core
        self.status = ReconcilerStatus(core.status_file)
        self.requests_dir = admin_requests_dir(state_dir(core.state.state_dir))
        self.estimates = VramEstimates()

    def admin_requests(self) -> dict[str, AdminRequest]:
        return read_requests(self.requests_dir, self.core.state.backends)[0]


class ReconcilerStatus:
    """The reconciler's status file (written after every pass), re-read only when it changed."""

    def __init__(self, path: Path):
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._data: dict[str, Any] = {}
        self.error = ""

    def read(self) -> dict[str, Any]:
        try:
            stat = self.path.stat()
        except OSError:
            self._stamp, self._data, self.error = (
                None,
                {},
                f"{self.path} not written yet (is the reconciler running?)",
            )
            return self._data
        stamp = (stat.st_mtime_ns, stat.st_size)
        if stamp != self._stamp:
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
                self._data, self.error = (
                    (data, "") if isinstance(data, dict) else ({}, f"{self.path}: not an object")
                )
            except (OSError, ValueError) as exc:
                self._data, self.error = {}, f"{self.path}: {exc}"
            self._stamp = stamp
        return self._data

    def units(self) -> dict[str, dict[str, Any]]:
        return {u.get("unit", ""): u for u in self.read().get("units", []) if isinstance(u, dict)}


def reconciler_section(
    status: ReconcilerStatus, requests: dict[str, AdminRequest], problems: list[str]
) -> dict[str, Any]:
    """Last pass (time, result) and what is still pending, with why. The status file lists
    every unit with its health and the reason it is not there yet (a wait, a refusal, a
    failed start); a unit not healthy is pending."""
    data = status.read()
    updated = data.get("updated_at")
    pending = [
        {"unit": u.get("unit"), "state": u.get("health"), "reason": u.get("detail") or u.get("health")}
        for u in data.get("units", []) if isinstance(u, dict) and u.get("health") != "healthy"
    ]  # fmt: skip
    if not data:
        result = "unknown"
    elif isinstance(data.get("last_pass"), dict):  # a reconciler that records its pass result
        result = str(data["last_pass"].get("result", "unknown"))
    else:
        result = "pending" if pending else "converged"
    return {
        "status_file": str(status.path),
        "last_pass_at": updated,
        "age_seconds": round(time.time() - updated, 1)
        if isinstance(updated, int | float)
        else None,
        "result": result,
        "pending": pending,
        "gpus": data.get("gpus"),
        "admin_requests": [
            {
                "backend": r.backend,
                "action": r.action,
                "id": r.id,
                "requested_by": r.requested_by,
                "requested_at": r.requested_at,
            }
            for r in requests.values()
        ],  # fmt: skip
        "problems": ([status.error] if status.error else []) + problems,
    }


def backend_row(
    core: GatewayCore, upstream: Upstream, unit: dict[str, Any], request: AdminRequest | None
) -> dict[str, Any]:
    spec = core.state.backends.get(upstream.name)
    detail = upstream.health_detail
    last_error = None
    if not upstream.healthy:
        last_error = detail
    elif unit.get("health") not in (None, "healthy"):
        last_error = unit.get("detail")
    return {
        "name": upstream.name,
        "kind": spec.kind if spec else upstream.protocol,
        "model": upstream.model,
        "url": upstream.base_url,
        "protocol": upstream.protocol,
        "managed": bool(spec and spec.managed),
        "state": unit.get("health") or ("remote" if spec and not spec.managed else "unknown"),
        "health": {"healthy": upstream.healthy, "detail": detail},
        "draining": upstream.name in core.health.draining,
        "pid": unit.get("pid"),
        "unit": unit.get("unit"),
        "restarts": unit.get("restarts"),
        "gpus": unit.get("gpus") or (list(spec.gpu_ids) if spec and spec.gpu_ids else []),
        "in_flight": upstream.in_flight,
        "limit": upstream.limit,
        "queue": upstream.reported_load,
        "kv_cache_usage": upstream.kv_usage,
        "circuit": {
            "open": upstream.circuit_open,
            "consecutive_failures": upstream.consecutive_failures,
        },
        "warm": upstream.warm,
        "last_error": last_error,
        "admin_request": request.action if request else None,
    }


def backends_document(
    core: GatewayCore, status: ReconcilerStatus, requests: dict[str, AdminRequest]
) -> list[dict[str, Any]]:
    units = status.units()
    return [
        backend_row(core, u, units.get(f"backend-{u.name}", {}), requests.get(u.name))
        for u in sorted(core.upstreams(), key=lambda u: u.name)
    ]


def gateway_counters(core: GatewayCore) -> dict[str, Any]:
    """Totals since the gateway started, from its Prometheus registry (one source of truth)."""
    by_status: dict[str, float] = {}
    tokens: dict[str, float] = {}
    rejected: dict[str, float] = {}
    duration_sum = duration_count = 0.0
    for family in core.metrics.registry.collect():
        for sample in family.samples:
            if sample.name == "tensorforge_gateway_requests_total":
                status = sample.labels["status"]
                by_status[status] = by_status.get(status, 0) + sample.value
            elif sample.name == "tensorforge_gateway_tokens_total":
                tokens[sample.labels["type"]] = tokens.get(sample.labels["type"], 0) + sample.value
            elif sample.name == "tensorforge_gateway_rejected_total":
                rejected[sample.labels["reason"]] = sample.value
            elif sample.name == "tensorforge_gateway_request_duration_seconds_sum":
                duration_sum += sample.value
            elif sample.name == "tensorforge_gateway_request_duration_seconds_count":
                duration_count += sample.value
    return {
        "uptime_seconds": round(time.time() - core.started, 1),
        "requests_total": int(sum(by_status.values())),
        "requests_by_status": {k: int(v) for k, v in sorted(by_status.items())},
        "tokens": {k: int(v) for k, v in sorted(tokens.items())},
        "rejected": {k: int(v) for k, v in sorted(rejected.items())},
        "mean_latency_seconds": round(duration_sum / duration_count, 4) if duration_count else None,
    }


async def vram_document(core: GatewayCore, ops: OpsState) -> dict[str, Any]:
    """Per GPU from NVML with the backends placed on it, their estimated need and (where NVML
    lists their process) their measured memory. No GPU: `"gpus": []` and the reason."""
    inventory = core.gpu_headroom.inventory
    gpus = inventory.gpus()
    placed = core.local_placement() if gpus else {}
    names = {n for names in placed.values() for n in names}
    estimates = await ops.estimates.get(core, names) if names else {}
    rows = []
    for gpu in gpus:
        used_by = _process_memory(gpu.uuid)
        backends = []
        for name in placed.get(gpu.index, []):
            estimate = estimates.get(name)
            backends.append({"name": name, "estimated_mib": estimate,
                             "measured_mib": used_by.get(_pid_of(ops, name))})  # fmt: skip
        rows.append({
            "index": gpu.index, "name": gpu.name, "uuid": gpu.uuid,
            "memory_total_mib": gpu.memory_total // MIB, "memory_used_mib": gpu.memory_used // MIB,
            "memory_free_mib": gpu.memory_free // MIB, "utilization_percent": gpu.utilization,
            "temperature_c": gpu.temperature, "power_watts": gpu.power_watts, "backends": backends,
        })  # fmt: skip
    document: dict[str, Any] = {"gpus": rows}
    if not rows:
        document["reason"] = inventory.reason or "no GPU found"
    elif inventory.reason:
        document["problems"] = inventory.reason
    return document


class VramEstimates:
    """MiB each backend is estimated to need per GPU (reconciler/gpu/vram.py), computed on a
    thread (the first estimate of a model parses its GGUF: seconds for a large file) and
    kept until the backend's spec changes. Until it is known, /vram says null."""

    def __init__(self) -> None:
        self.known: dict[str, tuple[str, int | None]] = {}  # name -> (spec it was made for, MiB)
        self._work: asyncio.Task[Any] | None = None

    async def get(
        self, core: GatewayCore, names: set[str], wait: float = 1.0
    ) -> dict[str, int | None]:
        specs = {
            n: core.state.backends[n].model_dump_json() for n in names if n in core.state.backends
        }
        stale = {n for n, spec in specs.items() if self.known.get(n, ("", None))[0] != spec}
        if stale and (self._work is None or self._work.done()):
            self._work = asyncio.create_task(asyncio.to_thread(self._compute, core, stale, specs))
        if self._work is not None and not self._work.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._work), wait)
        return {
            n: self.known[n][1] for n in specs if n in self.known and self.known[n][0] == specs[n]
        }

    def _compute(self, core: GatewayCore, names: set[str], specs: dict[str, str]) -> None:
        directory = models_dir(core.state.models_dir, core.state.state_dir)
        for name in names:
            backend = core.state.backends[name]
            spec = core.state.models[backend.model]
            try:
                estimate = estimate_vram(backend, spec, local_path(backend.model, spec, directory))
                self.known[name] = (
                    specs[name],
                    estimate.per_gpu(max(1, backend.gpus_wanted)) // MIB,
                )
            except Exception as exc:  # an unreadable model file: report the rest
                log.info("no VRAM estimate for %s: %s", name, exc)
                self.known[name] = (specs[name], None)


def _pid_of(ops: OpsState, backend: str) -> int | None:
    return ops.status.units().get(f"backend-{backend}", {}).get("pid")


def _process_memory(uuid: str) -> dict[int | None, int]:
    """pid -> MiB for the compute processes NVML lists on one GPU ({} without NVML)."""
    try:
        import pynvml

        handle = pynvml.nvmlDeviceGetHandleByUUID(uuid)
        return {
            p.pid: (p.usedGpuMemory or 0) // MIB
            for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
        }
    except Exception:  # no NVML, or a GPU from a static inventory: measured stays unknown
        return {}


class ModelCatalog:
    """Registry rows (name, source, files with sha256 and size, format, GGUF details) joined
    with the desired state's models and which backends serve each. The registry is opened
    per call and never created here: a gateway does not own it."""

    def __init__(self, core: GatewayCore):
        self.core = core

    def _registry(self) -> tuple[Registry | None, str]:
        directory = models_dir(self.core.state.models_dir, self.core.state.state_dir)
        if not os.environ.get("TF_REGISTRY_URL") and not (directory / "registry.sqlite3").exists():
            return None, f"no model registry at {directory} (no model pulled yet)"
        try:
            return Registry(database=open_database(directory)), ""
        except Exception as exc:  # unreadable, or PostgreSQL down: show the declared models anyway
            return None, f"model registry unavailable: {exc}"

    def rows(self, only: str | None = None) -> tuple[list[dict[str, Any]], str]:
        state = self.core.state
        registry, problem = self._registry()
        rows = []
        for name, spec in sorted(state.models.items()):
            if only is not None and only != name:
                continue
            record = registry.get(name) if registry is not None else None
            rows.append(self._row(name, spec.source, spec.aliases, record))
        return rows, problem

    def _row(
        self, name: str, source: str, aliases: list[str], record: ModelRecord | None
    ) -> dict[str, Any]:
        upstreams = {u.name: u for u in self.core.upstreams()}
        serving = [
            {"backend": b, "healthy": upstreams[b].healthy if b in upstreams else False}
            for b, spec in sorted(self.core.state.backends.items()) if spec.model == name
        ]  # fmt: skip
        row: dict[str, Any] = {"name": name, "source": source, "aliases": aliases, "registered": record is not None,
                               "backends": serving}  # fmt: skip
        if record is not None:
            primary = record.files[0] if record.files else None
            row.update({
                "file": primary.path if primary else None, "sha256": primary.sha256 if primary else None,
                "size_bytes": record.size, "format": record.format, "revision": record.revision,
                "files": [{"path": f.path, "size_bytes": f.size, "sha256": f.sha256} for f in record.files],
                "gguf": {"architecture": record.architecture, "parameters": record.parameters,
                         "quantization": record.quantization, "context_length": record.context_length},
                "vram_estimate_bytes": record.vram_estimate_bytes, "pulled_at": record.pulled_at,
            })  # fmt: skip
        return row
