# services.tensorforge.monitoring.{prometheus,grafana}: scrape TensorForge and show it.
# Dashboards and alert rules live in ../monitoring (dashboards/, alerts/); used when present.
{
  config,
  lib,
  pkgs,
  ...
}:
let
  inherit (lib) literalMD mkDefault mkIf mkOption types;
  cfg = config.services.tensorforge;
  mon = cfg.monitoring;
  repoMonitoring = ../monitoring;
  dashboardsDir = repoMonitoring + "/dashboards";
  rulesDir = repoMonitoring + "/alerts";
  local = host: if host == "0.0.0.0" || host == "::" then "127.0.0.1" else host;
  target = host: port: "${local host}:${toString port}";
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

  config = mkIf (cfg.enable && mon.enable) {
    services.prometheus = mkIf mon.prometheus.enable {
      enable = mkDefault true;
      globalConfig.scrape_interval = mkDefault mon.scrapeInterval;
      ruleFiles = mon.prometheus.ruleFiles;
      scrapeConfigs = [
        {
          job_name = "tensorforge-reconciler";
          static_configs = [ { targets = [ "127.0.0.1:${toString mon.reconcilerMetricsPort}" ]; } ];
        }
        {
          job_name = "tensorforge-gpu";
          static_configs = [ { targets = [ "127.0.0.1:${toString mon.gpuExporterPort}" ]; } ];
        }
      ]
      ++ lib.optional cfg.gateway.enable {
        job_name = "tensorforge-gateway";
        static_configs = [ { targets = [ (target cfg.gateway.host cfg.gateway.port) ]; } ];
      }
      ++ lib.optional (lib.any (b: b.url == null && b.kind == "llamacpp") (lib.attrValues cfg.backends)) {
        # llama-server's own /metrics (started with --metrics).
        job_name = "tensorforge-llamacpp";
        static_configs = [
          {
            targets = lib.mapAttrsToList (_: b: target b.host b.port) (
              lib.filterAttrs (_: b: b.url == null && b.kind == "llamacpp") cfg.backends
            );
          }
        ];
      }
      ++ lib.optional (lib.any (b: b.url == null && b.kind == "vllm") (lib.attrValues cfg.backends)) {
        job_name = "tensorforge-vllm";
        static_configs = [
          {
            targets = lib.mapAttrsToList (_: b: target b.host b.port) (
              lib.filterAttrs (_: b: b.url == null && b.kind == "vllm") cfg.backends
            );
          }
        ];
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
    systemd.services.grafana.preStart = mkIf mon.grafana.enable (
      lib.mkBefore ''
        if [ ! -s /var/lib/grafana/secret-key ]; then
          (umask 077; ${pkgs.coreutils}/bin/head -c 32 /dev/urandom | ${pkgs.coreutils}/bin/base64 > /var/lib/grafana/secret-key)
        fi
      ''
    );
  };
}
