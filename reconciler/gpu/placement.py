"""Assign GPU indices to backends: best fit by estimated VRAM against free memory.

Pure: takes the inventory and the estimates, returns assignments and one-line refusals."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from reconciler.config.schema import BackendSpec
from reconciler.gpu.inventory import GpuInfo

GiB = 1024**3


@dataclass(frozen=True)
class Placement:
    assignments: dict[str, list[int]] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)


def _gib(n: int) -> str:
    return f"{n / GiB:.1f} GiB"


def place(
    backends: Mapping[str, BackendSpec],
    gpus: list[GpuInfo],
    estimates: Mapping[str, int] | None = None,
    running: Mapping[str, list[int]] | None = None,
) -> Placement:
    """Largest requests first; each takes the GPUs with the least free memory that still fit
    (best fit), so big holes stay open for big models.

    `running`: the GPUs each running backend was started on. The free memory the inventory
    reports already excludes what they hold, so their estimates are credited back to those
    GPUs, and each keeps its GPUs while it still fits there: moving one is a restart."""
    estimates = estimates or {}
    running = running or {}
    free = {g.index: g.memory_free for g in gpus}
    total = {g.index: g.memory_total for g in gpus}
    assignments: dict[str, list[int]] = {}
    refused: dict[str, str] = {}
    wanting = [n for n, b in backends.items() if b.managed and b.gpus_wanted > 0]
    order = sorted(wanting, key=lambda n: (-backends[n].gpus_wanted, -estimates.get(n, 0), n))
    for name, held in running.items():
        if name in wanting and held:
            share = -(-estimates.get(name, 0) // len(held))
            for i in held:
                if i in free:  # never more than the card has: the estimate is only an estimate
                    free[i] = min(free[i] + share, total[i])
    # Running backends first: each stays where it runs while it fits there (and is pinned there).
    for name in order:
        backend = backends[name]
        held = running.get(name) or []
        per_gpu = -(-estimates.get(name, 0) // backend.gpus_wanted)
        same_pins = backend.gpu_ids is None or list(backend.gpu_ids) == held
        fits = all(free.get(i, -1) >= per_gpu for i in held)
        if held and len(held) == backend.gpus_wanted and same_pins and fits:
            assignments[name] = list(held)
            for i in held:
                free[i] -= per_gpu
    for name in order:
        if name in assignments:
            continue  # kept where it runs
        backend = backends[name]
        count = backend.gpus_wanted
        per_gpu = -(-estimates.get(name, 0) // count)  # ceil: each shard holds its part
        if not gpus:
            refused[name] = f"needs {count} GPU(s); this host has none"
            continue
        if backend.gpu_ids is not None:
            missing = [i for i in backend.gpu_ids if i not in free]
            short = [i for i in backend.gpu_ids if i in free and free[i] < per_gpu]
            if missing:
                refused[name] = f"gpu_ids {missing} do not exist (host has {sorted(free)})"
            elif short:
                i = short[0]
                refused[name] = f"GPU {i}: needs {_gib(per_gpu)}, {_gib(free[i])} free"
            else:
                assignments[name] = list(backend.gpu_ids)
                for i in backend.gpu_ids:
                    free[i] -= per_gpu
            continue
        fitting = sorted((f, i) for i, f in free.items() if f >= per_gpu)
        if len(fitting) < count:
            best = max(free, key=lambda i: free[i])
            refused[name] = (
                f"GPU {best} (the most free) has {_gib(free[best])} free, needs "
                f"{_gib(per_gpu)}; {len(fitting)} of the {count} GPU(s) wanted fit"
            )
            continue
        chosen = sorted(i for _, i in fitting[:count])
        assignments[name] = chosen
        for i in chosen:
            free[i] -= per_gpu
    return Placement(assignments, refused)
