# gateway-only: one OpenAI-compatible endpoint for the fleet; no local backends. Every backend
# is declared by `url` (its port is the URL's) and runs on b200-node or cpu-dev; this host only
# routes to them.
{
  host = "gateway-only";
  models = import ../models.nix;
  backends = {
    b200-qwen3-a = {
      kind = "vllm";
      model = "qwen3-235b";
      url = "http://b200-node:8001";
    };
    b200-qwen3-b = {
      kind = "vllm";
      model = "qwen3-235b";
      url = "http://b200-node:8002";
    };
    cpu-dev-smollm2 = {
      kind = "llamacpp";
      model = "smollm2";
      url = "http://cpu-dev:8080";
    };
  };
  gateway = {
    host = "0.0.0.0";
    port = 8000;
    routing = {
      strategy = "cache-aware";
      # When both B200 replicas are down, answer from the small model rather than fail.
      fallbacks.qwen3-235b = [ "smollm2" ];
    };
  };
}
