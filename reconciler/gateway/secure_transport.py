"""httpx-aiohttp's transport (for https:// backends) held to the proxy's transport contract:
every failure is an httpx error. httpx-aiohttp passes aiohttp's ClientResponseError through
unmapped (aiohttp refusing a response head: too many headers, a line too long), which the
proxy took for its own bug (a 500) instead of the backend's failure (a 502, tried elsewhere)."""

from __future__ import annotations

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport


class SecureTransport(AiohttpTransport):
    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            return await super().handle_async_request(request)
        except aiohttp.ClientResponseError as exc:
            raise httpx.RemoteProtocolError(
                f"backend response refused: {exc.message or exc.status}", request=request
            ) from exc
