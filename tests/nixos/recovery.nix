# A killed backend comes back: SIGKILL llama.cpp, and its own unit (tensorforge-backend-
# smollm2-cpu, run by systemd, watched by the reconciler) is running and healthy again (new
# pid, restart counted) without the reconciler service restarting.
# Then a changed setting, switched to at run time (a specialisation), rolls the backend: the
# reconciler is reloaded, marks the backend in /run/tensorforge/drain, the gateway (another
# DynamicUser) takes it out of routing, and only then is it restarted.
{ self }:
{
  name = "tensorforge-recovery";

  nodes.machine =
    { lib, ... }:
    {
      imports = [ (import ./common.nix { inherit self; }) ];
      specialisation.smaller-context.configuration = {
        services.tensorforge.settings.backends.smollm2-cpu.context_size = lib.mkForce 1024;
      };
    };

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
        machine.succeed("systemctl is-active tensorforge-backend-smollm2-cpu.service")

    with subtest("requests are answered again, and the reconciler itself never restarted"):
        machine.wait_until_succeeds("curl -sf http://127.0.0.1:8080/health", timeout=120)
        chat()
        machine.succeed("systemctl show -p NRestarts tensorforge-reconciler | grep -qx NRestarts=0")

    with subtest("a changed setting rolls the backend, drained through the gateway first"):
        old = backend()["pid"]
        machine.succeed("/run/booted-system/specialisation/smaller-context/bin/switch-to-configuration test")
        machine.wait_until_succeeds(
            "journalctl -u tensorforge-reconciler.service | grep -q 'drained smollm2-cpu'", timeout=120
        )
        machine.fail("journalctl -u tensorforge-reconciler.service | grep -q 'did not take smollm2-cpu'")
        machine.succeed('test "$(stat -c %a /run/tensorforge)" = 755')
        machine.wait_until_succeeds(
            f"{STATUS} | jq -e '.units[] | select(.unit == \"{UNIT}\")"
            f" | .pid != null and .pid != {old} and .health == \"healthy\"'",
            timeout=300,
        )
        machine.succeed("test -z \"$(ls /run/tensorforge/drain)\"")  # the mark is gone again
        chat()
  '';
}
