# The few schema defaults NixOS itself reads to wire the host (builtins only): which units run,
# which ports the firewall opens, where Prometheus scrapes, which backends get a GPU. Nothing
# here is written to desired.json: a setting left out is left to reconciler/config/schema.py.
# tests/test_nix_contract.py checks every value against the schema.
{
  backend = {
    host = "127.0.0.1";
    gpus = null;
    tensor_parallel_size = 1;
  };
  gateway = {
    enable = true;
    host = "127.0.0.1";
    port = 8000;
  };
  monitoring = {
    enable = false;
    listen_address = "127.0.0.1";
    reconciler_metrics_port = 9310;
    gpu_exporter_port = 9311;
    scrape_interval = "15s";
  };
}
