"""The gateway's OpenAPI description, served at `/openapi.json`: every endpoint the gateway
answers, with the request bodies it accepts (the fields it reads or checks itself; everything
else passes through to the backend). Hand-written and small, so it says what the code does;
tests/test_bad_input.py fuzzes the gateway against it with schemathesis."""

from __future__ import annotations

from typing import Any

ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}
OLLAMA_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "string"}},
}
COUNT = {"type": "integer", "minimum": 1}
COMMON: dict[str, Any] = {
    "model": {
        "type": "string",
        "minLength": 1,
        "description": "A served model name or alias; 'auto' (or none) lets the gateway choose.",
    },
    "stream": {"type": "boolean"},
    "max_tokens": {**COUNT, "description": "At most the backend's per-request context."},
    "max_completion_tokens": COUNT,
    "temperature": {"type": "number", "minimum": 0, "maximum": 2},
    "top_p": {"type": "number", "minimum": 0, "maximum": 1},
    "n": {"type": "integer", "minimum": 1, "maximum": 1},
    "seed": {"type": "integer"},
    "stop": {
        "oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "maxItems": 4}]
    },
    "user": {"type": "string"},
}
MESSAGE = {
    "type": "object",
    "required": ["role", "content"],
    "properties": {
        "role": {"type": "string", "enum": ["system", "user", "assistant"]},
        "content": {"type": "string"},
    },
}
OLLAMA_OPTIONS = {
    "type": "object",
    "properties": {
        "temperature": {"type": "number", "minimum": 0, "maximum": 2},
        "top_p": {"type": "number", "minimum": 0, "maximum": 1},
        "num_predict": {"type": "integer"},
        "seed": {"type": "integer"},
        "stop": {"type": "array", "items": {"type": "string"}},
    },
}


def _body(required: list[str], properties: dict[str, Any]) -> dict[str, Any]:
    return {
        "required": True,
        "content": {
            "application/json": {
                "schema": {"type": "object", "required": required, "properties": properties}
            }
        },
    }


def _answers(ok: str, *errors: int, ollama: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {"200": {"description": ok}}
    for status in errors:
        schema = OLLAMA_ERROR if ollama else ERROR
        out[str(status)] = {
            "description": "error",
            "content": {"application/json": {"schema": schema}},
        }
    return out


NAME_PARAMETER = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
PROXIED = (400, 401, 404, 408, 413, 429, 502, 503)
PASS_THROUGH = {
    "/v1/responses": "OpenAI Responses", "/v1/messages": "Anthropic Messages", "/v1/rerank": "reranking",
    "/rerank": "reranking", "/tokenize": "tokenize text", "/detokenize": "tokens to text",
    "/infill": "fill-in-the-middle",
}  # fmt: skip


def openapi_document(models: list[str] | None = None) -> dict[str, Any]:
    """The OpenAPI 3.1 document; `models` (names and aliases served now) become the `model`
    field's enum. `security` is declared on every operation that needs a key when
    `gateway.api_keys_file` is set; without it the gateway is open."""
    bearer: list[dict[str, list[str]]] = [{"bearer": []}]
    model = {**COMMON["model"], "enum": sorted(models)} if models else COMMON["model"]
    chat = {**COMMON, "model": model, "messages": {"type": "array", "items": MESSAGE}}
    completion = {
        **COMMON,
        "model": model,
        "prompt": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
    }
    embedding = {
        "model": model,
        "input": {
            "oneOf": [
                {"type": "string"},
                {"type": "array", "items": {"type": "string"}, "minItems": 1},
            ]
        },
    }
    ollama_chat = {
        "model": model, "stream": {"type": "boolean"}, "options": OLLAMA_OPTIONS,
        "format": {"oneOf": [{"type": "string", "enum": ["json"]}, {"type": "object"}]},
        "messages": {"type": "array", "items": MESSAGE},
        "tools": {"type": "array", "items": {"type": "object"}}, "think": {"type": "boolean"},
        "keep_alive": {"oneOf": [{"type": "string"}, {"type": "number"}]},
    }  # fmt: skip
    ollama_generate = {
        "model": model, "stream": {"type": "boolean"}, "options": OLLAMA_OPTIONS,
        "prompt": {"type": "string"}, "system": {"type": "string"}, "raw": {"type": "boolean"},
        "suffix": {"type": "string"}, "template": {"type": "string"}, "think": {"type": "boolean"},
        "images": {"type": "array", "items": {"type": "string"}}, "context": {"type": "array", "items": {"type": "integer"}},
        "keep_alive": {"oneOf": [{"type": "string"}, {"type": "number"}]},
    }  # fmt: skip

    ollama_embed = {"model": model, "input": embedding["input"], "truncate": {"type": "boolean"}}
    ollama_embeddings = {"model": model, "prompt": {"type": "string"}}
    pull = {
        "model": {"type": "string"},
        "stream": {"type": "boolean"},
    }  # any name: declared or catalog

    def post(summary: str, body: dict[str, Any], ollama: bool = False) -> dict[str, Any]:
        return {"post": {"summary": summary, "security": bearer, "requestBody": body,
                         "responses": _answers("the answer (or an event stream)", *PROXIED, ollama=ollama)}}  # fmt: skip

    def get(summary: str, secured: bool = True) -> dict[str, Any]:
        operation: dict[str, Any] = {
            "summary": summary,
            "responses": _answers("ok", *((401,) if secured else ())),
        }
        if secured:
            operation["security"] = bearer
        return {"get": operation}

    def admin(summary: str) -> dict[str, Any]:
        return {"summary": summary + " (admin key: gateway.admin_keys_file; the reconciler acts on its next pass)",
                "security": bearer, "parameters": [NAME_PARAMETER],
                "responses": {"202": {"description": "request recorded for the reconciler"},
                              **_answers("ok", 401, 403, 404, 409, 503)}}  # fmt: skip

    return {
        "openapi": "3.1.0",
        "info": {"title": "TensorForge gateway", "version": "1"},
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "paths": {
            "/health": get("gateway and backend health", secured=False),
            "/metrics": get("Prometheus metrics"),
            "/openapi.json": get("this document"),
            # The operations plane (docs/operations.md); the live feed is the WebSocket GET /ws.
            "/status": get("host, version, reconciler pass, every backend, gateway counters"),
            "/vram": get(
                "per GPU memory (NVML) with the backends placed on it; no GPU: gpus [] and the reason"
            ),
            "/backends": get(
                "every backend: health, state, pid/unit, GPUs, in-flight, queue, circuit, last error"
            ),
            "/backends/{name}/drain": {
                "post": admin("take a backend out of routing and keep it out"),
                "delete": admin("withdraw a drain request"),
            },  # fmt: skip
            "/backends/{name}/restart": {
                "post": admin("restart a backend through the reconciler's drain path")
            },
            "/models": get(
                "registry rows: source, file, sha256, size, format, GGUF details, serving backends"
            ),
            "/models/{name}": {
                "get": {
                    "summary": "one model, by name or alias",
                    "security": bearer,
                    "parameters": [NAME_PARAMETER],
                    "responses": _answers("the model", 401, 404),
                }
            },  # fmt: skip
            "/ui": get(
                "the status page (public: it holds no data and asks for a key)", secured=False
            ),
            "/ui/app.js": get("the status page's script", secured=False),
            "/ui/style.css": get("the status page's style", secured=False),
            "/v1/models": get("served models and their aliases"),
            "/v1/models/{model}": {
                "get": {
                    "summary": "one served model, by name or alias",
                    "security": bearer,
                    "parameters": [
                        {
                            "name": "model",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string"},
                        }
                    ],
                    "responses": _answers("the model", 401, 404),
                }
            },  # fmt: skip
            "/v1/chat/completions": post("chat completion", _body(["model", "messages"], chat)),
            "/v1/completions": post("text completion", _body(["model", "prompt"], completion)),
            "/v1/embeddings": post("embeddings", _body(["model", "input"], embedding)),
            **{
                path: post(
                    f"{summary}, passed to a backend that serves it (routed by model)",
                    _body([], {"model": model}),
                )
                for path, summary in PASS_THROUGH.items()
            },
            "/": {
                **get("Ollama liveness"),
                "head": {
                    "summary": "Ollama liveness",
                    "security": bearer,
                    "responses": {"200": {"description": "ok"}},
                },
            },  # fmt: skip
            "/api/version": get("Ollama version"),
            "/api/tags": get("Ollama model list"),
            "/api/ps": get("Ollama running models"),
            "/api/chat": post("Ollama chat", _body(["model"], ollama_chat), ollama=True),
            "/api/generate": post(
                "Ollama generate", _body(["model"], ollama_generate), ollama=True
            ),
            "/api/show": post(
                "Ollama model details", _body(["model"], {"model": model}), ollama=True
            ),
            "/api/embed": post(
                "Ollama embeddings", _body(["model", "input"], ollama_embed), ollama=True
            ),
            "/api/embeddings": post(
                "Ollama embeddings (older form)",
                _body(["model", "prompt"], ollama_embeddings),
                ollama=True,
            ),  # fmt: skip
            "/api/pull": post(
                "Ollama pull: TensorForge's pull of a declared or catalog model",
                _body(["model"], pull),
                ollama=True,
            ),  # fmt: skip
            "/api/delete": {
                "delete": {
                    **post(
                        "Ollama delete: unregister a model no backend serves",
                        _body(["model"], pull),
                        ollama=True,
                    )["post"]
                }
            },  # fmt: skip
            **{
                f"/api/{verb}": post(
                    f"Ollama {verb}: 501, with what to do instead", _body([], {}), ollama=True
                )
                for verb in ("copy", "create", "push")
            },  # fmt: skip
        },
    }
