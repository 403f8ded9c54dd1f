"""Ollama's `options` (its Modelfile parameters) and what each backend protocol makes of them.

Sampling options become the request fields llama.cpp's server reads (its names are the
gateway's internal spelling; the vLLM and TGI adapters rename where theirs differ). Options
that size or place the model when Ollama loads it are fixed when a TensorForge backend
starts, so a request cannot change them: they are refused, naming where they are set.
`num_ctx` is the exception, handled as Ollama handles a context larger than the model's: see
`clamp_num_ctx`."""

from __future__ import annotations

from typing import Any

from reconciler.backends.kinds.base import CHAT_FIELDS, OPENAI_FIELDS
from reconciler.backends.registry import GENERIC_PROTOCOL, KINDS

# Ollama option -> request field (OpenAI's where it has one, else llama.cpp's).
SAMPLING = {
    "temperature": "temperature", "top_p": "top_p", "num_predict": "max_tokens", "seed": "seed",
    "stop": "stop", "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
    "top_k": "top_k", "min_p": "min_p", "typical_p": "typical_p", "repeat_penalty": "repeat_penalty",
    "repeat_last_n": "repeat_last_n", "mirostat": "mirostat", "mirostat_tau": "mirostat_tau",
    "mirostat_eta": "mirostat_eta", "num_keep": "n_keep",
}  # fmt: skip
INTEGER = frozenset(
    ("num_predict", "seed", "top_k", "repeat_last_n", "mirostat", "num_keep", "num_ctx")
)
# Set when the model is loaded: the desired state's backend declaration holds these.
LOAD_TIME = {
    "numa": "the backend's extra_args", "num_batch": "the backend's extra_args",
    "num_gpu": "backends.<name>.gpus", "main_gpu": "backends.<name>.gpu_ids",
    "low_vram": "the backend's extra_args", "vocab_only": "nothing (a vocabulary-only load serves no text)",
    "use_mmap": "the backend's extra_args", "use_mlock": "the backend's extra_args",
    "num_thread": "backends.<name>.threads", "f16_kv": "backends.<name>.kv_cache_dtype",
    "logits_all": "nothing", "embedding_only": "nothing", "num_gqa": "nothing (read from the model file)",
    "rope_frequency_base": "the backend's extra_args", "rope_frequency_scale": "the backend's extra_args",
}  # fmt: skip
# Options Ollama documented once and its own runner no longer honours; llama.cpp dropped them too.
RETIRED = {
    "penalize_newline": "llama.cpp removed it",
    "tfs_z": "llama.cpp removed tail-free sampling",
}

# Beyond OpenAI's sampling fields: what each protocol's server takes, per endpoint family
# (declared by each kind, reconciler/backends/kinds/); a generic OpenAI server only OpenAI's.
EXTENSIONS = {
    **{(k.name, "chat"): k.gateway.chat_fields for k in KINDS.values()},
    **{(k.name, "text"): k.gateway.text_fields for k in KINDS.values()},
    (GENERIC_PROTOCOL, "chat"): OPENAI_FIELDS | CHAT_FIELDS | {"reasoning_effort"},
    (GENERIC_PROTOCOL, "text"): OPENAI_FIELDS,
}
BACKEND_NAMES = {**{k.name: k.title for k in KINDS.values()}, GENERIC_PROTOCOL: "OpenAI-compatible"}


class Refused(Exception):
    """A request field the backends of this model cannot honour: the client's 400."""


def _number(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Refused(f"options.{name} must be a number")
    if name in INTEGER and value != int(value):
        raise Refused(f"options.{name} must be a whole number")


def sampling_fields(options: object) -> tuple[dict[str, Any], int | None]:
    """(request fields, num_ctx asked for) from Ollama's `options`; Refused for a wrong type,
    a load-time option, a retired one or a name Ollama does not document."""
    if options is None:
        return {}, None
    if not isinstance(options, dict):
        raise Refused("'options' must be an object of Ollama model parameters")
    fields: dict[str, Any] = {}
    num_ctx = None
    for name, value in options.items():
        if value is None:
            continue
        if name == "num_ctx":
            _number(name, value)
            if value < 1:
                raise Refused("options.num_ctx must be 1 or more")
            num_ctx = int(value)
        elif name == "stop":
            stops = [value] if isinstance(value, str) else value
            if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
                raise Refused("options.stop must be a string or a list of strings")
            if stops:
                fields["stop"] = stops
        elif name in SAMPLING:
            _number(name, value)
            if name == "num_predict" and value < 0:
                continue  # -1 (no limit) and -2 (fill the context): the backend's own default
            if name == "num_predict" and value == 0:
                raise Refused(
                    "options.num_predict 0 asks for no tokens; send 1 or more, or -1 for no limit"
                )
            fields[SAMPLING[name]] = int(value) if name in INTEGER else value
        elif name in LOAD_TIME:
            raise Refused(
                f"options.{name} is fixed when the backend starts; TensorForge sets it in the desired "
                f"state ({LOAD_TIME[name]}), not per request: remove it from options"
            )
        elif name in RETIRED:
            raise Refused(
                f"options.{name} is no longer supported ({RETIRED[name]}): remove it from options"
            )
        else:
            raise Refused(
                f"options.{name} is not an Ollama model parameter; see Ollama's Modelfile parameters"
            )
    return fields, num_ctx


def check_protocols(body: dict[str, Any], protocols: set[str], family: str) -> None:
    """Refused when a field of `body` would be lost on one of the model's backends."""
    for protocol in sorted(protocols):
        accepted = EXTENSIONS.get((protocol, family))
        if accepted is None:
            continue
        for option, field in SAMPLING.items():
            if field in body and field not in accepted:
                raise Refused(
                    f"options.{option} cannot be sent to this model's {BACKEND_NAMES[protocol]} backend "
                    f"(it has no equivalent for {family} requests); remove it"
                )
        for field, what in (
            ("chat_template_kwargs", "think"),
            ("reasoning_effort", "think"),
            ("tools", "tools"),
            ("logprobs", "logprobs"),
        ):
            if field in body and field not in accepted:
                raise Refused(
                    f"'{what}' cannot be sent to this model's {BACKEND_NAMES[protocol]} backend; remove it"
                )


def clamp_num_ctx(num_ctx: int | None, context_limit: int | None) -> int | None:
    """The context a request gets. A TensorForge backend's context is fixed at launch, so
    `num_ctx` cannot resize it: a smaller value is satisfied (the request simply has more
    room), and a larger one is clamped to what the backend has, as Ollama clamps a `num_ctx`
    above the model's trained context. Returns the clamped value when it differs."""
    if num_ctx is None or context_limit is None or num_ctx <= context_limit:
        return None
    return context_limit


def clamp_num_predict(body: dict[str, Any], context_limit: int | None) -> None:
    """`num_predict` is a ceiling in Ollama, and generation stops where the context ends: one
    above the backend's context per request becomes that context (not the gateway's 400)."""
    for field in ("max_tokens", "n_predict"):
        if (
            context_limit is not None
            and isinstance(body.get(field), int)
            and body[field] > context_limit
        ):
            body[field] = context_limit
