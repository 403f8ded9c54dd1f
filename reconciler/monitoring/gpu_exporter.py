"""The GPU exporter: per GPU (index, uuid, name) memory, utilisation, temperature and power,
each series labelled with the backend(s) placed on it, plus the GPU count.

A host without a GPU (no driver, no NVML) exports `tensorforge_gpus 0` and nothing else: no
GPU is a normal answer, not a scrape error. An NVML error (a GPU lost, a query refused) adds
`tensorforge_gpu_inventory_failed 1`: the GPUs it could not read are missing from the scrape. Which backend sits on which GPU comes from the
reconciler's `status.json` (what it actually placed) and from pinned `gpu_ids`."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from reconciler.config.schema import DesiredState
from reconciler.gpu.inventory import GpuInventory
from reconciler.monitoring.exposition import MetricsServer

log = logging.getLogger(__name__)

GPU_LABELS = ["index", "uuid", "name", "backend"]

# GPU index -> names of the backends placed on it.
PlacementSource = Callable[[], Mapping[int, list[str]]]


class GpuCollector(Collector):
    def __init__(self, inventory: GpuInventory, placement: PlacementSource | None = None):
        self.inventory = inventory
        self.placement = placement or dict

    def collect(self) -> Iterator[GaugeMetricFamily]:
        gpus = self.inventory.gpus()
        try:
            placed = self.placement()
        except Exception as exc:  # labels are a nicety; the numbers must still be exported
            log.warning("cannot read GPU placement: %s", exc)
            placed = {}
        yield GaugeMetricFamily(
            "tensorforge_gpus",
            "GPUs NVML reports on this host (0 without a GPU or driver).",
            value=len(gpus),
        )
        if self.inventory.failed:  # only then: a count that dropped is otherwise silent
            yield GaugeMetricFamily(
                "tensorforge_gpu_inventory_failed",
                "1 when NVML erred on this read: GPUs it could not read are missing.",
                value=1,
            )
        families = {
            "used": GaugeMetricFamily(
                "tensorforge_gpu_memory_used_bytes", "GPU memory in use.", labels=GPU_LABELS
            ),
            "total": GaugeMetricFamily(
                "tensorforge_gpu_memory_total_bytes", "GPU memory installed.", labels=GPU_LABELS
            ),
            "util": GaugeMetricFamily(
                "tensorforge_gpu_utilization_ratio",
                "Fraction of the last sample period the GPU was busy (0-1).",
                labels=GPU_LABELS,
            ),
            "temp": GaugeMetricFamily(
                "tensorforge_gpu_temperature_celsius", "GPU core temperature.", labels=GPU_LABELS
            ),
            "power": GaugeMetricFamily(
                "tensorforge_gpu_power_watts", "GPU power draw.", labels=GPU_LABELS
            ),
        }
        for gpu in gpus:
            labels = [
                str(gpu.index),
                gpu.uuid,
                gpu.name,
                ",".join(sorted(placed.get(gpu.index, []))),
            ]
            families["used"].add_metric(labels, gpu.memory_used)
            families["total"].add_metric(labels, gpu.memory_total)
            # A sensor this GPU lacks is left out, not reported as 0.
            if gpu.utilization is not None:
                families["util"].add_metric(labels, gpu.utilization / 100.0)
            if gpu.temperature is not None:
                families["temp"].add_metric(labels, gpu.temperature)
            if gpu.power_watts is not None:
                families["power"].add_metric(labels, gpu.power_watts)
        yield from families.values()


def placement_from_state(state: DesiredState, status_file: Path | None) -> PlacementSource:
    """What the reconciler placed (its status file) merged with pinned `gpu_ids`."""

    def read() -> dict[int, list[str]]:
        placed: dict[int, set[str]] = {}
        for name, backend in state.backends.items():
            for index in backend.gpu_ids or []:
                placed.setdefault(index, set()).add(name)
        try:
            status = json.loads(status_file.read_text()) if status_file is not None else {}
        except (OSError, ValueError):
            # Not written yet, mid-rewrite, or not readable by this user (another DynamicUser):
            # label from pinned gpu_ids alone rather than fail the scrape.
            status = {}
        if isinstance(status, dict):
            for unit in status.get("units", []):
                name = unit.get("unit", "").removeprefix("backend-")
                for index in unit.get("gpus") or []:
                    placed.setdefault(int(index), set()).add(name)
        return {index: sorted(names) for index, names in placed.items()}

    return read


def gpu_registry(
    inventory: GpuInventory, placement: PlacementSource | None = None
) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(GpuCollector(inventory, placement))
    return registry


def serve(
    inventory: GpuInventory,
    placement: PlacementSource | None,
    host: str,
    port: int,
    stop: threading.Event,
) -> None:
    """Serve until `stop` is set (the CLI sets it on SIGTERM/SIGINT)."""
    server = MetricsServer(gpu_registry(inventory, placement), host, port)
    count = len(inventory.gpus())
    detail = f"{count} GPU(s)" if count else f"no GPU ({inventory.reason or 'none found'})"
    if count and inventory.failed:
        detail += f" ({inventory.reason})"
    log.info("GPU exporter on %s: %s", server.url, detail)
    try:
        stop.wait()
    finally:
        server.close()
