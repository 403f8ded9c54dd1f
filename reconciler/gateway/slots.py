"""After the gateway cancels a request at a llama.cpp backend (its deadline passed), make
sure no slot stays busy for nobody.

Closing the connection is how a request is cancelled: llama-server notices it at a streamed
request's next token, but a whole-answer request's only after a second in which no task
result arrived, and every /metrics or /slots query is a task: scraped every 0.5 s, a cancelled
request ran to its last token (measured on xllamacpp 2026.10). So after a cancel the backend
is left quiet (no scrapes, `Upstream.quiet_until`) for SETTLE_SECONDS before each look. A slot that stays busy with no request of ours open (a wedged
generation, as `"prompt": "", "n": 2` once was) holds a share of the context forever. Then
the slot is erased (`POST /slots/{id}?action=erase`, where the server supports it), else the
backend is taken out of routing and reported as wedged in /health for the reconciler to
restart; it comes back once its slots are free (a restarted process has none busy)."""

from __future__ import annotations

import asyncio
import logging
import time

import httpx

from reconciler.gateway.router import Upstream

log = logging.getLogger(__name__)
SETTLE_SECONDS = 2.5  # quiet time for llama.cpp to see the closed connection (above)
CHECKS = 4  # settles to wait while our own requests there still run
RECHECK_SECONDS = 2.0  # while wedged, how often to look whether the slots came free


class SlotWatch:
    def __init__(self, client: httpx.AsyncClient, settle: float = SETTLE_SECONDS):
        self.client = client
        self.settle = settle
        self._checking: dict[str, asyncio.Task[None]] = {}

    def after_cancel(self, upstream: Upstream) -> None:
        """Schedule a check of `upstream`'s slots (one at a time per backend)."""
        if upstream.protocol != "llamacpp" or upstream.name in self._checking:
            return
        task = asyncio.get_running_loop().create_task(self.check(upstream))
        self._checking[upstream.name] = task
        task.add_done_callback(lambda _: self._checking.pop(upstream.name, None))

    async def close(self) -> None:
        for task in list(self._checking.values()):
            task.cancel()
        await asyncio.gather(*self._checking.values(), return_exceptions=True)

    async def check(self, upstream: Upstream) -> None:
        for _ in range(CHECKS):
            await self._quiet(upstream)
            busy = await self.busy_slots(upstream)
            if busy is None or len(busy) <= upstream.in_flight:
                return  # no /slots to read, or every busy slot is one of our requests
            if upstream.in_flight == 0:  # all of them are orphans: nothing of ours is cut
                break
        else:
            return  # ours kept running the whole time; the next cancel checks again
        erased = [slot for slot in busy if await self.erase(upstream, slot)]
        if erased:
            await self._quiet(upstream)
            busy = await self.busy_slots(upstream) or []
            if not busy:
                log.warning(
                    "backend %s: erased slot(s) %s left busy by a cancelled request",
                    upstream.name,
                    erased,
                )
                return
        upstream.wedged = (
            f"wedged: llama.cpp slot(s) {', '.join(map(str, busy))} stay busy with no request open "
            "(a cancelled request did not end); restart the backend (slot erase needs llama-server "
            "--slot-save-path)"
        )
        log.error("backend %s is %s", upstream.name, upstream.wedged)
        while upstream.wedged is not None:  # until restarted (or the slot ends after all)
            await asyncio.sleep(RECHECK_SECONDS)
            busy = await self.busy_slots(upstream)
            if busy is not None and len(busy) <= upstream.in_flight:
                log.info("backend %s: its slots are free again; routing to it", upstream.name)
                upstream.wedged = None

    async def _quiet(self, upstream: Upstream) -> None:
        upstream.quiet_until = time.monotonic() + self.settle
        await asyncio.sleep(self.settle)

    async def busy_slots(self, upstream: Upstream) -> list[int] | None:
        """Ids of the slots processing a task; None when the backend does not say."""
        try:
            response = await self.client.get(
                upstream.base_url + "/slots", headers=upstream.headers, timeout=2.0
            )
            if response.status_code != 200:
                return None
            slots = response.json()
        except (httpx.HTTPError, ValueError):
            return None
        if not isinstance(slots, list):
            return None
        return [
            s.get("id", i)
            for i, s in enumerate(slots)
            if isinstance(s, dict) and s.get("is_processing")
        ]

    async def erase(self, upstream: Upstream, slot: int) -> bool:
        try:
            response = await self.client.post(
                f"{upstream.base_url}/slots/{slot}",
                params={"action": "erase"},
                headers=upstream.headers,
                timeout=2.0,
            )
        except httpx.HTTPError:
            return False
        return response.status_code == 200
