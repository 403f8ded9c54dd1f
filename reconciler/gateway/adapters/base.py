"""The interface every protocol adapter implements."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass


@dataclass(frozen=True)
class UpstreamRequest:
    method: str
    path: str
    content: bytes
    headers: dict[str, str]


class Adapter:
    """Default behaviour: the backend speaks OpenAI's API; pass everything through."""

    protocol = "openai"

    def build_request(
        self, endpoint: str, body: dict, raw: bytes, served_model: str
    ) -> UpstreamRequest:
        return UpstreamRequest("POST", endpoint, raw, {"content-type": "application/json"})

    def convert_response(self, endpoint: str, content: bytes, requested_model: str) -> bytes:
        return content

    async def convert_stream(
        self, endpoint: str, chunks: AsyncIterator[bytes], requested_model: str
    ) -> AsyncIterator[bytes]:
        async for chunk in chunks:
            yield chunk
