# The pure half of the NixOS module (builtins only): what `scripts/eval-desired.sh` evaluates
# and what the module itself uses to write /etc/tensorforge/desired.json.
let
  desired = import ./desired.nix;
  presets = import ./presets.nix;
  scrape = import ./scrape.nix;
in
{
  inherit (desired) toDesired toSnake fromOptions fields;
  inherit (presets) applyPresets b200Flags;
  presets = presets.b200;
  # The backends and models `b200Optimized.{vllm,llamacpp}.enable` declare.
  presetCatalogue = { inherit (presets) models backends backendFor; };
  defaults = import ./defaults.nix;
  # desired state -> Prometheus scrape_configs, as reconciler/monitoring/prometheus.py makes them.
  inherit (scrape) scrapeConfigs withoutMetrics;

  # hosts/<name>/settings.nix -> the desired-state attrset (JSON-ready).
  evalHost = settings: desired.toDesired (presets.applyPresets settings);
}
