# The reconciler brings a killed backend back: SIGKILL llama.cpp, and the same unit is running
# and healthy again (new pid, restart counted) without the reconciler service restarting.
{ self }:
{
  name = "tensorforge-recovery";

  nodes.machine = import ./common.nix { inherit self; };

  testScript = ''
    import json

    STATUS = "cat /var/lib/tensorforge/status.json"
    UNIT = "backend-smollm2-cpu"

    def backend():
        units = json.loads(machine.succeed(STATUS))["units"]
        return next(u for u in units if u["unit"] == UNIT)

    def chat():
        return machine.succeed(
            "curl -sf --max-time 120 http://127.0.0.1:8000/v1/chat/completions "
            "-H 'content-type: application/json' "
            """-d '{"model": "smollm2", "max_tokens": 8, """
            """"messages": [{"role": "user", "content": "Hi"}]}'"""
        )

    machine.wait_for_unit("tensorforge-reconciler.service")
    machine.wait_until_succeeds("curl -sf http://127.0.0.1:8080/health", timeout=300)
    machine.wait_until_succeeds(f"{STATUS} | jq -e '.units[] | select(.unit == \"{UNIT}\") | .pid'")
    chat()

    before = backend()
    pid = before["pid"]

    with subtest("a killed backend is restarted by the reconciler"):
        machine.succeed(f"kill -KILL {pid}")
        machine.wait_until_fails(f"kill -0 {pid}", timeout=30)
        machine.wait_until_succeeds(
            f"{STATUS} | jq -e '.units[] | select(.unit == \"{UNIT}\")"
            f" | .pid != null and .pid != {pid} and .health == \"healthy\"'",
            timeout=300,
        )
        after = backend()
        assert after["restarts"] > before["restarts"], (before, after)

    with subtest("requests are answered again, and the reconciler itself never restarted"):
        machine.wait_until_succeeds("curl -sf http://127.0.0.1:8080/health", timeout=120)
        chat()
        machine.succeed("systemctl show -p NRestarts tensorforge-reconciler | grep -qx NRestarts=0")
  '';
}
