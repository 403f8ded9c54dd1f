"""Operator requests to drain or restart a backend, from the gateway's admin API to the
reconciler. The gateway never acts on a backend itself: it writes a request file, and the
reconciler reads the directory as one more input to its pass, so a restart goes through the
same drain path as a rolling change and nothing bypasses the desired state.

One file per backend, `<requests dir>/<backend>.json` (a newer request replaces an older one):

    {"version": 1, "backend": "cpu", "action": "restart", "id": "9f…", "requested_at": 1764670000.0,
     "requested_by": "alice"}

- `restart`: the reconciler plans a RESTART of the running backend (drained first, like any
  restart), then removes the file with `finish` (only if it still holds that request's id).
- `drain`: the reconciler takes the backend out of routing (its drain mark) and keeps it out,
  running, until the file is withdrawn (`DELETE /backends/{name}/drain`) or replaced by a
  restart request.

The directory is `TF_ADMIN_REQUESTS_DIR`, else `<state dir>/admin-requests`; where the gateway
runs under its own user, that user must be able to write it (the reconciler only reads and
removes)."""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, TypedDict

from reconciler.drivers.atomic import write_atomic
from reconciler.plan import Action, ActionKind

log = logging.getLogger(__name__)

REQUESTS_DIR = "admin-requests"
REQUESTS_DIR_ENV = "TF_ADMIN_REQUESTS_DIR"
FORMAT_VERSION = 1
ACTIONS = ("drain", "restart")
RequestAction = Literal["drain", "restart"]


def admin_requests_dir(state: Path) -> Path:
    """TF_ADMIN_REQUESTS_DIR, else <state dir>/admin-requests."""
    if env := os.environ.get(REQUESTS_DIR_ENV):
        return Path(env)
    return state / REQUESTS_DIR


@dataclass(frozen=True)
class AdminRequest:
    backend: str
    action: RequestAction
    id: str
    requested_at: float
    requested_by: str

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.requested_at))
        return f"{self.action} requested through the admin API by {self.requested_by} at {when} (request {self.id})"


def write_request(
    directory: Path, backend: str, action: RequestAction, requested_by: str
) -> AdminRequest:
    """Record a request (atomically: the reconciler never reads half a file)."""
    if action not in ACTIONS:
        raise ValueError(f"action {action!r} is not one of {', '.join(ACTIONS)}")
    request = AdminRequest(backend, action, uuid.uuid4().hex, time.time(), requested_by)
    directory.mkdir(parents=True, exist_ok=True)
    write_atomic(
        directory / f"{backend}.json",
        json.dumps({"version": FORMAT_VERSION, **asdict(request)}) + "\n",
    )
    return request


def withdraw(directory: Path, backend: str, action: RequestAction | None = None) -> bool:
    """Remove the backend's request (only if it is `action`, when given); True if one was there."""
    path = directory / f"{backend}.json"
    current = _read_one(path)
    if current is None or (action is not None and current.action != action):
        return False
    path.unlink(missing_ok=True)
    return True


def finish(directory: Path, request: AdminRequest) -> None:
    """The reconciler carried out `request`: remove its file, unless a newer request replaced it."""
    path = directory / f"{request.backend}.json"
    current = _read_one(path)
    if current is not None and current.id == request.id:
        path.unlink(missing_ok=True)


def _read_one(path: Path) -> AdminRequest | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("version") != FORMAT_VERSION or data.get("action") not in ACTIONS:
            raise ValueError(
                f"version must be {FORMAT_VERSION} and action one of {', '.join(ACTIONS)}"
            )
        return AdminRequest(str(data["backend"]), data["action"], str(data["id"]),
                            float(data["requested_at"]), str(data["requested_by"]))  # fmt: skip
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{path}: not an admin request ({exc}); remove the file") from None


def read_requests(
    directory: Path, backends: Iterable[str]
) -> tuple[dict[str, AdminRequest], list[str]]:
    """(requests by backend, problems). A file for a backend not in the desired state, or one
    that cannot be read, is a problem to report (it is ignored, never half-applied)."""
    known = set(backends)
    found: dict[str, AdminRequest] = {}
    problems: list[str] = []
    try:
        paths = sorted(
            p for p in directory.iterdir() if p.suffix == ".json" and not p.name.startswith(".")
        )
    except FileNotFoundError:
        return found, problems
    except OSError as exc:
        return found, [f"{directory}: cannot read admin requests: {exc.strerror}"]
    for path in paths:
        try:
            request = _read_one(path)
        except ValueError as exc:
            problems.append(str(exc))
            continue
        if request is None:
            continue  # removed while we listed
        if request.backend != path.stem:
            problems.append(
                f"{path}: names backend {request.backend!r}; the file must be <backend>.json"
            )
        elif request.backend not in known:
            problems.append(
                f"{path}: backend {request.backend!r} is not in the desired state; remove the file"
            )
        else:
            found[request.backend] = request
    return found, problems


def satisfied(
    actions: Iterable[Action], requests: Mapping[str, AdminRequest]
) -> list[AdminRequest]:
    """Restart requests this pass's actions fulfil once carried out (a restart, or a start of a
    backend that was not running, is a fresh process either way)."""
    done = []
    for action in actions:
        if action.kind not in (ActionKind.RESTART, ActionKind.START):
            continue
        request = requests.get(action.unit.removeprefix("backend-"))
        if request is not None and request.action == "restart":
            done.append(request)
    return done


class RequestFields(TypedDict, total=False):
    restart_requested: str
    drain_requested: str


def request_fields(request: AdminRequest | None) -> RequestFields:
    """What a request adds to its backend's DesiredUnit: the plan's own inputs, so `plan`
    shows what `apply` does with it (a restart drains first, like any restart)."""
    if request is None:
        return {}
    if request.action == "restart":
        return {"restart_requested": request.describe()}
    return {"drain_requested": request.describe()}
