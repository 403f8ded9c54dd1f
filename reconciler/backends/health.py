"""Backend health over HTTP, per protocol: each kind declares its probe (reconciler/backends/
kinds/); a generic OpenAI server is alive if /v1/models is 200.

llama.cpp answers /health 503 while loading and 200 when ready; vLLM refuses connections until
its engine is up, then /health is 200; Ollama answers `HEAD /` with 200. vLLM answers 404 to
every request for a model name but its --served-model-name, so a vLLM that is up but serves
another name is unhealthy: its /v1/models (its kind's `model_list`) must list the declared one."""

from __future__ import annotations

import httpx

from reconciler.backends.backend_health import BackendHealth, Health
from reconciler.backends.registry import GENERIC_PROTOCOL, KINDS

PROBES: dict[str, tuple[str, str]] = {
    **{k.name: (k.probe.method, k.probe.path) for k in KINDS.values()},
    GENERIC_PROTOCOL: ("GET", "/v1/models"),
    "gateway": ("GET", "/health"),  # our own gateway, probed by the reconciler
}
# Where a protocol lists the model names it answers to, checked once the probe says 200.
MODEL_LISTS: dict[str, str] = {
    k.name: k.probe.model_list for k in KINDS.values() if k.probe.model_list
}
# The status a protocol answers while its model loads.
LOADING: dict[str, int] = {
    k.name: k.probe.loading_status for k in KINDS.values() if k.probe.loading_status is not None
}


def classify(protocol: str, status_code: int) -> BackendHealth:
    if status_code == 200:
        return BackendHealth(Health.HEALTHY)
    if status_code == LOADING.get(protocol):
        return BackendHealth(Health.LOADING, "loading model")
    return BackendHealth(Health.UNHEALTHY, f"health check answered {status_code}")


def _failure(exc: Exception) -> BackendHealth:
    if isinstance(exc, httpx.ConnectError):
        return BackendHealth(Health.DOWN, "connection refused")
    return BackendHealth(Health.DOWN, f"{type(exc).__name__}: {exc}"[:200])


def serves_model(document: object, model: str) -> BackendHealth:
    """Healthy if the model list (OpenAI's {"data": [{"id": …}]}) names `model`."""
    data = document.get("data") if isinstance(document, dict) else None
    ids = [m.get("id") for m in data if isinstance(m, dict)] if isinstance(data, list) else []
    if model in ids:
        return BackendHealth(Health.HEALTHY)
    return BackendHealth(
        Health.UNHEALTHY,
        f"serves {', '.join(map(str, ids)) or 'no model'} but not the declared {model!r} "
        f"(requests would get 404): start it with --served-model-name {model}",
    )


def _model_list(response: httpx.Response, protocol: str, model: str) -> BackendHealth:
    if response.status_code != 200:
        return BackendHealth(
            Health.UNHEALTHY, f"{MODEL_LISTS[protocol]} answered {response.status_code}"
        )
    try:
        document = response.json()
    except ValueError:
        return BackendHealth(Health.UNHEALTHY, f"{MODEL_LISTS[protocol]} is not JSON")
    return serves_model(document, model)


def probe(
    base_url: str,
    protocol: str,
    timeout: float = 2.0,
    headers: dict[str, str] | None = None,
    model: str | None = None,
) -> BackendHealth:
    """`model`: the name the backend must answer to, checked where the protocol lists them."""
    method, path = PROBES[protocol]
    try:
        response = httpx.request(method, base_url + path, timeout=timeout, headers=headers)
        health = classify(protocol, response.status_code)
        if not (health.ok and model and protocol in MODEL_LISTS):
            return health
        listed = httpx.get(base_url + MODEL_LISTS[protocol], timeout=timeout, headers=headers)
    except (httpx.HTTPError, httpx.InvalidURL) as exc:  # InvalidURL is no HTTPError
        return _failure(exc)
    return _model_list(listed, protocol, model)


async def aprobe(
    client: httpx.AsyncClient,
    base_url: str,
    protocol: str,
    timeout: float = 2.0,
    headers: dict[str, str] | None = None,
    model: str | None = None,
) -> BackendHealth:
    method, path = PROBES[protocol]
    try:
        response = await client.request(method, base_url + path, timeout=timeout, headers=headers)
        health = classify(protocol, response.status_code)
        if not (health.ok and model and protocol in MODEL_LISTS):
            return health
        listed = await client.get(
            base_url + MODEL_LISTS[protocol], timeout=timeout, headers=headers
        )
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        return _failure(exc)
    return _model_list(listed, protocol, model)
