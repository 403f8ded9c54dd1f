# The host's desired state as NixOS resolves it: `services.tensorforge.settings` as written, plus
# what the typed NixOS options contribute (directories, each local backend's server and driver
# path, the secrets' credential paths), and the settings the module reads to wire units,
# firewall and assertions. Everything that writes desired.json or reads a setting reads it here.
{
  lib,
  pkgs,
  cfg,
}:
let
  tfLib = import ../lib;
  d = tfLib.defaults;
  servers = import ./servers.nix { inherit lib pkgs; };

  # The settings NixOS reads to wire the host, with the schema's default when unset. A value
  # of the wrong type counts as unset here; `tensorforge validate` refuses it at build time.
  s = cfg.settings;
  setting =
    check: path: default:
    let
      v = lib.attrByPath path null s;
    in
    if check v then v else default;
  gatewayOn = setting builtins.isBool [ "gateway" "enable" ] d.gateway.enable;
  gatewayPort = setting builtins.isInt [ "gateway" "port" ] d.gateway.port;
  monitoringOn = setting builtins.isBool [ "monitoring" "enable" ] d.monitoring.enable;
  monitoringListen = setting builtins.isString [ "monitoring" "listen_address" ] d.monitoring.listen_address;
  scrapeInterval = setting builtins.isString [ "monitoring" "scrape_interval" ] d.monitoring.scrape_interval;
  monitoringPorts = [
    (setting builtins.isInt [ "monitoring" "reconciler_metrics_port" ] d.monitoring.reconciler_metrics_port)
    (setting builtins.isInt [ "monitoring" "gpu_exporter_port" ] d.monitoring.gpu_exporter_port)
  ];

  managedBackends = lib.filterAttrs (_: b: b.url == null) s.backends;
  # The NixOS options of a backend (services.tensorforge.backends.<name>), or their defaults.
  nixosOf =
    name:
    cfg.backends.${name} or {
      package = null;
      openFirewall = false;
      apiKeyFile = null;
    };
  packageOf =
    name: b:
    let
      chosen = (nixosOf name).package;
    in
    if chosen != null then chosen else servers.packageFor b;

  gatewayCredentials = "/run/credentials/tensorforge-gateway.service";
  backendKeyCredential = name: "backend-key-${name}";

  # What NixOS adds to a backend: the server its package provides, the driver's library path
  # for GPU backends (the reconciler renders their units, which get no NixOS environment), and
  # the key file's path in the gateway's credential store.
  resolveBackend =
    name: b:
    let
      package = packageOf name b;
      local = b.url == null;
      environment = b.environment or { };
    in
    b
    // lib.optionalAttrs (local && package != null && (b.binary or null) == null) {
      binary = servers.binaryOf b.kind package;
    }
    // lib.optionalAttrs (local && tfLib.wantsGpu b && builtins.isAttrs environment) {
      environment = { LD_LIBRARY_PATH = "/run/opengl-driver/lib"; } // environment;
    }
    // lib.optionalAttrs ((nixosOf name).apiKeyFile != null) {
      api_key_file = "${gatewayCredentials}/${backendKeyCredential name}";
    };

  # The desired state: `settings` as written, plus what the typed NixOS options contribute.
  desired = tfLib.toDesired (
    s
    // {
      state_dir = cfg.stateDir;
      models_dir = cfg.modelsDir;
      backends = lib.mapAttrs resolveBackend s.backends;
    }
    // lib.optionalAttrs (cfg.gateway.apiKeysFile != null || cfg.gateway.adminKeysFile != null) {
      # The gateway reads its keys through systemd's credential store (see LoadCredential).
      gateway =
        (s.gateway or { })
        // lib.optionalAttrs (cfg.gateway.apiKeysFile != null) { api_keys_file = "${gatewayCredentials}/api-keys"; }
        // lib.optionalAttrs (cfg.gateway.adminKeysFile != null) { admin_keys_file = "${gatewayCredentials}/admin-keys"; };
    }
    // lib.optionalAttrs (cfg.monitoring.scrapeKeyFile != null) {
      monitoring = (s.monitoring or { }) // { scrape_key_file = cfg.monitoring.scrapeKeyFile; };
    }
  );

  # Settings that NixOS owns through a typed option (it creates the directory, or passes the
  # secret through LoadCredential): set here they would bypass that.
  owned = [
    { path = [ "state_dir" ]; option = "stateDir"; }
    { path = [ "models_dir" ]; option = "modelsDir"; }
    { path = [ "gateway" "api_keys_file" ]; option = "gateway.apiKeysFile"; }
    { path = [ "gateway" "admin_keys_file" ]; option = "gateway.adminKeysFile"; }
    { path = [ "monitoring" "scrape_key_file" ]; option = "monitoring.scrapeKeyFile"; }
  ]
  ++ map (name: {
    path = [ "backends" name "api_key_file" ];
    option = "backends.${name}.apiKeyFile";
  }) (lib.attrNames s.backends);
in
{
  inherit
    desired
    owned
    gatewayOn
    gatewayPort
    monitoringOn
    monitoringListen
    monitoringPorts
    scrapeInterval
    managedBackends
    nixosOf
    packageOf
    gatewayCredentials
    backendKeyCredential
    ;
}
