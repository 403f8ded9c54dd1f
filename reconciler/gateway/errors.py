"""Errors in OpenAI's shape: {"error": {"message", "type", "code"}}, never a traceback."""

from __future__ import annotations

import json

from starlette.responses import JSONResponse

STATUS_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "timeout_error",
}


def error_body(message: str, status: int, code: str | None = None) -> dict:
    return {
        "error": {
            "message": message,
            "type": STATUS_TYPES.get(status, "api_error"),
            "param": None,
            "code": code,
        }
    }


def error_response(
    status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(error_body(message, status, code), status_code=status, headers=headers)


def sse_error_event(message: str, code: str = "upstream_error") -> bytes:
    """What a stream ends with when its backend fails after the first byte was sent."""
    return b"data: " + json.dumps(error_body(message, 502, code)).encode() + b"\n\n"
