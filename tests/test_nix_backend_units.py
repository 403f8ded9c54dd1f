"""On NixOS each backend is its own hardened systemd unit.

The module runs the reconciler with the systemd driver and TF_UNIT_DIR=/run/systemd/system
(NixOS owns /etc/systemd/system); the reconciler renders each backend from templates/ there.
This takes the desired state the module produces under the real `lib.evalModules`
(tests/test_nix_module_eval.py's harness), renders its units with `tensorforge render` as the
reconciler would, and checks each backend unit: its name, its GPU device allow-list, the
driver's library path, and `systemd-analyze security --offline=yes` exposure <= 1.6. It also
checks that the NixOS-declared units and the rendered ones take their sandboxing from one file,
templates/hardening.json."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from reconciler.drivers.systemd import SystemdDriver
from tests.test_nix_module_eval import NIX, NIXPKGS_LIB, SNIPPET, UNFREE, evaluate, host, module

REPO = Path(__file__).resolve().parent.parent
HARDENING = json.loads((REPO / "templates" / "hardening.json").read_text())
B200_INVENTORY = REPO / "hosts" / "inventories" / "b200-8x192gb.json"
MAX_EXPOSURE = 1.6

needs_module_eval = pytest.mark.skipif(
    NIX is None or not NIXPKGS_LIB or not Path(NIXPKGS_LIB).is_dir(),
    reason="needs nix-instantiate and NIXPKGS_LIB (nix-community/nixpkgs.lib)",
)
needs_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed"
)


def render(desired: dict, tmp_path: Path, gpus_from: Path | None = None) -> dict[str, str]:
    """`tensorforge render`: unit file name -> text, as the reconciler would write them."""
    config = tmp_path / "desired.json"
    config.write_text(json.dumps(desired))
    out = tmp_path / "units"
    cli = REPO / ".venv" / "bin" / "tensorforge"
    command = [
        str(cli) if cli.exists() else "tensorforge",
        "render",
        "--config",
        str(config),
        "--out",
        str(out),
    ]
    if gpus_from:
        command += ["--gpus-from", str(gpus_from)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return {p.name: p.read_text() for p in out.glob("*.service")}


def exposure(path: Path) -> float:
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--no-pager", str(path)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d)", result.stdout + result.stderr)
    assert match, result.stdout + result.stderr
    return float(match.group(1))


def settings(text: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            found.setdefault(key, []).append(value)
    return found


CASES = {
    # cpu-dev: llama.cpp on CPU. The snippet: vLLM on 4 GPUs and llama.cpp on one.
    "cpu-dev": (lambda: host("cpu-dev"), None),
    "snippet": (lambda: module(SNIPPET), B200_INVENTORY),
}


@needs_module_eval
@needs_analyze
@pytest.mark.parametrize("case", sorted(CASES))
def test_each_backend_is_its_own_hardened_unit(case: str, tmp_path: Path):
    configuration, inventory = CASES[case]
    report, _ = evaluate(configuration(), UNFREE)
    desired = report["desired"]
    units = render(desired, tmp_path, inventory)
    local = [name for name, b in desired["backends"].items() if "url" not in b]
    assert local
    for name in local:
        unit = f"tensorforge-backend-{name}.service"
        assert unit in units, f"no unit for backend {name}: {sorted(units)}"
        text = units[unit]
        values = settings(text)
        backend = desired["backends"][name]
        gpu = backend["kind"] in ("vllm", "tgi") or backend.get("gpus", 0) > 0
        assert values["DynamicUser"] == ["yes"] and values["Restart"] == ["on-failure"]
        assert values["ExecStart"][0].startswith(backend["binary"]), "the NixOS package's server"
        if gpu:
            assert values["PrivateDevices"] == ["no"] and values["DevicePolicy"] == ["closed"]
            assert "char-nvidia-frontend rw" in values["DeviceAllow"]
            assert any("CUDA_VISIBLE_DEVICES=" in e for e in values["Environment"])
            assert any("LD_LIBRARY_PATH=/run/opengl-driver/lib" in e for e in values["Environment"])
        else:
            assert values["PrivateDevices"] == ["yes"] and "DeviceAllow" not in values
        path = tmp_path / unit
        path.write_text(text)
        score = exposure(path)
        assert score <= MAX_EXPOSURE, f"{unit}: exposure {score} > {MAX_EXPOSURE}"


@needs_module_eval
def test_the_reconciler_runs_backends_as_runtime_units_under_systemd():
    report, stderr = evaluate(host("cpu-dev"))
    reconciler = report["services"]["tensorforge-reconciler"]
    env = reconciler["environment"]
    assert env["TF_DRIVER"] == "systemd" and env["TF_UNIT_DIR"] == "/run/systemd/system"
    config = reconciler["serviceConfig"]
    assert "/run/systemd/system" in config["ReadWritePaths"]
    assert "DynamicUser" not in config and "User" not in config, "root: it writes units"
    assert not reconciler["path"], "backends are not its children: no server on its PATH"


@needs_module_eval
def test_nixos_units_take_their_sandboxing_from_templates_hardening_json():
    """One definition: the gateway, GPU exporter and reconciler that NixOS declares carry
    exactly the settings the rendered units get from the same file."""
    report, _ = evaluate(module(SNIPPET), UNFREE)
    services = report["services"]
    expected = {
        "tensorforge-gateway": {**HARDENING["service"], **HARDENING["cpu"]},
        "tensorforge-gpu-exporter": {**HARDENING["service"], **HARDENING["gpu"]},
        "tensorforge-reconciler": HARDENING["reconciler"],
    }
    for name, wanted in expected.items():
        config = services[name]["serviceConfig"]
        for key, value in wanted.items():
            assert config.get(key) == value, f"{name}.{key}: {config.get(key)!r} != {value!r}"


def test_unit_dir_comes_from_tf_unit_dir(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("TF_UNIT_DIR", str(tmp_path / "run-units"))
    assert SystemdDriver(state_dir=tmp_path).unit_dir == tmp_path / "run-units"
    assert (
        SystemdDriver(tmp_path / "explicit", state_dir=tmp_path).unit_dir == tmp_path / "explicit"
    )
    monkeypatch.delenv("TF_UNIT_DIR")
    assert SystemdDriver(state_dir=tmp_path).unit_dir == Path("/etc/systemd/system")


# -- under a real systemd ------------------------------------------------------------------------
# What the NixOS reconciler unit does (TF_DRIVER=systemd, TF_UNIT_DIR=/run/systemd/system),
# run as a probe inside a booted container by tests/test_systemd_nspawn.py's runner.
NIXOS_PROBE = """\
#!/bin/sh
exec >/out/probe.log 2>&1
set -x
mkdir -p /etc/tensorforge
cp /out/host.yaml /etc/tensorforge/desired.json.yaml
chmod 0644 /etc/tensorforge/desired.json.yaml
for root in {roots}; do
  d=$(dirname "$root")
  while [ "$d" != / ]; do chmod o+x "$d" 2>/dev/null; d=$(dirname "$d"); done
done
cd /
TF_DRIVER=systemd TF_UNIT_DIR=/run/systemd/system timeout 55 {python} -m reconciler.cli apply \\
  --config /etc/tensorforge/desired.json.yaml --timeout 50
echo $? > /out/apply.rc
ls /run/systemd/system/ > /out/run-units.txt
ls /etc/systemd/system/ > /out/etc-units.txt
systemctl status --no-pager tensorforge-backend-smollm2.service > /out/status.txt 2>&1
echo $? > /out/status.rc
systemctl show -p FragmentPath,ActiveState,DynamicUser,ControlGroup tensorforge-backend-smollm2.service > /out/show.txt
pid=$(systemctl show -p MainPID --value tensorforge-backend-smollm2.service)
cat /proc/$pid/cgroup > /out/cgroup.txt
curl -sf http://127.0.0.1:{backend_port}/health > /out/health.txt
journalctl --no-pager -u tensorforge-backend-smollm2.service > /out/journal.txt 2>&1
systemd-analyze security --no-pager tensorforge-backend-smollm2.service > /out/security.txt 2>&1
"""


@pytest.mark.slow
def test_runtime_backend_unit_under_real_systemd(tmp_path: Path, smollm2_path: Path, monkeypatch):
    import tests.test_systemd_nspawn as nspawn

    reason = nspawn._nspawn_unavailable()
    if reason:
        pytest.skip(reason)
    without_gateway = nspawn._host_yaml(smollm2_path, 18090, 18091) + "  enable: false\n"
    monkeypatch.setattr(nspawn, "PROBE_SCRIPT", NIXOS_PROBE)
    monkeypatch.setattr(nspawn, "_host_yaml", lambda *_: without_gateway)
    out = tmp_path / "out"
    out.mkdir()
    result = nspawn.run_in_nspawn(out, smollm2_path)
    if not (out / "probe.log").exists():
        if any(words in result.stderr for words in nspawn.ENVIRONMENT_FAILURES):
            pytest.skip(
                f"systemd-nspawn cannot boot a container here: {result.stderr.strip()[-300:]}"
            )
        pytest.fail(
            f"the probe never ran (nspawn exit {result.returncode}):\n{result.stderr[-2000:]}"
        )
    context = "\n".join(
        f"--- {name}\n{(out / name).read_text()[-2000:]}"
        for name in ("probe.log", "status.txt", "journal.txt")
        if (out / name).exists()
    )
    assert (out / "apply.rc").read_text().strip() == "0", context
    # A runtime unit: in /run/systemd/system, nothing written to /etc/systemd/system.
    assert "tensorforge-backend-smollm2.service" in (out / "run-units.txt").read_text(), context
    assert "tensorforge-backend" not in (out / "etc-units.txt").read_text(), context
    assert (out / "status.rc").read_text().strip() == "0", context
    show = (out / "show.txt").read_text()
    assert "FragmentPath=/run/systemd/system/tensorforge-backend-smollm2.service" in show, show
    assert "ActiveState=active" in show and "DynamicUser=yes" in show, show
    # Its own cgroup, its own journal, and it serves.
    assert "tensorforge-backend-smollm2.service" in (out / "cgroup.txt").read_text(), context
    assert '"status":"ok"' in (out / "health.txt").read_text().replace(" ", ""), context
    assert (out / "journal.txt").read_text().count("\n") > 1, context
    score = re.search(
        r"Overall exposure level for \S+: (\d+\.\d)", (out / "security.txt").read_text()
    )
    assert score and float(score.group(1)) <= MAX_EXPOSURE, (out / "security.txt").read_text()
