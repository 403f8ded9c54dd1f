# The pure half of the NixOS module (builtins only): what `scripts/eval-desired.sh` evaluates
# and what the module itself uses to write /etc/tensorforge/desired.json.
let
  desired = import ./desired.nix;
  defaults = import ./defaults.nix;
  scrape = import ./scrape.nix;
  num = v: fallback: if builtins.isInt v || builtins.isFloat v then v else fallback;
in
{
  inherit (desired) toDesired toSnake;
  inherit defaults;
  # The b200Optimized values, models and backends.
  presets = import ./presets.nix;
  # desired state -> Prometheus scrape_configs, as reconciler/monitoring/prometheus.py makes them.
  inherit (scrape) scrapeConfigs withoutMetrics;

  # As the schema's gpus_wanted > 0: vllm and tgi take a GPU per shard even with gpus = 0.
  # A value of the wrong type counts as its default here; `tensorforge validate` refuses it.
  wantsGpu =
    b:
    num (b.gpus or null) defaults.backend.gpus > 0
    || (b.gpu_ids or null) != null
    || num (b.tensor_parallel_size or null) defaults.backend.tensor_parallel_size > 1
    || builtins.elem (b.kind or null) [ "vllm" "tgi" ];

  # hosts/<name>/settings.nix (services.tensorforge.settings as plain data) -> desired state.
  evalHost = desired.toDesired;
}
