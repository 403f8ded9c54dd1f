"""What a probe found: a backend's health state and its detail. Pure, without httpx, so the
plan (and with it every CLI command) does not pay for the HTTP client it never uses;
reconciler/backends/health.py does the probing."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Health(enum.StrEnum):
    HEALTHY = "healthy"
    LOADING = "loading"
    UNHEALTHY = "unhealthy"
    DOWN = "down"


@dataclass(frozen=True)
class BackendHealth:
    state: Health
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.state is Health.HEALTHY
