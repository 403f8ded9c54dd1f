"""What a backend's answer may make the gateway hold, enforced above the transport so that
every transport (the lean one for http, httpx-aiohttp's for https) is held to it alike:

- a whole answer (non-streamed) is read up to MAX_ANSWER_BYTES, then refused (a 502);
- a stream is never read ahead: the proxy pulls one chunk when the client took the last
  (each transport stops reading its socket while its buffer is full, so TCP slows the
  backend down), and an event that never ends is refused after sse.MAX_EVENT_BYTES."""

from __future__ import annotations

import httpx

MAX_ANSWER_BYTES = 64 * 1024 * 1024


async def read_whole(response: httpx.Response, limit: int | None = None) -> bytes:
    """The answer's (decoded) body, or RemoteProtocolError past `limit` bytes (by default
    MAX_ANSWER_BYTES, read at each call); the caller closes the response either way."""
    limit = MAX_ANSWER_BYTES if limit is None else limit
    declared = response.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise httpx.RemoteProtocolError(
            f"backend answer larger than {limit} bytes", request=response.request
        )
    parts: list[bytes] = []
    size = 0
    async for part in response.aiter_bytes():
        size += len(part)
        if size > limit:
            raise httpx.RemoteProtocolError(
                f"backend answer larger than {limit} bytes", request=response.request
            )
        parts.append(part)
    return parts[0] if len(parts) == 1 else b"".join(parts)
