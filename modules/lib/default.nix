# The pure half of the NixOS module (builtins only): what `scripts/eval-desired.sh` evaluates
# and what the module itself uses to write /etc/tensorforge/desired.json.
let
  desired = import ./desired.nix;
  defaults = import ./defaults.nix;
  scrape = import ./scrape.nix;
  # The backend kinds (reconciler/backends/registry.py's table, generated; a test keeps it in sync).
  kinds = builtins.fromJSON (builtins.readFile ./kinds.json);
  num = v: fallback: if builtins.isInt v || builtins.isFloat v then v else fallback;
in
{
  inherit (desired) toDesired toSnake;
  inherit defaults kinds;
  # The b200Optimized values, models and backends.
  presets = import ./presets.nix;
  # desired state -> Prometheus scrape_configs, as reconciler/monitoring/prometheus.py makes them.
  inherit (scrape) scrapeConfigs withoutMetrics;

  # As the schema's gpus_wanted > 0: pinned GPUs; else gpus (and the shards with it), and
  # with gpus unset, the kinds that shard (vllm, tgi) take a GPU per shard (gpus = 0 runs them
  # on CPU).
  # A value of the wrong type counts as unset here; `tensorforge validate` refuses it.
  wantsGpu =
    b:
    let
      gpus = b.gpus or null;
    in
    (b.gpu_ids or null) != null
    || (
      if builtins.isInt gpus then
        gpus > 0
      else
        builtins.isString (b.kind or null)
        && (kinds.${b.kind}.shards or false)
        && num (b.tensor_parallel_size or null) defaults.backend.tensor_parallel_size > 0
    );

  # hosts/<name>/settings.nix (services.tensorforge.settings as plain data) -> desired state.
  evalHost = desired.toDesired;
}
