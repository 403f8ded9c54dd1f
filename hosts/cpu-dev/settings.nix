# cpu-dev: a developer box without a GPU, serving SmolLM2-135M through llama.cpp.
# services.tensorforge.settings as plain data, in the schema's keys (see ./default.nix for the
# NixOS side); hosts/cpu-dev.yaml is the same desired state, commented key by key.
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
    context_size = 4096;
    parallel = 2;
    # One thread per server was measured faster and stall-free on 2 shared cores.
    threads = 1;
  };
  gateway = {
    host = "0.0.0.0";
    port = 8000;
  };
}
