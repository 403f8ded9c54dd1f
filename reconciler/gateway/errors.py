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
    """A backend's error answer (the client's fault: 4xx, or 501) as OpenAI's one `error`
    object, keeping its message, its code (vLLM's is the integer status) and extra fields
    (llama.cpp's n_prompt_tokens, n_ctx). Other shapes are folded in, never mixed with it:
    older vLLM's flat {"object": "error", "message", "type", "code"}, FastAPI's {"detail"}."""
    try:
        body = json.loads(content)
    except ValueError:
        body = None
    if not isinstance(body, dict):
        body = {}
    error = body.get("error")
    if error is None and "message" in body:  # older vLLM's flat shape
        error = {k: v for k, v in body.items() if k != "object"}
    elif error is None and isinstance(body.get("detail"), str):  # FastAPI's own 404 and 405
        error = {"message": body["detail"]}
    if isinstance(error, str):
        error = {"message": error}
    if not isinstance(error, dict):
        text = content.decode("utf-8", "replace").strip()[:500] or f"the backend answered {status}"
        error = {"message": text}
    shaped = error_body(str(error.get("message") or f"the backend answered {status}"), status)["error"]
    kind = error.get("type")
    code = error.get("code")
    shaped["type"] = kind if isinstance(kind, str) else shaped["type"]
    # An integer code (llama.cpp's 400, vLLM's 404) stays one: clients compare it as sent.
    keep = isinstance(code, str | int) and not isinstance(code, bool)
    shaped["code"] = code if keep else kind if isinstance(kind, str) else None
    shaped["param"] = error.get("param") if isinstance(error.get("param"), str) else None
    extra = {k: v for k, v in error.items() if k not in shaped}
    return json.dumps({"error": {**shaped, **extra}}).encode()
