# services.tensorforge: declare models, backends and the gateway; the reconciler keeps them
# running. RFC 42: the desired state is one freeform option, `settings`, in the keys of
# reconciler/config/schema.py (the only definition of them), written to
# /etc/tensorforge/desired.json and checked by `tensorforge validate` when the system is built.
# Typed options exist only for what NixOS itself needs: the service, packages, users,
# directories, secrets, firewall, monitoring wiring and the b200Optimized preset.
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
  secretFile = import ./tensorforge/secret-file.nix { inherit lib; };

  # The resolved desired state and the settings the units below are wired from.
  resolved = import ./tensorforge/resolved.nix { inherit lib pkgs cfg; };
  inherit (resolved)
    desired
    owned
    gatewayOn
    gatewayPort
    monitoringOn
    monitoringListen
    monitoringPorts
    managedBackends
    nixosOf
    packageOf
    gatewayCredentials
    backendKeyCredential
    ;
  s = cfg.settings;
  staticUser = cfg.user != null;
  keyedBackends = lib.filterAttrs (_: b: b.apiKeyFile != null) cfg.backends;
  useStateDirectory = lib.hasPrefix "/var/lib/" cfg.stateDir;
  modelsOutside = cfg.modelsDir != null && !(useStateDirectory && lib.hasPrefix "/var/lib/" cfg.modelsDir);

  # One file for both services: the reconciler runs `up --no-gateway`, because the gateway is
  # its own hardened unit without GPU access.
  uncheckedDesired = pkgs.writeText "tensorforge-desired.json" (builtins.toJSON desired);
  # The reconciler's own validation at build time, as nixpkgs' prometheus module runs promtool:
  # every rule the schema has (types, unknown keys, port clashes, durations, GPU pins, …) fails
  # `nixos-rebuild` with the schema's messages naming the field, instead of a reconciler that
  # refuses the file at boot. Nix repeats none of those rules.
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
  # Operators' drain/restart requests (the admin API): the gateway writes them, the reconciler
  # (root) reads and removes them. The gateway's own runtime directory, kept across its restarts.
  adminRequestsDir = "/run/tensorforge-admin";
  # Runtime units: NixOS owns /etc/systemd/system (the store), this directory is the admin's.
  runtimeUnitDir = "/run/systemd/system";
in
{
  imports = import ./tensorforge/renamed.nix { inherit lib; } ++ [
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

    settings = import ./tensorforge/settings.nix {
      inherit lib pkgs;
      b200 = cfg.b200Optimized;
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
      description = ''
        Reconciler state: unit records, logs, status (desired.json's `state_dir`). Under
        /var/lib it is a StateDirectory.
      '';
    };
    modelsDir = mkOption {
      type = types.nullOr types.str;
      default = null;
      defaultText = literalMD "`null`: the reconciler uses `<stateDir>/models/gguf`";
      example = "/srv/models";
      description = "Where pulled models are stored (desired.json's `models_dir`); null means under {option}`stateDir`.";
    };

    backends = mkOption {
      type = types.attrsOf (
        types.submodule (
          import ./tensorforge/backend.nix {
            inherit lib secretFile;
            inherit (tfLib) toSnake;
            json = (pkgs.formats.json { }).type;
          }
        )
      );
      default = { };
      example = literalExpression ''
        { smollm2-cpu = { openFirewall = true; }; far-vllm.apiKeyFile = "/run/secrets/far-key"; }
      '';
      description = ''
        NixOS options of the backends declared in {option}`settings.backends`, by the same name:
        the server package, the firewall and the key file.
      '';
    };

    gateway = import ./tensorforge/gateway-options.nix { inherit lib secretFile; };

    monitoring = {
      scrapeKeyFile = mkOption {
        type = secretFile;
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
      default = cfg.b200Optimized.enable || lib.any tfLib.wantsGpu (lib.attrValues managedBackends);
      defaultText = literalMD "`true` with `b200Optimized.enable` or when a local backend wants a GPU";
      description = ''
        This host uses NVIDIA GPUs: the reconciler (GPU inventory) and the GPU exporter get the
        driver's libraries and start after the persistence daemon and fabric manager, and the
        exporter gets the device nodes. Each GPU backend's own unit gets its devices regardless.
      '';
    };

    desiredState = mkOption {
      type = types.attrs;
      readOnly = true;
      internal = true;
      default = desired;
      description = "The desired state as written to desired.json (to inspect it, for example with nix eval).";
    };

    desiredStateFile = mkOption {
      type = types.path;
      readOnly = true;
      default = desiredFile;
      defaultText = literalMD "the generated `desired.json` in the store";
      description = "The generated desired state, also linked at /etc/tensorforge/desired.json.";
    };
  };

  config = lib.mkMerge [
    {
      # The old per-backend camelCase options, translated (./tensorforge/backend.nix).
      services.tensorforge.settings.backends = lib.mapAttrs (_: b: b.legacySettings) (
        lib.filterAttrs (_: b: b.legacyWarnings != [ ]) cfg.backends
      );
      warnings = lib.concatMap (b: b.legacyWarnings) (lib.attrValues cfg.backends);
    }
    (mkIf cfg.enable {
      services.tensorforge.settings.host = lib.mkDefault config.networking.hostName;

      assertions = [
        {
          assertion = staticUser || cfg.group == null;
          message = "services.tensorforge.group is only used with services.tensorforge.user; set user too or unset group.";
        }
      ]
      ++ map (o: {
        assertion = lib.attrByPath o.path null s == null;
        message = "services.tensorforge.settings.${lib.concatStringsSep "." o.path}: set services.tensorforge.${o.option} instead; NixOS owns this key (it creates the directory, or passes the secret to the service through LoadCredential).";
      }) owned
      ++ lib.mapAttrsToList (name: _: {
        assertion = s.backends ? ${name};
        message = "services.tensorforge.backends.${name}: there is no services.tensorforge.settings.backends.${name} (known: ${lib.concatStringsSep ", " (lib.attrNames s.backends)}); declare the backend there, or remove these options.";
      }) cfg.backends
      ++ lib.mapAttrsToList (name: b: {
        assertion = packageOf name b != null;
        message =
          if tfLib.kinds ? ${b.kind} then
            "services.tensorforge.backends.${name}.package: nixpkgs has no ${b.kind} server; set package to one."
          else
            "services.tensorforge.settings.backends.${name}.kind: '${b.kind}' is not a backend kind (${lib.concatStringsSep ", " (lib.attrNames tfLib.kinds)}).";
      }) managedBackends
      ++ [
        {
          assertion = !(monitoringOn && cfg.monitoring.openFirewall)
            || !(lib.elem monitoringListen [ "127.0.0.1" "::1" "localhost" ]);
          message = "services.tensorforge.monitoring.openFirewall: the exporters listen on ${monitoringListen} only; set settings.monitoring.listen_address = \"0.0.0.0\" for a Prometheus on another host.";
        }
        {
          # A DynamicUser's uid changes between boots: it can own only systemd's directories.
          assertion = staticUser || (useStateDirectory && (cfg.modelsDir == null || lib.hasPrefix "/var/lib/" cfg.modelsDir));
          message = "services.tensorforge.stateDir/modelsDir outside /var/lib need a static user: set services.tensorforge.user (and group), or keep both under /var/lib.";
        }
      ];

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
      systemd.services.tensorforge-reconciler = mkIf (managedBackends != { } || monitoringOn) {
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
        environment = {
          HOME = cfg.stateDir; # pip's cache for pypi: sources
          PYTHONUNBUFFERED = "1";
          # Each backend is its own unit (tensorforge-backend-<name>.service), rendered from
          # templates/ into /run/systemd/system, which NixOS leaves to the administrator, and run
          # by systemd: its own cgroup, sandbox, device allow-list, journal and restart policy.
          TF_DRIVER = "systemd";
          TF_UNIT_DIR = runtimeUnitDir;
          TF_DRAIN_DIR = drainDir;
          TF_ADMIN_REQUESTS_DIR = adminRequestsDir;
        } // hardening.driverEnvironment cfg.gpu;
        # Root (templates/hardening.json's `reconciler`): writing units and asking systemd to
        # start them needs it; the backends themselves run as DynamicUsers.
        serviceConfig = hardening.reconciler // {
          Type = "exec";
          ExecStart = utils.escapeSystemdExecArgs [
            (lib.getExe cfg.package)
            "up"
            "--no-gateway"
            "--config"
            "/etc/tensorforge/desired.json"
          ];
          ExecReload = "${pkgs.coreutils}/bin/kill -HUP $MAINPID";
          # The backends are not its children: they keep serving while it restarts, and it
          # adopts them again from their unit files.
          TimeoutStopSec = "90s";
          Restart = "on-failure";
          RestartSec = "5s";
          WorkingDirectory = cfg.stateDir;
          ReadWritePaths = [ runtimeUnitDir ]
            ++ lib.optional (!useStateDirectory) cfg.stateDir
            ++ lib.optional modelsOutside cfg.modelsDir;
          # /run/tensorforge, readable by the gateway for the drain marks (see drainDir).
          RuntimeDirectory = "tensorforge";
          RuntimeDirectoryMode = "0755";
        } // lib.optionalAttrs useStateDirectory {
          StateDirectory = [ (lib.removePrefix "/var/lib/" cfg.stateDir) ]
            ++ lib.optional (cfg.modelsDir != null && !modelsOutside) (lib.removePrefix "/var/lib/" cfg.modelsDir);
          # The backend units (other users) read the models pulled here.
          StateDirectoryMode = "0755";
        };
      };

      systemd.services.tensorforge-gateway = mkIf gatewayOn {
        description = "TensorForge gateway: one OpenAI-compatible endpoint for every backend";
        wantedBy = [ "multi-user.target" ];
        after = [ "network.target" ] ++ lib.optional (managedBackends != { }) "tensorforge-reconciler.service";
        # Backends and models are reloaded from the file without a restart (no stream is cut);
        # the listen address, keys and limits need one.
        restartTriggers = [ (builtins.toJSON (desired.gateway or { })) ];
        environment = {
          PYTHONUNBUFFERED = "1";
          TF_DRAIN_DIR = drainDir;
          TF_ADMIN_REQUESTS_DIR = adminRequestsDir;
        };
        serviceConfig = hardening.service cfg false // {
          Type = "exec";
          ExecStart = utils.escapeSystemdExecArgs [
            (lib.getExe cfg.package)
            "gateway"
            "--config"
            "/etc/tensorforge/desired.json"
          ];
          Restart = "always";
          RestartSec = "2s";
          RuntimeDirectory = lib.removePrefix "/run/" adminRequestsDir;
          RuntimeDirectoryMode = "0755";
          RuntimeDirectoryPreserve = "yes"; # pending requests outlive a gateway restart
          LoadCredential =
            lib.optional (cfg.gateway.apiKeysFile != null) "api-keys:${cfg.gateway.apiKeysFile}"
            ++ lib.optional (cfg.gateway.adminKeysFile != null) "admin-keys:${cfg.gateway.adminKeysFile}"
            ++ lib.mapAttrsToList (name: b: "${backendKeyCredential name}:${b.apiKeyFile}") keyedBackends;
        };
      };

      networking.firewall.allowedTCPPorts =
        lib.optional (gatewayOn && cfg.gateway.openFirewall) gatewayPort
        ++ lib.concatLists (
          lib.mapAttrsToList (
            name: b: lib.optional ((nixosOf name).openFirewall && builtins.isInt (b.port or null)) b.port
          ) managedBackends
        )
        ++ lib.optionals (monitoringOn && cfg.monitoring.openFirewall) monitoringPorts;
    })
  ];

  meta.maintainers = builtins.attrValues (import ./maintainers.nix);
}
