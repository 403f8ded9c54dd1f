"""Render systemd unit files from the Jinja templates in `templates/`.

Every value that reaches a unit file goes through one of the escaping filters below; anything a
template prints without one still gets its `%` specifiers escaped (the `finalize` hook), so no
declared value can smuggle a systemd specifier, a variable expansion or an extra line in.
Control characters are rejected before rendering, naming the field, because no escaping makes a
newline safe in a line-based format."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import jinja2

from reconciler.backends.commands import Launch
from reconciler.backends.registry import KINDS, kind_of
from reconciler.config.schema import BackendSpec, GatewaySpec


def templates_dir() -> Path:
    """`templates/` of a source checkout (the source of truth, so edits show at once), else the
    copy setup.py puts into the installed package (wheel, Nix)."""
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "pyproject.toml").is_file() and (checkout / "templates").is_dir():
        return checkout / "templates"
    return Path(__file__).resolve().parent / "templates"


TEMPLATES_DIR = templates_dir()
UNIT_PREFIX = "tensorforge-"
MANAGED_MARKER = "# tensorforge-managed:"

_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
_UNIT_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,120}$")
# Arguments made only of these need no quoting in ExecStart= (systemd splits on whitespace).
_PLAIN_ARG_RE = re.compile(r"^[A-Za-z0-9_./:=,+@-]+$")
# Paths need quoting for ':' too: BindReadOnlyPaths= splits an unquoted one there (SRC:DST).
_PLAIN_PATH_RE = re.compile(r"^[A-Za-z0-9_./=,+@-]+$")
# ExecStart= prefixes (run as root, ignore failure, …): systemd reads them even in quotes.
_EXEC_PREFIXES = ("-", "@", "+", "!", ":")
# Paths under these are hidden by ProtectHome=yes / replaced by PrivateTmp=yes.
_HOME_ROOTS = ("/home/", "/root/", "/run/user/")
_TMP_ROOTS = ("/tmp/", "/var/tmp/")
# The directory the `reconciler` package is imported from (a checkout, or site-packages).
_PACKAGE_ROOT = Path(__file__).resolve().parent.parent.parent


class UnitRenderError(ValueError):
    """A value that cannot be put into a unit file; the message names the field."""


class _Escaped(str):
    """Output of an escaping filter: `finalize` leaves it alone."""


def _finalize(value: object) -> object:
    if isinstance(value, _Escaped):
        return value
    if isinstance(value, str):
        return value.replace("%", "%%")
    return value


def exec_arg(value: object) -> _Escaped:
    """One ExecStart= word: `%` -> `%%`, `$` -> `$$`, double-quoted with C escapes if needed."""
    text = str(value).replace("%", "%%").replace("$", "$$")
    if text and _PLAIN_ARG_RE.match(text):
        return _Escaped(text)
    return _quote(text)


def _quote(text: str) -> _Escaped:
    return _Escaped('"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"')


def exec_line(argv: Sequence[str]) -> _Escaped:
    """ExecStart= value; render_unit has refused an executable systemd would misread."""
    return _Escaped(" ".join(exec_arg(a) for a in argv))


def env_assignment(key: str, value: object) -> _Escaped:
    """A quoted `Environment=` word: no `$` expansion happens there, only specifiers."""
    return _quote(f"{key}={value}".replace("%", "%%"))


def quoted_path(value: object) -> _Escaped:
    text = str(value).replace("%", "%%")
    return _Escaped(text) if _PLAIN_PATH_RE.match(text) else _quote(text)


def load_hardening() -> dict[str, dict[str, object]]:
    """templates/hardening.json: the sandboxing every unit gets, shared with the NixOS module."""
    path = TEMPLATES_DIR / "hardening.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UnitRenderError(
            f"{path}: cannot read the unit hardening ({exc}); reinstall TensorForge"
        ) from None
    return {section: values for section, values in data.items() if not section.startswith("_")}


def _unit_value(value: object) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def hardening_lines(settings: Mapping[str, object]) -> list[tuple[str, str]]:
    """(key, value) lines for a unit file; a list is one assignment per item, as in NixOS."""
    lines = []
    for key, value in settings.items():
        for item in value if isinstance(value, list) else [value]:
            lines.append((key, _unit_value(item)))
    return lines


def hardening_for(kind: str, gpu: bool, protect_home: str) -> dict[str, object]:
    sections = load_hardening()
    if kind == "reconciler":
        settings = dict(sections["reconciler"])
    else:
        settings = {**sections["service"], **sections["gpu" if gpu else "cpu"]}
    # A model or venv under /home must stay readable (render_unit decides).
    settings["ProtectHome"] = protect_home
    return settings


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES_DIR)),
        undefined=jinja2.StrictUndefined,
        finalize=_finalize,
        autoescape=False,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["arg"] = exec_arg
    env.filters["exec"] = exec_line
    env.filters["path"] = quoted_path
    env.globals["env_assignment"] = env_assignment
    return env


_ENV = _environment()


def check_values(value: object, field_name: str) -> None:
    """Reject control characters anywhere in `value` (strings, lists, mappings)."""
    if isinstance(value, str):
        if _CONTROL_RE.search(value):
            raise UnitRenderError(
                f"{field_name}: contains a newline or control character ({value!r}); "
                "unit files are line-based, remove it"
            )
    elif isinstance(value, Mapping):
        for key, item in value.items():
            check_values(key, f"{field_name} (key)")
            check_values(item, f"{field_name}.{key}")
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            check_values(item, f"{field_name}[{i}]")


@dataclass(frozen=True)
class UnitSpec:
    """Everything a unit template needs. `name` is the reconciler's unit name (`backend-x`)."""

    name: str
    kind: str  # a backend kind (its templates/<kind>.service.j2), gateway or reconciler
    description: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    gpu_ids: list[int] = field(default_factory=list)
    local_only: bool = True  # listens on loopback only: deny other IP traffic
    read_paths: list[str] = field(default_factory=list)  # files the service must see
    write_paths: list[str] = field(default_factory=list)
    stop_timeout: int = 30


def unit_file_name(name: str) -> str:
    return f"{UNIT_PREFIX}{name}.service"


def _resolve_executable(argv: list[str]) -> list[str]:
    """systemd only searches a fixed PATH: make the executable absolute when we can."""
    if argv and not argv[0].startswith("/"):
        found = shutil.which(argv[0])
        if found:
            return [found, *argv[1:]]
    return argv


def _check_executable(unit: str, executable: str) -> None:
    """systemd takes an absolute path or a bare name it looks up in its own PATH, and reads a
    leading `-@+!:` as a prefix even when quoted: "+/opt/x" would run /opt/x as root, outside
    the sandbox."""
    where = (
        f"backends.{unit.removeprefix('backend-')}.binary"
        if unit.startswith("backend-")
        else "argv[0]"
    )
    if executable.startswith(_EXEC_PREFIXES):
        raise UnitRenderError(
            f"{where}: {executable!r} starts with {executable[0]!r}, which systemd reads as an "
            "ExecStart= prefix (quoting does not help); give the executable's absolute path"
        )
    if "/" in executable and not executable.startswith("/"):
        raise UnitRenderError(
            f"{where}: {executable!r} is a relative path, which systemd refuses; "
            "give the executable's absolute path"
        )


def _tmp_binds(read_paths: list[str], executable: str) -> list[str]:
    """What lives under /tmp that the unit needs, since PrivateTmp hides the host's /tmp: the
    model files' directories, the prefix (venv) holding the executable, and the checkout an
    editable install imports TensorForge from."""
    wanted = {str(Path(p).parent) for p in read_paths}
    if executable.startswith("/"):
        wanted.add(str(Path(executable).parent.parent))
    wanted.add(str(_PACKAGE_ROOT))
    return sorted(p for p in wanted if p.startswith(_TMP_ROOTS))


def render_unit(spec: UnitSpec) -> str:
    """The unit file text for one service; raises UnitRenderError naming a bad field."""
    if spec.kind not in (*KINDS, "gateway", "reconciler"):
        raise UnitRenderError(f"kind: no template for {spec.kind!r}")
    for name, value in spec.__dict__.items():
        check_values(value, name)
    if not _UNIT_NAME_RE.match(spec.name):
        raise UnitRenderError(f"name: {spec.name!r} is not a valid unit name part")
    if not spec.argv:
        raise UnitRenderError("argv: empty command line")
    argv = _resolve_executable(list(spec.argv))
    _check_executable(spec.name, argv[0])
    # The interpreter behind a venv's python may live in a home directory (pyenv).
    paths = [*spec.read_paths, *spec.write_paths, argv[0], os.path.realpath(argv[0])]
    under_home = any(p.startswith(_HOME_ROOTS) for p in paths)
    tmp_binds = _tmp_binds(spec.read_paths, argv[0])
    hardening = hardening_for(spec.kind, bool(spec.gpu_ids), "read-only" if under_home else "yes")
    context = {
        "hardening": hardening_lines(hardening),
        "hardening_value": lambda key: _unit_value(hardening[key]),
        "unit": spec.name,
        "kind": spec.kind,
        "description": spec.description,
        "argv": argv,
        "env": dict(sorted(spec.env.items())),
        "gpu": bool(spec.gpu_ids),
        "gpu_ids": spec.gpu_ids,
        "local_only": spec.local_only,
        "protect_home": "read-only" if under_home else "yes",
        "tmp_binds": tmp_binds,
        "write_paths": spec.write_paths,
        "stop_timeout": spec.stop_timeout,
        "marker": MANAGED_MARKER,
        "state_directory": f"{UNIT_PREFIX}{spec.name}",
    }
    try:
        template = _ENV.get_template(f"{spec.kind}.service.j2")
    except jinja2.TemplateNotFound as exc:
        raise UnitRenderError(
            f"kind: template {exc.name} not found in {TEMPLATES_DIR}; reinstall TensorForge "
            "(its build copies templates/ into the package)"
        ) from None
    return template.render(context)


def backend_unit_spec(
    unit: str,
    backend: BackendSpec,
    model_name: str,
    model_ref: str,
    launch: Launch,
    gpu_ids: list[int],
) -> UnitSpec:
    env = dict(launch.env)
    write_paths: list[str] = []
    models_dir = kind_of(backend.kind).models_dir_env
    if models_dir and models_dir not in backend.environment:
        # A server that downloads models itself (Ollama) gets its own state directory for
        # them (writable, private to the unit).
        env[models_dir] = f"/var/lib/{UNIT_PREFIX}{unit}/models"
    elif models_dir:
        write_paths.append(env[models_dir])
    return UnitSpec(
        name=unit,
        kind=backend.kind,
        description=f"TensorForge {backend.kind} backend {unit.removeprefix('backend-')} "
        f"serving {model_name}",
        argv=list(launch.argv),
        env=env,
        gpu_ids=list(gpu_ids),
        # Loopback-only traffic, unless the server must download its model (a hub id).
        local_only=backend.host in ("127.0.0.1", "::1", "localhost") and os.path.isabs(model_ref),
        read_paths=[model_ref] if os.path.isabs(model_ref) else [],
        write_paths=write_paths,
    )


def gateway_unit_spec(
    unit: str,
    argv: list[str],
    gateway: GatewaySpec,
    config: str | None,
    env: dict[str, str] | None = None,
) -> UnitSpec:
    return UnitSpec(
        name=unit,
        kind="gateway",
        description="TensorForge OpenAI-compatible gateway",
        argv=argv,
        env=dict(env or {}),
        # The gateway proxies to backends declared by URL, which may be on other hosts.
        local_only=False,
        read_paths=[p for p in (config, gateway.api_keys_file) if p],
        stop_timeout=35,  # uvicorn's graceful shutdown is 30 s
    )


def reconciler_unit_spec(argv: list[str], config: str | None) -> UnitSpec:
    return UnitSpec(
        name="reconciler",
        kind="reconciler",
        description="TensorForge reconciler: keeps backends and the gateway as declared",
        argv=argv,
        local_only=False,
        read_paths=[config] if config else [],
        stop_timeout=60,
    )
