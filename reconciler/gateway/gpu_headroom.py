"""VRAM headroom from NVML, per backend, for least-load scoring.

Each round the gateway reads this host's GPUs (NVML) and where the reconciler placed each
backend (its status file, plus pinned `gpu_ids`), and gives every backend the free fraction of
its fullest GPU. Backends elsewhere, and hosts without a GPU or a driver, get none: the score
then rests on in-flight requests and the backend's own metrics.

vLLM and llama.cpp allocate their KV cache up front, so the free memory on their GPUs barely
moves with load (their KV-cache usage, scraped in load.py, is the finer signal there). What this
catches is the GPU that is nearly full: an Ollama server loading another model next to its
first, or a neighbour process eating the memory a backend will need for its next batch."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable

from reconciler.gateway.router import Upstream
from reconciler.gpu.inventory import GpuInventory

log = logging.getLogger(__name__)

Placement = Callable[[], dict[int, list[str]]]  # GPU index -> backend names placed on it


def free_fractions(inventory: GpuInventory, placement: Placement) -> dict[str, float]:
    """Backend name -> free fraction (0..1) of the fullest GPU it is placed on."""
    gpus = {g.index: g for g in inventory.gpus()}
    if not gpus:
        return {}
    fractions: dict[str, float] = {}
    for index, names in placement().items():
        gpu = gpus.get(index)
        if gpu is None or gpu.memory_total <= 0:
            continue
        free = max(0.0, min(1.0, gpu.memory_free / gpu.memory_total))
        for name in names:
            fractions[name] = min(fractions.get(name, 1.0), free)
    return fractions


class GpuHeadroom:
    def __init__(self, inventory: GpuInventory, placement: Placement, interval: float,
                 upstreams: Callable[[], Iterable[Upstream]]):  # fmt: skip
        self.inventory = inventory
        self.placement = placement
        self.interval = interval
        self.upstreams = upstreams

    def refresh(self) -> None:
        fractions = free_fractions(self.inventory, self.placement)
        for upstream in self.upstreams():
            upstream.gpu_free = fractions.get(upstream.name)

    async def run(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self.refresh)  # NVML calls block (briefly)
            except Exception:  # a broken status file or driver must not stop routing
                log.exception("GPU headroom round failed")
            await asyncio.sleep(self.interval)
