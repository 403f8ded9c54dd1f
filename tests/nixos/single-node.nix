# One CPU node: the reconciler starts llama.cpp with SmolLM2, the gateway answers a chat
# completion through it, and the generated desired state passes `tensorforge validate`.
{ self }:
{
  name = "tensorforge-single-node";

  nodes.machine = import ./common.nix { inherit self; };

  testScript = ''
    import json

    CHAT = (
        "curl -sf --max-time 120 http://127.0.0.1:8000/v1/chat/completions "
        "-H 'content-type: application/json' "
        """-d '{"model": "smollm2", "max_tokens": 16, """
        """"messages": [{"role": "user", "content": "Say hello."}]}'"""
    )

    machine.wait_for_unit("tensorforge-reconciler.service")
    machine.wait_for_unit("tensorforge-gateway.service")

    with subtest("the generated desired state is valid"):
        machine.succeed("tensorforge validate --config /etc/tensorforge/desired.json")
        machine.fail("test -e /etc/tensorforge/reconciler.json")
        # One file for both services; the reconciler leaves the gateway to its own unit.
        machine.succeed("systemctl show -p ExecStart tensorforge-reconciler | grep -q -- --no-gateway")
        desired = json.loads(machine.succeed("cat /etc/tensorforge/desired.json"))
        assert desired["backends"]["smollm2-cpu"]["binary"].endswith("/bin/llama-server"), desired

    with subtest("llama.cpp comes up as its own unit, rendered by the reconciler"):
        machine.wait_until_succeeds("curl -sf http://127.0.0.1:8080/health", timeout=300)
        machine.succeed("systemctl status tensorforge-backend-smollm2-cpu.service")
        # A runtime unit from templates/: NixOS owns /etc/systemd/system.
        machine.succeed("test -f /run/systemd/system/tensorforge-backend-smollm2-cpu.service")
        machine.succeed("systemctl show -p DynamicUser tensorforge-backend-smollm2-cpu | grep -qx DynamicUser=yes")
        # Its own cgroup and journal: the server's pid is not the reconciler's child.
        pid = machine.succeed("systemctl show -p MainPID --value tensorforge-backend-smollm2-cpu").strip()
        machine.succeed(f"grep -q tensorforge-backend-smollm2-cpu.service /proc/{pid}/cgroup")
        machine.wait_until_succeeds("journalctl -u tensorforge-backend-smollm2-cpu.service | grep -q .")
        score = machine.succeed(
            "systemd-analyze security --no-pager tensorforge-backend-smollm2-cpu.service"
            " | sed -n 's/.*Overall exposure level for [^:]*: \\([0-9.]*\\).*/\\1/p'"
        ).strip()
        assert float(score) <= 1.6, f"exposure {score}"

    with subtest("the gateway sees it healthy and answers a chat request"):
        machine.wait_until_succeeds(
            "curl -sf http://127.0.0.1:8000/health"
            " | jq -e '.backends[\"smollm2-cpu\"].healthy == true'",
            timeout=120,
        )
        answer = json.loads(machine.succeed(CHAT))
        text = answer["choices"][0]["message"]["content"]
        assert text.strip(), answer
        assert answer["usage"]["completion_tokens"] > 0, answer
        # A model alias reaches the same backend.
        machine.succeed(CHAT.replace('"smollm2"', '"smollm2-135m"'))

    with subtest("the gateway runs without GPU devices and as an unprivileged user"):
        machine.succeed("systemctl show -p DynamicUser tensorforge-gateway | grep -q yes")
        machine.succeed("systemctl show -p PrivateDevices tensorforge-gateway | grep -q yes")
        print(machine.succeed("systemd-analyze security tensorforge-gateway.service | tail -1"))
        print(machine.succeed("systemd-analyze security tensorforge-reconciler.service | tail -1"))
  '';
}
