"""The gateway's one error type, `GatewayError`: raised by the lower layers (admission,
request checks, routing, proxying) and rendered by each surface in its own shape (OpenAI's
{"error": {"message", "type", "param", "code"}}, Ollama's {"error": "..."}, a WebSocket
message), never a traceback. OpenAI's shape is also what backends' errors are folded into."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

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


@dataclass
class GatewayError(Exception):
    """A request refused or failed: what any surface needs to say so in its own shape."""

    status: int
    message: str
    code: str | int | None = None  # an integer stays one (vLLM's): clients compare it as sent
    param: str | None = None  # the request field at fault, as OpenAI names it
    type: str | None = None  # None: the status's usual type (STATUS_TYPES)
    retry_after: str | None = None
    extra: dict[str, Any] = field(
        default_factory=dict
    )  # a backend's own fields (llama.cpp's n_ctx)

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def __str__(self) -> str:
        return self.message

    def openai(self) -> dict[str, Any]:
        """The `error` object of OpenAI's shape."""
        kind = self.type if self.type is not None else STATUS_TYPES.get(self.status, "api_error")
        return {
            "message": self.message,
            "type": kind,
            "param": self.param,
            "code": self.code,
            **self.extra,
        }

    def openai_json(self) -> bytes:
        return json.dumps({"error": self.openai()}).encode()


def error_body(message: str, status: int, code: str | None = None) -> dict[str, Any]:
    return {"error": GatewayError(status, message, code).openai()}


def error_response(
    status: int, message: str, code: str | None = None, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(error_body(message, status, code), status_code=status, headers=headers)


def sse_error_event(message: str, code: str = "upstream_error") -> bytes:
    """What a stream ends with when its backend fails after the first byte was sent."""
    return b"data: " + json.dumps(error_body(message, 502, code)).encode() + b"\n\n"


def backend_error(content: bytes, status: int) -> GatewayError:
    """A backend's error answer (the client's fault: 4xx, or 501) as one error, keeping its
    message, its code (vLLM's is the integer status) and extra fields (llama.cpp's
    n_prompt_tokens, n_ctx). Other shapes are folded in, never mixed with it: older vLLM's
    flat {"object": "error", "message", "type", "code"}, FastAPI's {"detail"}."""
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
    kind = error.get("type")
    code = error.get("code")
    # An integer code (llama.cpp's 400, vLLM's 404) stays one: clients compare it as sent.
    keep = isinstance(code, str | int) and not isinstance(code, bool)
    param = error.get("param")
    shaped = GatewayError(
        status,
        str(error.get("message") or f"the backend answered {status}"),
        code=code if keep else kind if isinstance(kind, str) else None,
        param=param if isinstance(param, str) else None,
        type=kind if isinstance(kind, str) else None,
    )
    shaped.extra = {k: v for k, v in error.items() if k not in ("message", "type", "param", "code")}
    return shaped


def openai_error(content: bytes, status: int) -> bytes:
    """backend_error, as OpenAI's JSON."""
    return backend_error(content, status).openai_json()
