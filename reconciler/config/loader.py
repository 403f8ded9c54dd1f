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
from pydantic_core import ErrorDetails

from reconciler.config.schema import DesiredState

EMBEDDED_DEFAULT = "embedded:default"
# A desired state is a few KiB; a 50 MB one took 198 s and about 1 GB to validate.
MAX_FILE_BYTES = 1024 * 1024
# The schema's deepest path is five levels (gateway.routing.fallbacks.GROUP.[i]); PyYAML's
# composer and json.loads recurse per level and died with a bare RecursionError past ~1000.
MAX_DEPTH = 32


class ConfigError(Exception):
    """A desired-state file that cannot be used; `problems` holds one line per problem. A
    problem at a place in the file starts ':LINE:' or ':LINE:COLUMN:' and is printed right
    after the file name, as compilers do (host.yaml:7: backends.chat: duplicate key; ...)."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        super().__init__("\n".join(f"{source}{'' if _AT.match(p) else ': '}{p}" for p in problems))


_AT = re.compile(r":[0-9]+(:[0-9]+)?: ")


def _friendly(error: ErrorDetails, data: Any) -> str:
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
                shown = "input" in error and not isinstance(error["input"], dict | list)
                if shown and error["type"] != "bool_not_number":  # that one says what it got
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


def _join(path: str, key: object) -> str:
    return f"{path}.{_loc_part(key)}" if path else _loc_part(key)


_REPEATED = "duplicate key; each name may appear once"
_MERGE_TAG = "tag:yaml.org,2002:merge"


def _yaml_repeats(loader: yaml.SafeLoader, node: yaml.Node, path: str, seen: set[int]) -> list[str]:
    """A key given twice in one mapping, which PyYAML silently resolves as "the last wins":
    a second `chat:` under backends would replace the first without a word."""
    if id(node) in seen:  # an alias: its anchor was checked where it was written
        return []
    seen.add(id(node))
    problems: list[str] = []
    if isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            problems += _yaml_repeats(loader, item, _join(path, i), seen)
    elif isinstance(node, yaml.MappingNode):
        keys: set[object] = set()
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                # `<<: *defaults`: its keys may be overridden here; only check the merged mapping.
                problems += _yaml_repeats(loader, value_node, path, seen)
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                continue  # a list or mapping as a key: construction reports it as unhashable
            key = loader.construct_object(key_node)
            if key in keys:
                line = key_node.start_mark.line + 1
                problems.append(f":{line}: {_join(path, key)}: {_REPEATED}")
            keys.add(key)
            problems += _yaml_repeats(loader, value_node, _join(path, key), seen)
    return problems


def _yaml_problem(exc: yaml.YAMLError, text: str) -> str:
    """PyYAML's message spans several lines and quotes the file back; make it one line."""
    if isinstance(exc, yaml.reader.ReaderError):
        before = text[: exc.position]
        where = f":{before.count(chr(10)) + 1}:{exc.position - before.rfind(chr(10))}"
        return f"{where}: not valid YAML: {str(exc).splitlines()[0]}"
    if not isinstance(exc, yaml.MarkedYAMLError):
        return "not valid YAML: " + " ".join(str(exc).split())
    mark = exc.problem_mark or exc.context_mark
    where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""  # PyYAML counts from 0
    problem = " ".join((exc.problem or exc.context or "").split())
    if isinstance(exc, yaml.composer.ComposerError) and exc.problem == "but found another document":
        problem = "a second document starts here ('---'); the file must hold one document"
    elif problem == "found unhashable key":
        problem += "; a key must be a name, not a list or mapping"
    elif exc.context and exc.context_mark and exc.problem:
        start = exc.context_mark
        problem += f" ({exc.context} from line {start.line + 1}, column {start.column + 1})"
    return f"{where}: not valid YAML: {problem}"


def _load_yaml(text: str) -> tuple[Any, list[str]]:
    loader = _BoundedLoader(text)  # reads (and checks) the characters here already
    try:
        node = loader.get_single_node()  # one document: a second '---' is an error
        if node is None:
            return None, []
        problems = _yaml_repeats(loader, node, "", set())
        return (None if problems else loader.construct_document(node)), problems
    finally:
        loader.dispose()


class _JsonObject(dict[str, Any]):
    """A JSON object that remembers the keys it was given more than once."""

    repeated: tuple[str, ...] = ()


def _json_object(pairs: list[tuple[str, Any]]) -> _JsonObject:
    # json.loads keeps the last of repeated keys, silently: keep them for _json_repeats.
    obj = _JsonObject()
    repeated = []
    for key, value in pairs:
        if key in obj:
            repeated.append(key)
        obj[key] = value
    obj.repeated = tuple(repeated)
    return obj


def _json_repeats(data: Any, path: str) -> list[str]:
    problems: list[str] = []
    if isinstance(data, list):
        for i, item in enumerate(data):
            problems += _json_repeats(item, _join(path, i))
    elif isinstance(data, dict):
        problems += [f"{_join(path, key)}: {_REPEATED}" for key in getattr(data, "repeated", ())]
        for key, value in data.items():
            problems += _json_repeats(value, _join(path, key))
    return problems


class _DepthError(Exception):
    def __init__(self, line: int):
        self.line = line


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing nesting deeper than MAX_DEPTH as it composes (its
    composer recurses once per level: no separate scan, no RecursionError)."""

    depth = 0

    def compose_node(self, parent, index):  # type: ignore[no-untyped-def]
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                event = self.peek_event()  # type: ignore[no-untyped-call]  # untyped in types-PyYAML
                raise _DepthError(event.start_mark.line + 1)
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def _json_nesting(text: str) -> str | None:
    depth, in_string, escaped, line = 0, False, False, 1
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                return f":{line}: {_too_deep()}"
        elif char in "]}":
            depth -= 1
        if char == "\n":
            line += 1
    return None


def _too_deep() -> str:
    return (
        f"nested deeper than {MAX_DEPTH} levels; a desired state needs at most five "
        "(gateway.routing.fallbacks.GROUP.[i]): check the indentation or brackets here"
    )


def parse_text(text: str, source: str) -> Any:
    """Parse YAML or JSON (JSON is YAML, but parse it strictly when the file says .json)."""
    if source.endswith(".json") and (problem := _json_nesting(text)) is not None:
        raise ConfigError(source, [problem])
    if source.endswith(".json"):
        try:
            data = json.loads(text, object_pairs_hook=_json_object)
        except json.JSONDecodeError as exc:
            where = f":{exc.lineno}:{exc.colno}"
            raise ConfigError(source, [f"{where}: not valid JSON: {exc.msg}"]) from None
        problems = _json_repeats(data, "")
    else:
        try:
            data, problems = _load_yaml(text)
        except yaml.YAMLError as exc:
            raise ConfigError(source, [_yaml_problem(exc, text)]) from None
        except _DepthError as exc:
            raise ConfigError(source, [f":{exc.line}: {_too_deep()}"]) from None
    if problems:
        raise ConfigError(source, problems)
    return data


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
        with Path(path).open("rb") as handle:
            data = handle.read(MAX_FILE_BYTES + 1)  # never more than the limit in memory
    except FileNotFoundError:
        raise ConfigError(source, ["file not found; pass an existing YAML or JSON file"]) from None
    except OSError as exc:
        raise ConfigError(source, [f"cannot read: {exc}"]) from None
    if len(data) > MAX_FILE_BYTES:
        raise ConfigError(
            source,
            [f"larger than {MAX_FILE_BYTES // 1024} KiB; refused before parsing (a desired state "
             "is a few KiB: is this the right file?)"],
        )  # fmt: skip
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(source, [f"cannot read: {exc}"]) from None
    return validate_data(parse_text(text, source), source), source
