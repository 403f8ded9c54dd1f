"""Assign GPU indices to backends: best fit by estimated VRAM against free memory.

Pure: takes the inventory and the estimates, returns assignments and one-line refusals."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

from reconciler.config.schema import BackendSpec
from reconciler.gpu.inventory import GpuInfo
from reconciler.gpu.vram import VramEstimate

GiB = 1024**3


@dataclass(frozen=True)
class Placement:
    assignments: dict[str, list[int]] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)


def _gib(n: int) -> str:
    return f"{n / GiB:.1f} GiB"


def _estimate(value: int | VramEstimate | None) -> VramEstimate:
    """Bytes in total (split evenly over the GPUs) or a full estimate (vLLM: a share per GPU)."""
    if isinstance(value, VramEstimate):
        return value
    return VramEstimate(reserved=int(value or 0))


def place(
    backends: Mapping[str, BackendSpec],
    gpus: list[GpuInfo],
    estimates: Mapping[str, int | VramEstimate] | None = None,
    running: Mapping[str, list[int]] | None = None,
    unreadable: Collection[int] = (),
) -> Placement:
    """Largest requests first; each takes the GPUs with the least memory left over that still
    fit (best fit), so big holes stay open for big models.

    `running`: the GPUs each running backend was started on. The free memory the inventory
    reports already excludes what they hold, so their estimates are credited back to those
    GPUs, and each keeps its GPUs while it still fits there: moving one is a restart.

    `unreadable`: GPUs that exist but NVML could not read this pass. A backend running on one
    stays where it is (a monitoring failure is no reason to move or stop it); nothing new is
    placed there."""
    vram = {n: _estimate(e) for n, e in (estimates or {}).items()}
    none = VramEstimate()
    running = running or {}
    unreadable = set(unreadable)
    free = {g.index: g.memory_free for g in gpus}
    total = {g.index: g.memory_total for g in gpus}
    assignments: dict[str, list[int]] = {}
    refused: dict[str, str] = {}
    wanting = [n for n, b in backends.items() if b.managed and b.gpus_wanted > 0]
    order = sorted(wanting, key=lambda n: (-backends[n].gpus_wanted, -vram.get(n, none).total, n))

    def need(name: str, i: int, count: int) -> int | None:
        """Bytes `name` needs free on GPU i; None if it cannot run on that GPU at all."""
        return vram.get(name, none).on_gpu(total[i], count)

    for name, held in running.items():
        if name in wanting and held:
            for i in held:
                if i in free:  # never more than the card has: the estimate is only an estimate
                    holds = need(name, i, len(held))
                    holds = vram.get(name, none).per_gpu(len(held)) if holds is None else holds
                    free[i] = min(free[i] + holds, total[i])
    # Running backends first: each stays where it runs while it fits there (and is pinned there).
    for name in order:
        backend = backends[name]
        held = running.get(name) or []
        same_pins = backend.gpu_ids is None or list(backend.gpu_ids) == held
        if not (held and len(held) == backend.gpus_wanted and same_pins):
            continue
        if any(i in unreadable for i in held):
            assignments[name] = list(held)  # what it holds there is unknown: leave it be
            for i in held:
                if i in free:
                    free[i] -= need(name, i, len(held)) or 0
            continue
        needs = {i: need(name, i, len(held)) if i in free else None for i in held}
        if all(n is not None and free[i] >= n for i, n in needs.items()):
            assignments[name] = list(held)
            for i, n in needs.items():
                free[i] -= n or 0
    for name in order:
        if name in assignments:
            continue  # kept where it runs
        backend = backends[name]
        count = backend.gpus_wanted
        estimate = vram.get(name, none)
        if not gpus:
            refused[name] = f"needs {count} GPU(s); " + (
                "no GPU could be read this pass" if unreadable else "this host has none"
            )
            continue
        if backend.gpu_ids is not None:
            missing = [i for i in backend.gpu_ids if i not in free]
            if missing and set(missing) <= unreadable:
                refused[name] = f"gpu_ids {missing} could not be read this pass"
                continue
            if missing:
                refused[name] = f"gpu_ids {missing} do not exist (host has {sorted(free)})"
                continue
            needs = {i: need(name, i, count) for i in backend.gpu_ids}
            short = [i for i, n in needs.items() if n is None or free[i] < n]
            if short:
                refused[name] = _short(short[0], estimate, count, free, total)
            else:
                assignments[name] = list(backend.gpu_ids)
                for i, n in needs.items():
                    free[i] -= n or 0
            continue
        fitting = []
        for i in free:
            n = need(name, i, count)
            if n is not None and free[i] >= n and i not in unreadable:
                fitting.append((free[i] - n, i, n))
        fitting.sort()
        if len(fitting) < count:
            best = max(free, key=lambda i: free[i])
            refused[name] = (
                f"{_short(best, estimate, count, free, total, most=True)}; "
                f"{len(fitting)} of the {count} GPU(s) wanted fit"
            )
            continue
        chosen = sorted(fitting[:count], key=lambda f: f[1])
        assignments[name] = [i for _, i, _ in chosen]
        for _, i, n in chosen:
            free[i] -= n
    return Placement(assignments, refused)


def _short(
    i: int,
    estimate: VramEstimate,
    count: int,
    free: Mapping[int, int],
    total: Mapping[int, int],
    most: bool = False,
) -> str:
    """Why GPU i does not take the backend, with the numbers."""
    where = f"GPU {i} (the most free)" if most else f"GPU {i}"
    n = estimate.on_gpu(total[i], count)
    if n is None:  # vLLM: its share of this card is smaller than what it needs
        share = int(estimate.gpu_fraction * total[i])
        return (
            f"{where} is too small: needs {_gib(estimate.per_gpu(count))}, "
            f"{estimate.gpu_fraction:.0%} of its {_gib(total[i])} is {_gib(share)}"
        )
    if most:
        return f"{where} has {_gib(free[i])} free, needs {_gib(n)}"
    return f"{where}: needs {_gib(n)}, {_gib(free[i])} free"
