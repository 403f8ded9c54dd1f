"""Read a desired-state file (YAML or JSON) and turn every problem into one line that names
the file, the field path and the fix."""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from reconciler.config.schema import DesiredState

EMBEDDED_DEFAULT = "embedded:default"


class ConfigError(Exception):
    """A desired-state file that cannot be used; `problems` holds one line per problem."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        super().__init__("\n".join(f"{source}: {p}" for p in problems))


def _friendly(error: dict[str, Any], data: Any) -> str:
    kind = error["type"]
    ctx = error.get("ctx") or {}
    msg = error["msg"]
    if kind == "extra_forbidden":
        return "unknown key; remove it or check its spelling"
    if kind == "missing":
        return "required; add it"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected', '')}"
    if kind == "value_error":
        return str(ctx.get("error", msg.removeprefix("Value error, ")))
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        words = {
            "greater_than_equal": "at least",
            "greater_than": "greater than",
            "less_than_equal": "at most",
            "less_than": "less than",
        }
        bound = next(iter(ctx.values()), "")
        return f"must be {words[kind]} {bound}"
    return msg[0].lower() + msg[1:] if msg else kind


def _format_errors(exc: ValidationError, data: Any) -> list[str]:
    problems: list[str] = []
    for error in exc.errors():
        path = ".".join(_loc_part(p) for p in error["loc"]).replace(".[key]", " (name)")
        text = _friendly(error, data)
        # Cross-reference checks report several problems, each already naming its path.
        for line in text.splitlines():
            field = re.match(r"^([a-z_]+): ", line)
            if not path or line.startswith(f"{path}.") or _names_path(line):
                problems.append(line)
            elif field and isinstance(error.get("input"), dict):
                # A model check about one of its own fields: name the field in the path.
                problems.append(f"{path}.{line}")
            else:
                got = ""
                if "input" in error and not isinstance(error["input"], dict | list):
                    got = f" (got {error['input']!r})"
                problems.append(f"{path}: {line}{got}")
    return problems


def _loc_part(part: object) -> str:
    text = str(part)
    # A name with a newline would split the message; show it quoted instead.
    return repr(text) if not text.isprintable() else text


def _names_path(line: str) -> bool:
    head = line.split(":", 1)[0]
    return " " not in head and "." in head


def parse_text(text: str, source: str) -> Any:
    """Parse YAML or JSON (JSON is YAML, but parse it strictly when the file says .json)."""
    try:
        if source.endswith(".json"):
            return json.loads(text)
        return yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(source, [f"not valid {'JSON' if source.endswith('.json') else 'YAML'}: {exc}"]) from None


def validate_data(data: Any, source: str) -> DesiredState:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(source, ["the top level must be a mapping (models, backends, gateway)"])
    try:
        return DesiredState.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(source, _format_errors(exc, data)) from None


def load_desired_state(path: str | Path | None) -> tuple[DesiredState, str]:
    """Load a desired state; None means the embedded default. Returns (state, source name)."""
    if path is None or str(path) == EMBEDDED_DEFAULT:
        text = resources.files("reconciler.config").joinpath("default.yaml").read_text()
        return validate_data(parse_text(text, "default.yaml"), EMBEDDED_DEFAULT), EMBEDDED_DEFAULT
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(source, ["file not found; pass an existing YAML or JSON file"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(source, [f"cannot read: {exc}"]) from None
    return validate_data(parse_text(text, source), source), source
