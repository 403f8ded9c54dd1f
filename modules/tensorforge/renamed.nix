# The module's old camelCase options whose value has the same shape under `settings`: each is
# an mkRenamedOptionModule to the schema's key, so a configuration that still sets it keeps
# working and is told the new name once. (Backends, which mixed schema keys with NixOS-only
# options, are translated in ./backend.nix.)
{ lib }:
let
  toSnake = (import ../lib).toSnake;
  tf = [ "services" "tensorforge" ];
  rename = from: to: lib.mkRenamedOptionModule (tf ++ from) (tf ++ [ "settings" ] ++ to);
  same = path: rename path (map toSnake path);
in
map same [
  [ "host" ]
  [ "models" ]
  [ "gateway" "enable" ]
  [ "gateway" "host" ]
  [ "gateway" "port" ]
  [ "gateway" "maxBodyBytes" ]
  [ "gateway" "connectTimeout" ]
  [ "gateway" "firstByteTimeout" ]
  [ "gateway" "idleTimeout" ]
  [ "gateway" "maxConcurrencyPerBackend" ]
  [ "gateway" "maxConcurrencyPerKey" ]
  [ "gateway" "healthInterval" ]
  [ "gateway" "routing" "strategy" ]
  [ "gateway" "routing" "loadThreshold" ]
  [ "gateway" "routing" "affinityHeader" ]
  [ "gateway" "routing" "fallbacks" ]
  [ "monitoring" "enable" ]
  [ "monitoring" "listenAddress" ]
  [ "monitoring" "reconcilerMetricsPort" ]
  [ "monitoring" "gpuExporterPort" ]
  [ "monitoring" "scrapeInterval" ]
]
++ [
  # Renamed twice: straight to where it lives now.
  (rename [ "gateway" "address" ] [ "gateway" "host" ])
  (lib.mkRenamedOptionModule (tf ++ [ "gateway" "apiKeyFile" ]) (tf ++ [ "gateway" "apiKeysFile" ]))
  (lib.mkRemovedOptionModule (
    tf ++ [ "dataDir" ]
  ) "Use `services.tensorforge.stateDir` (state) and `services.tensorforge.modelsDir` (models).")
]
