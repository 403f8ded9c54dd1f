# Two nodes: `backend` runs llama.cpp only (no gateway), `gateway` routes to it by url. When
# the backend node goes down the gateway says so (unhealthy, a 5xx answer instead of a hang);
# when it comes back, requests are answered again without touching the gateway.
{ self }:
{
  name = "tensorforge-two-node";

  nodes.backend = import ./common.nix {
    inherit self;
    backendHost = "0.0.0.0";
    gateway = false;
  };
  nodes.gateway = import ./common.nix {
    inherit self;
    localBackend = false;
    remoteBackendUrl = "http://backend:8080";
  };

  testScript = ''
    import json

    HEALTH = "curl -sf http://127.0.0.1:8000/health"
    CHAT_ARGS = (
        "--max-time 120 http://127.0.0.1:8000/v1/chat/completions "
        "-H 'content-type: application/json' "
        """-d '{"model": "smollm2", "max_tokens": 8, """
        """"messages": [{"role": "user", "content": "Hi"}]}'"""
    )

    start_all()
    backend.wait_for_unit("tensorforge-reconciler.service")
    backend.wait_until_succeeds("curl -sf http://127.0.0.1:8080/health", timeout=300)
    backend.succeed("systemctl status tensorforge-backend-smollm2-cpu.service")
    gateway.wait_for_unit("tensorforge-gateway.service")

    with subtest("the gateway node runs no reconciler: it has no local backends"):
        gateway.fail("systemctl cat tensorforge-reconciler.service")
        backend.fail("systemctl cat tensorforge-gateway.service")

    with subtest("requests reach the backend node through the gateway"):
        gateway.wait_until_succeeds(
            f"{HEALTH} | jq -e '.backends[\"smollm2-cpu\"].healthy == true'", timeout=120
        )
        answer = json.loads(gateway.succeed(f"curl -sf {CHAT_ARGS}"))
        assert answer["choices"][0]["message"]["content"].strip(), answer

    with subtest("the backend node goes down: unhealthy, and a prompt error, not a hang"):
        backend.crash()
        # No -f: a gateway may answer /health with 503 when nothing is healthy.
        gateway.wait_until_succeeds(
            "curl -s http://127.0.0.1:8000/health"
            " | jq -e '.backends[\"smollm2-cpu\"].healthy == false'",
            timeout=60,
        )
        code = gateway.succeed(f"curl -s -o /dev/null -w '%{{http_code}}' {CHAT_ARGS}").strip()
        assert code.startswith("5"), f"expected a 5xx from the gateway, got {code}"
        gateway.succeed("systemctl is-active tensorforge-gateway.service")

    with subtest("the backend node comes back: served again, the gateway never restarted"):
        backend.start()
        backend.wait_for_unit("tensorforge-reconciler.service")
        backend.wait_until_succeeds("curl -sf http://127.0.0.1:8080/health", timeout=300)
        gateway.wait_until_succeeds(f"curl -sf {CHAT_ARGS}", timeout=120)
        gateway.succeed("systemctl show -p NRestarts tensorforge-gateway | grep -qx NRestarts=0")
  '';
}
