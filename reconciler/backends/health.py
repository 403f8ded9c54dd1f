"""Backend health over HTTP, per protocol.

llama.cpp answers /health 503 while loading and 200 when ready; vLLM refuses connections until
its engine is up, then /health is 200; TGI /health is 200 when it can serve; Ollama answers
`HEAD /` with 200 ("Ollama is running"); a generic OpenAI server is alive if /v1/models is 200."""

from __future__ import annotations

import enum
from dataclasses import dataclass

import httpx

PROBES: dict[str, tuple[str, str]] = {
    "llamacpp": ("GET", "/health"),
    "vllm": ("GET", "/health"),
    "tgi": ("GET", "/health"),
    "ollama": ("HEAD", "/"),
    "openai": ("GET", "/v1/models"),
    "gateway": ("GET", "/health"),  # our own gateway, probed by the reconciler
}


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


def classify(protocol: str, status_code: int) -> BackendHealth:
    if status_code == 200:
        return BackendHealth(Health.HEALTHY)
    if status_code == 503 and protocol == "llamacpp":
        return BackendHealth(Health.LOADING, "loading model")
    return BackendHealth(Health.UNHEALTHY, f"health check answered {status_code}")


def _failure(exc: Exception) -> BackendHealth:
    if isinstance(exc, httpx.ConnectError):
        return BackendHealth(Health.DOWN, "connection refused")
    return BackendHealth(Health.DOWN, f"{type(exc).__name__}: {exc}"[:200])


def probe(
    base_url: str, protocol: str, timeout: float = 2.0, headers: dict[str, str] | None = None
) -> BackendHealth:
    method, path = PROBES[protocol]
    try:
        response = httpx.request(method, base_url + path, timeout=timeout, headers=headers)
    except (httpx.HTTPError, httpx.InvalidURL) as exc:  # InvalidURL is no HTTPError
        return _failure(exc)
    return classify(protocol, response.status_code)


async def aprobe(
    client: httpx.AsyncClient, base_url: str, protocol: str, timeout: float = 2.0,
    headers: dict[str, str] | None = None,
) -> BackendHealth:
    method, path = PROBES[protocol]
    try:
        response = await client.request(method, base_url + path, timeout=timeout, headers=headers)
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        return _failure(exc)
    return classify(protocol, response.status_code)
