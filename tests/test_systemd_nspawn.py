"""`tensorforge apply` under a real systemd: boot the host's own OS tree in systemd-nspawn
(volatile root, private network), let a probe unit apply a desired state with the systemd
driver, and check that the llama.cpp backend and the gateway answer a chat request.

Recipe from ../shared/README.md: a private mount namespace (`unshare -m`), a tmpfs on
/run/systemd/nspawn, `--volatile=yes` so nothing the container does reaches the host, and
cleanup of the empty cgroups nspawn leaves. The host /sys is never mounted read-write."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow

# Deadlines, not speed goals: generous enough for a machine with both cores busy.
BOOT_TIMEOUT = 330  # seconds for the whole container run
PROBE_UNIT = "tf-probe.service"


def _nspawn_unavailable() -> str | None:
    if sys.platform != "linux":
        return "systemd-nspawn needs Linux"
    if os.geteuid() != 0:
        return "systemd-nspawn needs root"
    for tool in ("systemd-nspawn", "unshare", "mount"):
        if shutil.which(tool) is None:
            return f"{tool} not installed (apt-get install systemd-container)"
    if not Path("/lib/systemd/systemd").exists():
        return "no systemd in this OS tree to boot"
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"cannot create a mount namespace here: {probe.stderr.strip()}"
    return None


# nspawn's own words when the machine (not our code) keeps a container from booting.
ENVIRONMENT_FAILURES = ("cgroup", "Operation not permitted", "not supported", "Permission denied")


PROBE_SCRIPT = """\
#!/bin/sh
# Runs inside the container as the probe unit: apply, ask the gateway, report, power off.
exec >/out/probe.log 2>&1
set -x
mkdir -p /etc/tensorforge
cp /out/host.yaml /etc/tensorforge/host.yaml
chmod 0644 /etc/tensorforge/host.yaml
# The checkout or the venv's interpreter may live in root's home (pyenv); the services' dynamic
# users must be able to reach them. This changes only the container's volatile directories.
for root in {roots}; do
  d=$(dirname "$root")
  while [ "$d" != / ]; do chmod o+x "$d" 2>/dev/null; d=$(dirname "$d"); done
done
cd /
timeout 130 {python} -m reconciler.cli apply --config /etc/tensorforge/host.yaml \\
  --driver systemd --timeout 120
echo $? > /out/apply.rc
{python} - <<'EOF' > /out/chat.json
import json, httpx
r = httpx.post("http://127.0.0.1:{gateway_port}/v1/chat/completions", timeout=30, json={{
    "model": "smollm2", "max_tokens": 8,
    "messages": [{{"role": "user", "content": "Say hello."}}]}})
print(json.dumps({{"status": r.status_code, "body": r.json()}}))
EOF
{python} -m reconciler.cli plan --config /etc/tensorforge/host.yaml --driver systemd --no-diff \\
  > /out/plan.txt 2>&1
echo $? > /out/plan.rc
{python} -m reconciler.cli apply --config /etc/tensorforge/host.yaml --driver systemd \\
  > /out/apply2.txt 2>&1
echo $? > /out/apply2.rc
pid=$(systemctl show -p MainPID --value tensorforge-backend-smollm2.service)
tr '\\0' '\\n' < /proc/$pid/cmdline > /out/cmdline.txt
# A change that cannot become healthy: the previous unit must come back and keep serving.
cp /etc/systemd/system/tensorforge-backend-smollm2.service /out/before.service
sed 's/health_timeout: 40/health_timeout: 6/; s/extra_args: \\[/extra_args: [--no-such-flag, /' \\
  /etc/tensorforge/host.yaml > /etc/tensorforge/broken.yaml
timeout 75 {python} -m reconciler.cli apply --config /etc/tensorforge/broken.yaml --driver systemd \\
  --timeout 60 > /out/apply3.txt 2>&1
echo $? > /out/apply3.rc
cp /etc/systemd/system/tensorforge-backend-smollm2.service /out/after.service
for i in $(seq 1 40); do
  curl -sf http://127.0.0.1:{backend_port}/health && break
  sleep 0.25
done > /out/health-after.txt
# The reconciler's own unit, as `render` writes it, runs `up` under its sandbox and converges.
{python} -m reconciler.cli render --config /etc/tensorforge/host.yaml --out /etc/systemd/system \\
  > /out/render.txt 2>&1
systemctl daemon-reload
systemctl start tensorforge-reconciler.service
sleep 4
systemctl is-active tensorforge-reconciler.service > /out/reconciler.txt
journalctl --no-pager -u tensorforge-reconciler.service >> /out/reconciler.txt 2>&1
systemctl show -p ActiveState,User,DynamicUser,MainPID tensorforge-backend-smollm2.service \\
  tensorforge-gateway.service > /out/units.txt
systemd-analyze security --no-pager tensorforge-backend-smollm2.service > /out/security.txt 2>&1
journalctl --no-pager -u 'tensorforge-*' > /out/journal.txt 2>&1
"""

PROBE_SERVICE = """\
[Unit]
Description=TensorForge systemd test probe
After=basic.target

[Service]
Type=oneshot
ExecStart=/bin/sh /out/probe.sh
ExecStopPost=/bin/systemctl poweroff --no-block
"""


def _host_yaml(model: Path, backend_port: int, gateway_port: int) -> str:
    return textwrap.dedent(
        f"""\
        version: 1
        models:
          smollm2:
            source: path:{model.parent}
            file: {model.name}
        backends:
          smollm2:
            kind: llamacpp
            model: smollm2
            port: {backend_port}
            context_size: 1024
            parallel: 1
            threads: 1
            health_timeout: 40
            extra_args: ["--alias", 'odd "name" $HOME %n \\ end']
        gateway:
          port: {gateway_port}
        """
    )


def _clean_cgroups() -> None:
    """nspawn leaves empty `payload`/`supervisor` cgroups behind; rmdir only removes empty ones."""
    for root in ("/sys/fs/cgroup/unified", "/sys/fs/cgroup/systemd", "/sys/fs/cgroup"):
        for name in ("payload", "supervisor"):
            top = Path(root) / name
            if not top.is_dir():
                continue
            for directory in sorted(top.rglob("*"), key=lambda p: -len(p.parts)) + [top]:
                if directory.is_dir():
                    try:
                        directory.rmdir()
                    except OSError:
                        pass


def run_in_nspawn(
    out: Path, model: Path, timeout: float = BOOT_TIMEOUT
) -> subprocess.CompletedProcess:
    python = str(REPO / ".venv" / "bin" / "python")
    if not Path(python).exists():
        python = sys.executable
    (out / "host.yaml").write_text(_host_yaml(model, 18090, 18091))
    roots = {REPO, Path(sys.prefix).resolve(), Path(sys.base_prefix).resolve()}
    roots |= {Path(python).resolve().parent.parent, model.parent.resolve()}
    # With --volatile=yes the container has the host's /usr and nothing else of it.
    roots = {r for r in roots if not r.is_relative_to("/usr")}
    (out / "probe.sh").write_text(
        PROBE_SCRIPT.format(
            python=python,
            gateway_port=18091,
            backend_port=18090,
            roots=" ".join(str(r) for r in sorted(roots)),
        )  # fmt: skip
    )
    (out / PROBE_UNIT).write_text(PROBE_SERVICE)
    binds = [f"--bind={out}:/out", f"--bind-ro={out / PROBE_UNIT}:/etc/systemd/system/{PROBE_UNIT}"]
    binds += [f"--bind-ro={path}" for path in sorted(roots)]
    nspawn = [
        "systemd-nspawn", "-D", "/", "--volatile=yes", "--register=no", "--keep-unit",
        "--private-network", "--console=pipe", *binds,
        "-b", "--", f"systemd.wants={PROBE_UNIT}",
    ]  # fmt: skip
    script = (
        "set -e; mount --make-rprivate /; mkdir -p /run/systemd/nspawn; "
        "mount -t tmpfs tmpfs /run/systemd/nspawn; exec timeout --kill-after=5 "
        f"{int(timeout)} " + " ".join(nspawn)
    )
    try:
        return subprocess.run(
            ["unshare", "-m", "sh", "-c", script],
            capture_output=True, text=True, timeout=timeout + 10,
        )  # fmt: skip
    finally:
        _clean_cgroups()


@pytest.mark.timeout(BOOT_TIMEOUT + 60)
def test_apply_under_real_systemd(tmp_path: Path, smollm2_path: Path) -> None:
    reason = _nspawn_unavailable()
    if reason:
        pytest.skip(reason)
    out = tmp_path / "out"
    out.mkdir()
    result = run_in_nspawn(out, smollm2_path)
    if not (out / "probe.log").exists():
        if any(words in result.stderr for words in ENVIRONMENT_FAILURES):
            pytest.skip(
                f"systemd-nspawn cannot boot a container here: {result.stderr.strip()[-300:]}"
            )
        pytest.fail(
            f"the probe never ran (nspawn exit {result.returncode}):\n{result.stderr[-2000:]}"
        )
    context = "\n".join(
        f"--- {name}\n{(out / name).read_text()[-3000:]}"
        for name in ("probe.log", "journal.txt", "units.txt")
        if (out / name).exists()
    )
    assert (out / "apply.rc").read_text().strip() == "0", context
    chat = json.loads((out / "chat.json").read_text())
    assert chat["status"] == 200, context
    assert chat["body"]["choices"][0]["message"]["content"], context
    # A second pass over the same desired state changes nothing.
    assert (out / "plan.rc").read_text().strip() == "0", (out / "plan.txt").read_text()
    assert (out / "apply2.rc").read_text().strip() == "0", (out / "apply2.txt").read_text()
    assert "start" not in (out / "apply2.txt").read_text()
    # systemd parsed the escaped argument back to exactly what was declared.
    assert 'odd "name" $HOME %n \\ end' in (out / "cmdline.txt").read_text().splitlines()
    # The broken change was rolled back: same unit file as before, still serving.
    apply3 = (out / "apply3.txt").read_text()
    assert (out / "apply3.rc").read_text().strip() == "1", apply3
    assert "restored the previous unit file" in apply3, apply3
    # Before systemd restarted the backend, the gateway (a DynamicUser unit of its own, with
    # PrivateUsers) read the reconciler's drain mark and took the backend out of routing.
    assert "drained smollm2" in apply3 and "did not take" not in apply3, apply3
    assert (out / "after.service").read_text() == (out / "before.service").read_text()
    assert '"status":"ok"' in (out / "health-after.txt").read_text().replace(" ", ""), context
    reconciler = (out / "reconciler.txt").read_text()
    assert reconciler.startswith("active\n"), reconciler
    assert "Traceback" not in reconciler and "Failed" not in reconciler, reconciler
    units = (out / "units.txt").read_text()
    assert units.count("ActiveState=active") == 2, units
    assert "DynamicUser=yes" in units, units
