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


def openai_error(content: bytes, status: int) -> bytes:
    """A backend's error answer (the client's fault: 4xx, or 501) with OpenAI's `error`
    object, keeping its message and extra fields (llama.cpp's n_prompt_tokens, n_ctx) and any
    top-level fields of its own shape (vLLM's flat {"object": "error", "message", "type"})."""
    try:
        body = json.loads(content)
    except ValueError:
        body = None
    if not isinstance(body, dict):
        body = {}
    error = body.get("error")
    if error is None and "message" in body:  # vLLM's flat shape
        error = body
    if isinstance(error, str):
        error = {"message": error}
    if not isinstance(error, dict):
        text = content.decode("utf-8", "replace").strip()[:500] or f"the backend answered {status}"
        error = {"message": text}
    shaped = error_body(str(error.get("message") or f"the backend answered {status}"), status)["error"]
    kind = error.get("type")
    code = error.get("code")
    shaped["type"] = kind if isinstance(kind, str) else shaped["type"]
    shaped["code"] = code if isinstance(code, str) else kind if isinstance(kind, str) else None
    shaped["param"] = error.get("param") if isinstance(error.get("param"), str) else None
    extra = {k: v for k, v in error.items() if k not in shaped and error is not body}
    return json.dumps({**body, "error": {**shaped, **extra}}).encode()
