# The desired-state keys the module writes, per section, in the module's camelCase: the
# explicit list `toDesired` picks from option values. Option sets also hold what is not a
# setting (renamed-option aliases such as `gateway.address`, NixOS-only options such as
# `openFirewall` and `package`, the module system's `_module`); reading a whole set copied
# them into desired.json, where the schema refuses them, and forced the aliases' "Obsolete
# option" trace. tests/test_nix_contract.py keeps these lists equal to reconciler/config/schema.py.
{
  top = [ "host" "stateDir" "modelsDir" "models" "backends" "gateway" "monitoring" ];
  model = [ "source" "file" "pattern" "sha256" "revision" "aliases" "format" ];
  backend = [
    "kind" "model" "host" "port" "url" "protocol" "apiKeyFile" "gpus" "gpuIds" "contextSize"
    "parallel" "threads" "tensorParallelSize" "flashAttn" "quantization" "kvCacheDtype"
    "gpuMemoryUtilization" "maxLoadedModels" "binary" "extraArgs" "environment"
    "healthTimeout" "drainTimeout"
  ];
  gateway = [
    "enable" "host" "port" "apiKeysFile" "routing" "maxBodyBytes" "connectTimeout"
    "firstByteTimeout" "idleTimeout" "maxConcurrencyPerBackend" "maxConcurrencyPerKey"
    "healthInterval"
  ];
  routing = [ "strategy" "affinityHeader" "loadThreshold" "fallbacks" ];
  monitoring = [ "enable" "listenAddress" "reconcilerMetricsPort" "gpuExporterPort" "scrapeInterval" "scrapeKeyFile" ];
}
