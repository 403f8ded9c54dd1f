# services.tensorforge.monitoring.{prometheus,grafana}: scrape TensorForge and show it, and the
# GPU exporter service. Dashboards and alert rules live in ../monitoring (dashboards/, alerts/);
# the scrape jobs come from ./lib/scrape.nix, the mirror of reconciler/monitoring/prometheus.py.
{
  config,
  lib,
  pkgs,
  utils,
  ...
}:
let
  inherit (lib) literalMD mkDefault mkIf mkOption types;
  cfg = config.services.tensorforge;
  mon = cfg.monitoring;
  repoMonitoring = ../monitoring;
  dashboardsDir = repoMonitoring + "/dashboards";
  rulesDir = repoMonitoring + "/alerts";
  tfLib = import ./lib;
  hardening = import ./tensorforge/hardening.nix;
  # The resolved desired state, and the settings read from it with the schema's defaults.
  resolved = import ./tensorforge/resolved.nix { inherit lib pkgs cfg; };
in
{
  options.services.tensorforge.monitoring = {
    prometheus = {
      enable = mkOption {
        type = types.bool;
        default = false;
        defaultText = literalMD "`false`; `true` with `b200Optimized.monitoring.enable`";
        description = "Run Prometheus on this host and scrape the gateway, reconciler and GPUs.";
      };
      ruleFiles = mkOption {
        type = types.listOf types.path;
        default =
          if builtins.pathExists rulesDir then
            map (f: rulesDir + "/${f}") (
              # *.rules.test.yml are promtool unit tests, not rules.
              lib.filter (f: lib.hasSuffix ".rules.yml" f) (
                lib.attrNames (builtins.readDir rulesDir)
              )
            )
          else
            [ ];
        defaultText = literalMD "`monitoring/alerts/*.rules.yml` of this repository, if any";
        description = "Prometheus alerting and recording rules for TensorForge.";
      };
    };
    grafana = {
      enable = mkOption {
        type = types.bool;
        default = false;
        defaultText = literalMD "`false`; `true` with `b200Optimized.monitoring.enable`";
        description = "Run Grafana with Prometheus as data source and the TensorForge dashboards.";
      };
      dashboardsDir = mkOption {
        type = types.nullOr types.path;
        default = if builtins.pathExists dashboardsDir then dashboardsDir else null;
        defaultText = literalMD "`monitoring/dashboards` of this repository, if it exists";
        description = "Directory of Grafana dashboard JSON files to provision; null provisions none.";
      };
    };
  };

  config = mkIf (cfg.enable && resolved.monitoringOn) {
    warnings = lib.optional (
      mon.prometheus.enable && resolved.gatewayOn && cfg.gateway.apiKeysFile != null && mon.scrapeKeyFile == null
    ) "services.tensorforge.gateway.apiKeysFile is set but services.tensorforge.monitoring.scrapeKeyFile is not: the gateway's /metrics answers 401 to Prometheus. Put one of the keys in a file the prometheus user can read and point scrapeKeyFile at it.";

    services.prometheus = mkIf mon.prometheus.enable {
      enable = mkDefault true;
      globalConfig = {
        scrape_interval = mkDefault resolved.scrapeInterval;
        evaluation_interval = mkDefault resolved.scrapeInterval;
      };
      ruleFiles = mon.prometheus.ruleFiles;
      # The same jobs and target labels as `tensorforge monitoring-config` (gateway, reconciler,
      # GPU exporter, one `tensorforge-backend-<name>` per llama.cpp/vLLM/TGI backend): the
      # dashboards and alerts select on them. tests/test_nix_monitoring.py keeps both equal.
      scrapeConfigs = tfLib.scrapeConfigs resolved.desired;
      # promtool's full check opens credentials_file, which is not in the build sandbox.
      checkConfig = lib.mkIf (mon.scrapeKeyFile != null) (mkDefault "syntax-only");
    };

    # `tensorforge gpu-exporter`: per-GPU memory, utilisation, temperature and power, labelled
    # with the backends placed on each GPU. Without a GPU it serves `tensorforge_gpus 0`.
    systemd.services.tensorforge-gpu-exporter = {
      description = "TensorForge GPU metrics exporter";
      wantedBy = [ "multi-user.target" ];
      after = [ "network.target" ] ++ lib.optional cfg.gpu "nvidia-persistenced.service";
      environment = {
        PYTHONUNBUFFERED = "1";
      } // hardening.driverEnvironment cfg.gpu;
      serviceConfig = hardening.service cfg cfg.gpu // {
        Type = "exec";
        ExecStart = utils.escapeSystemdExecArgs [
          (lib.getExe cfg.package)
          "gpu-exporter"
          "--config"
          "/etc/tensorforge/desired.json"
        ];
        Restart = "always";
        RestartSec = "5s";
      } // lib.optionalAttrs (cfg.user != null) {
        # The reconciler's status.json says which backend runs on which GPU. Only a static
        # user can read it; a DynamicUser exporter labels GPUs from pinned gpuIds alone.
        ReadOnlyPaths = [ cfg.stateDir ];
      };
    };

    services.grafana = mkIf mon.grafana.enable {
      enable = mkDefault true;
      settings = {
        server.http_addr = mkDefault "127.0.0.1";
        server.http_port = mkDefault 3000;
        # Generated on first start (below) instead of a well-known default in the store.
        security.secret_key = mkDefault "$__file{/var/lib/grafana/secret-key}";
      };
      provision = {
        enable = true;
        datasources.settings.datasources = [
          {
            name = "Prometheus";
            type = "prometheus";
            url = "http://127.0.0.1:${toString config.services.prometheus.port}";
            isDefault = true;
          }
        ];
        dashboards.settings.providers = lib.optional (mon.grafana.dashboardsDir != null) {
          name = "tensorforge";
          options.path = mon.grafana.dashboardsDir;
        };
      };
    };
    # mkIf around the unit, not its preStart: `grafana.preStart = mkIf …` would still
    # declare a grafana unit on hosts without Grafana.
    systemd.services.grafana = mkIf (mon.grafana.enable && config.services.grafana.enable) {
      preStart = lib.mkBefore ''
        if [ ! -s /var/lib/grafana/secret-key ]; then
          (umask 077; ${pkgs.coreutils}/bin/head -c 32 /dev/urandom | ${pkgs.coreutils}/bin/base64 > /var/lib/grafana/secret-key)
        fi
      '';
    };
  };
}
