# cpu-dev: a developer box without a GPU, serving SmolLM2-135M through llama.cpp.
# Plain data in the shape of services.tensorforge (see ./default.nix for the NixOS side).
{
  host = "cpu-dev";
  models = {
    inherit (import ../models.nix) smollm2;
  };
  backends.smollm2-cpu = {
    kind = "llamacpp";
    model = "smollm2";
    # Reachable from gateway-only; the NixOS config opens the port.
    host = "0.0.0.0";
    port = 8080;
    contextSize = 4096;
    parallel = 2;
    # One thread per server was measured faster and stall-free on 2 shared cores.
    threads = 1;
  };
  gateway = {
    host = "0.0.0.0";
    port = 8000;
  };
}
