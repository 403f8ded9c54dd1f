# A small typed stand-in for the NixOS options modules/*.nix write to, so the module can be run
# through nixpkgs' real `lib.evalModules` without a nixpkgs checkout. Written from the NixOS
# manual's option types (search.nixos.org, nixos/modules/system/boot/systemd/*): where NixOS
# has a precise type (systemd's unit options, ports, users), so does this; options the hosts
# merely set (boot loader, filesystems, openssh) are typed loosely. No nixpkgs code is copied.
{ config, lib, pkgs, ... }:
let
  inherit (lib) mkOption types;

  # systemd's unit option values: an atom or a list of atoms; lists from several definitions
  # concatenate, atoms must agree (NixOS' `unitOption`).
  atom = types.oneOf [
    types.bool
    types.int
    types.float
    types.str
    types.path
    types.package
  ];
  unitOption = lib.mkOptionType {
    name = "systemd option";
    description = "systemd unit option value";
    check = v: atom.check v || (builtins.isList v && lib.all atom.check v);
    merge =
      loc: defs:
      let
        defs' = lib.filterOverrides defs;
      in
      if lib.any (d: builtins.isList d.value) defs' then
        lib.concatMap (d: lib.toList d.value) defs'
      else
        lib.mergeEqualOption loc defs';
  };
  loose = mkOption {
    type = types.attrsOf types.anything;
    default = { };
  };
  enable = mkOption {
    type = types.bool;
    default = false;
  };
  strList = mkOption {
    type = types.listOf types.str;
    default = [ ];
  };

  service = types.submodule {
    options = {
      enable = mkOption {
        type = types.bool;
        default = true;
      };
      description = mkOption {
        type = types.str;
        default = "";
      };
      wantedBy = strList;
      requiredBy = strList;
      wants = strList;
      requires = strList;
      after = strList;
      before = strList;
      bindsTo = strList;
      partOf = strList;
      environment = mkOption {
        type = types.attrsOf (types.nullOr (types.oneOf [ types.str types.path types.package ]));
        default = { };
      };
      path = mkOption {
        type = types.listOf (types.oneOf [ types.package types.str ]);
        default = [ ];
      };
      serviceConfig = mkOption {
        type = types.attrsOf unitOption;
        default = { };
      };
      unitConfig = mkOption {
        type = types.attrsOf unitOption;
        default = { };
      };
      preStart = mkOption {
        type = types.lines;
        default = "";
      };
      script = mkOption {
        type = types.lines;
        default = "";
      };
      reloadTriggers = mkOption {
        type = types.listOf unitOption;
        default = [ ];
      };
      restartTriggers = mkOption {
        type = types.listOf unitOption;
        default = [ ];
      };
      startLimitIntervalSec = mkOption {
        type = types.nullOr types.int;
        default = null;
      };
      startLimitBurst = mkOption {
        type = types.nullOr types.int;
        default = null;
      };
    };
  };
in
{
  options = {
    assertions = mkOption {
      type = types.listOf (
        types.submodule {
          options.assertion = mkOption { type = types.bool; };
          options.message = mkOption { type = types.str; };
        }
      );
      default = [ ];
    };
    warnings = strList;
    meta = mkOption {
      type = types.attrsOf types.anything;
      default = { };
    };

    nixpkgs = {
      config = mkOption {
        type = types.attrsOf types.anything;
        default = { };
      };
      hostPlatform = mkOption {
        type = types.either types.str (types.attrsOf types.anything);
        default = "x86_64-linux";
      };
    };

    networking = {
      hostName = mkOption {
        type = types.strMatching "^$|^[[:alnum:]]([[:alnum:]_-]{0,61}[[:alnum:]])?$";
        default = "nixos";
      };
      firewall = {
        enable = mkOption {
          type = types.bool;
          default = true;
        };
        allowedTCPPorts = mkOption {
          type = types.listOf types.port;
          default = [ ];
        };
      };
    };

    users = {
      users = mkOption {
        type = types.attrsOf (
          types.submodule {
            options = {
              isSystemUser = enable;
              isNormalUser = enable;
              group = mkOption {
                type = types.str;
                default = "";
              };
              home = mkOption {
                type = types.path;
                default = "/var/empty";
              };
              extraGroups = strList;
            };
          }
        );
        default = { };
      };
      groups = mkOption {
        type = types.attrsOf (types.submodule { options.gid = mkOption { type = types.nullOr types.int; default = null; }; });
        default = { };
      };
    };

    environment = {
      etc = mkOption {
        type = types.attrsOf (
          types.submodule {
            options = {
              source = mkOption { type = types.path; };
              mode = mkOption {
                type = types.str;
                default = "symlink";
              };
            };
          }
        );
        default = { };
      };
      systemPackages = mkOption {
        type = types.listOf types.package;
        default = [ ];
      };
    };

    systemd = {
      services = mkOption {
        type = types.attrsOf service;
        default = { };
      };
      tmpfiles.rules = strList;
    };

    boot = {
      kernelPackages = mkOption {
        type = types.raw;
        default = pkgs.linuxPackages;
      };
      kernelParams = strList;
      kernelModules = strList;
      kernel.sysctl = mkOption {
        type = types.attrsOf (types.nullOr (types.oneOf [ types.bool types.str types.int ]));
        default = { };
      };
      loader = loose;
    };
    fileSystems = loose;
    powerManagement.cpuFreqGovernor = mkOption {
      type = types.nullOr types.str;
      default = null;
    };

    hardware = {
      graphics.enable = enable;
      nvidia = {
        datacenter.enable = enable;
        package = mkOption {
          type = types.nullOr types.package;
          default = null;
        };
        open = mkOption {
          type = types.nullOr types.bool;
          default = null;
        };
        nvidiaPersistenced = enable;
      };
      # hardware.nvidia-container-toolkit and friends are not written by the module.
    };
    services = {
      xserver.videoDrivers = strList;
      openssh = loose;

      prometheus = {
        enable = enable;
        port = mkOption {
          type = types.port;
          default = 9090;
        };
        checkConfig = mkOption {
          type = types.either types.bool (types.enum [ "syntax-only" ]);
          default = true;
        };
        globalConfig = loose;
        ruleFiles = mkOption {
          type = types.listOf types.path;
          default = [ ];
        };
        scrapeConfigs = mkOption {
          type = types.listOf (types.attrsOf types.anything);
          default = [ ];
        };
      };

      grafana = {
        enable = enable;
        settings = mkOption {
          type = types.submodule { freeformType = types.attrsOf types.anything; };
          default = { };
        };
        provision = {
          enable = enable;
          datasources.settings = mkOption {
            type = types.nullOr (types.submodule { freeformType = types.attrsOf types.anything; });
            default = null;
          };
          dashboards.settings = mkOption {
            type = types.nullOr (types.submodule { freeformType = types.attrsOf types.anything; });
            default = null;
          };
        };
      };
    };

    nix.settings = loose;
    system.stateVersion = mkOption { type = types.str; };
    # What VM tests set on their nodes.
    virtualisation = loose;
    specialisation = mkOption {
      type = types.attrsOf types.raw;
      default = { };
    };

    # As NixOS: building the system fails on a failed assertion and prints every warning.
    system.build.toplevel = mkOption {
      type = types.package;
      readOnly = true;
    };
  };

  # NixOS' kernel module defines kernel parameters itself (so a mkDefault list would be lost).
  config.boot.kernelParams = [ "loglevel=4" ];

  config.system.build.toplevel =
    let
      failed = map (a: a.message) (lib.filter (a: !a.assertion) config.assertions);
      units = lib.mapAttrs (_: s: s.serviceConfig) config.systemd.services;
    in
    if failed != [ ] then
      throw "Failed assertions:\n${lib.concatMapStringsSep "\n" (m: "- " + m) failed}"
    else
      lib.showWarnings config.warnings (
        pkgs.runCommand "nixos-system-${config.networking.hostName}" {
          # Instantiating the system instantiates every file and package it holds.
          nativeBuildInputs = map (e: e.source) (lib.attrValues config.environment.etc)
            ++ config.environment.systemPackages;
        } (builtins.toJSON units)
      );
}
