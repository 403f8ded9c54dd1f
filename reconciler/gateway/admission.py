"""Admission: whether a request may come in at all (its API key, the key's concurrent
requests), before anything reads its body. Refusals are GatewayErrors, counted in the
metrics by code; each surface renders them in its own shape."""

from __future__ import annotations

from reconciler.gateway.auth import ApiKeys
from reconciler.gateway.limits import ConcurrencyLimiter
from reconciler.gateway.metrics import GatewayMetrics

MISSING_KEY = "missing or invalid API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"


class Admission:
    def __init__(self, keys: ApiKeys, limits: ConcurrencyLimiter, metrics: GatewayMetrics):
        self.keys = keys
        self.limits = limits
        self.metrics = metrics

    def identify(self, authorization: bytes | str | None) -> str | None:
        """The key's client identity (None when keys are off); raises 401 for a bad key."""
        if not self.keys.enabled:
            return None
        if isinstance(authorization, bytes):
            authorization = authorization.decode("latin-1")
        key = self.keys.identify(authorization)
        if key is None:
            raise self.metrics.refused(401, MISSING_KEY, "invalid_api_key")
        return key

    def hold(self, key: str | None) -> str | None:
        """Take one of the key's concurrent-request slots (release it with `release`);
        raises 429 when the key has all of them open."""
        if key is not None and not self.limits.try_acquire(key):
            raise self.metrics.refused(
                429, f"this API key already has {self.limits.limit} requests open; retry shortly",
                "key_concurrency_limit", retry_after="1",
            )  # fmt: skip
        return key

    def admit(self, authorization: bytes | str | None) -> str | None:
        """Identify and hold: the key identity to release later."""
        return self.hold(self.identify(authorization))

    def release(self, key: str | None) -> None:
        if key is not None:
            self.limits.release(key)
