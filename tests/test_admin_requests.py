"""Admin requests: the file the gateway's admin API writes and the reconciler reads as an input
to its plan (reconciler/admin_requests.py). Pure and file-level: the plan hook is exercised
with the real `plan()`, the drain path with the real `Drainer`."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from reconciler.admin_requests import (
    admin_requests_dir,
    finish,
    read_requests,
    request_fields,
    satisfied,
    withdraw,
    write_request,
)
from reconciler.plan import ActionKind, DesiredUnit, DrainState, Health, ObservedUnit, plan


def running(*names: str) -> tuple[dict, dict]:
    desired = {f"backend-{n}": DesiredUnit(f"backend-{n}", f"argv {n}\n", group="m") for n in names}
    observed = {u: ObservedUnit(u, d.content, active=True) for u, d in desired.items()}
    return desired, observed


def test_a_request_is_one_file_per_backend_and_a_newer_one_replaces_it(tmp_path):
    first = write_request(tmp_path, "a", "drain", "alice")
    second = write_request(tmp_path, "a", "restart", "bob")
    write_request(tmp_path, "b", "drain", "alice")
    requests, problems = read_requests(tmp_path, ["a", "b"])
    assert not problems
    assert requests["a"] == second and requests["b"].action == "drain"
    assert json.loads((tmp_path / "a.json").read_text())["version"] == 1
    finish(tmp_path, first)  # an older request's completion must not remove the newer one
    assert (tmp_path / "a.json").exists()
    finish(tmp_path, second)
    assert not (tmp_path / "a.json").exists()


def test_withdraw_removes_only_the_named_kind(tmp_path):
    write_request(tmp_path, "a", "restart", "alice")
    assert withdraw(tmp_path, "a", "drain") is False and (tmp_path / "a.json").exists()
    assert withdraw(tmp_path, "a") is True and not (tmp_path / "a.json").exists()
    assert withdraw(tmp_path, "a") is False


def test_bad_files_are_reported_by_name_and_ignored_not_half_applied(tmp_path):
    write_request(tmp_path, "a", "drain", "alice")
    (tmp_path / "b.json").write_text("{not json")
    valid = json.loads((tmp_path / "a.json").read_text())
    (tmp_path / "gone.json").write_text(
        json.dumps({**valid, "backend": "gone"})
    )  # removed from the state
    (tmp_path / "b2.json").write_text(json.dumps({**valid, "backend": "b"}))  # named after another
    (tmp_path / "c.json").write_text(json.dumps({"version": 1, "backend": "c", "action": "delete", "id": "x",
                                                 "requested_at": 1, "requested_by": "eve"}))  # fmt: skip
    (tmp_path / ".a.json.123.tmp").write_text("half")  # a writer's temporary file
    requests, problems = read_requests(tmp_path, ["a", "b", "c"])
    assert list(requests) == ["a"]
    text = "\n".join(problems)
    assert str(tmp_path / "b.json") in text and "remove the file" in text
    assert (
        "backend 'gone' is not in the desired state" in text
        and "action one of drain, restart" in text
    )
    assert "b2.json: names backend 'b'" in text
    assert len(problems) == 4
    with pytest.raises(ValueError, match="not one of"):
        write_request(tmp_path, "a", "delete", "eve")  # type: ignore[arg-type]


def test_no_directory_is_no_request(tmp_path):
    assert read_requests(tmp_path / "missing", ["a"]) == ({}, [])


def test_the_directory_follows_the_state_dir_unless_set(tmp_path, monkeypatch):
    monkeypatch.delenv("TF_ADMIN_REQUESTS_DIR", raising=False)
    assert admin_requests_dir(tmp_path) == tmp_path / "admin-requests"
    monkeypatch.setenv("TF_ADMIN_REQUESTS_DIR", str(tmp_path / "elsewhere"))
    assert admin_requests_dir(tmp_path) == tmp_path / "elsewhere"


def requested(desired: dict, backend: str, requests_dir) -> dict:
    """The desired units with the backend's request folded in, as the controller does."""
    requests, _ = read_requests(requests_dir, [k.removeprefix("backend-") for k in desired])
    unit = f"backend-{backend}"
    return {
        **desired,
        unit: replace(desired[unit], **request_fields(requests.get(backend))),
    }, requests


def test_a_restart_request_drains_first_then_restarts_with_its_reason(tmp_path):
    desired, observed = running("a", "b")
    desired = {n: replace(u, drain=True) for n, u in desired.items()}
    observed = {n: replace(o, health=Health.HEALTHY) for n, o in observed.items()}
    write_request(tmp_path, "a", "restart", "alice")
    desired, requests = requested(desired, "a", tmp_path)
    (drain,) = plan(desired, observed, 0.0)  # like any restart of a routed backend
    assert drain.kind is ActionKind.DRAIN and drain.unit == "backend-a"
    assert "restart requested through the admin API by alice" in drain.reason
    assert satisfied([drain], requests) == []  # not done yet: the file stays
    observed["backend-a"] = replace(observed["backend-a"], drain=DrainState(True, "drained"))
    (restart,) = plan(desired, observed, 0.0)
    assert restart.kind is ActionKind.RESTART and "alice" in restart.reason
    (done,) = satisfied([restart], requests)
    finish(tmp_path, done)
    assert read_requests(tmp_path, ["a", "b"])[0] == {}


def test_a_restart_request_adds_nothing_to_a_unit_already_changing_or_not_running(tmp_path):
    desired, observed = running("a", "b")
    desired["backend-a"] = DesiredUnit("backend-a", "argv a --new\n", group="m")  # a rolling change
    observed["backend-b"] = ObservedUnit("backend-b", "argv b\n", active=False)  # not running
    for name in ("a", "b"):
        write_request(tmp_path, name, "restart", "alice")
    plain = plan(desired, observed, 0.0)
    desired, requests = requested(desired, "a", tmp_path)
    desired, requests = requested(desired, "b", tmp_path)
    actions = plan(desired, observed, 0.0)
    assert actions == plain  # a's own restart and b's start serve the requests
    assert sorted(r.backend for r in satisfied(actions, requests)) == ["a", "b"]


def test_a_drain_request_keeps_a_running_backend_out_of_routing_until_withdrawn(tmp_path):
    desired, observed = running("a")
    desired = {n: replace(u, drain=True) for n, u in desired.items()}
    write_request(tmp_path, "a", "drain", "alice")
    held, _ = requested(desired, "a", tmp_path)
    (mark,) = plan(held, observed, 0.0)
    assert (
        mark.kind is ActionKind.DRAIN
        and "drain requested through the admin API by alice" in mark.reason
    )
    marked = {"backend-a": replace(observed["backend-a"], drain=DrainState(True, "drained"))}
    assert plan(held, marked, 0.0) == []  # held out, still running: nothing to stop, no undrain
    withdraw(tmp_path, "a", "drain")
    released, _ = requested(desired, "a", tmp_path)
    (undrain,) = plan(released, marked, 0.0)
    assert undrain.kind is ActionKind.UNDRAIN
