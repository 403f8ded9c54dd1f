"""llama.cpp's `llama-server`: OpenAI's API natively, so requests and answers pass through
byte for byte. Load comes from its `--metrics` endpoint (series in backends/kinds/llamacpp.py)."""

from __future__ import annotations

from reconciler.gateway.adapters.base import Exchange, UnsupportedValue, UpstreamRequest
from reconciler.gateway.adapters.openai import OpenAIAdapter


class LlamaCppAdapter(OpenAIAdapter):
    protocol = "llamacpp"
    rewrite_model = False  # llama-server serves one model and ignores the name

    def build_request(self, exchange: Exchange, raw: bytes, served_model: str) -> UpstreamRequest:
        body = exchange.body
        n = body.get("n", 1)
        several = isinstance(n, int) and n > 1
        if exchange.endpoint == "/v1/completions" and several and _empty(body.get("prompt")):
            # Measured on llama.cpp (xllamacpp 2026.10): the request never answers and holds a
            # slot until its connection closes; three of them used to open the circuit.
            raise UnsupportedValue(
                "n: llama.cpp cannot give several choices for an empty prompt (it never answers); "
                "send n: 1, or a non-empty prompt",
                param="n",
            )
        return super().build_request(exchange, raw, served_model)


def _empty(prompt: object) -> bool:
    """An empty prompt in any of the shapes /v1/completions takes: "", [], [""], [[]]."""
    if prompt is None or prompt == "" or prompt == []:
        return True
    if isinstance(prompt, list):
        return all(p == "" or p == [] for p in prompt)
    return False
