# Runs modules/tensorforge.nix through nixpkgs' real `lib.evalModules` with the typed NixOS
# stand-in (./nixos-standin.nix) and fake packages (./fake-pkgs.nix), and returns what an admin
# would check, as JSON: failed assertions, warnings, the desired state, the systemd services,
# firewall, monitoring and GPU settings. tests/test_nix_module_eval.py calls it:
#
#   nix-instantiate --eval --strict --json tests/nix/eval-module.nix \
#     --argstr nixpkgsLib /opt/nixpkgs-lib --arg configuration ./hosts/cpu-dev
#
# `configuration` is any NixOS module (a host directory, a file, or an attrset).
{
  nixpkgsLib,
  configuration,
  # The user's nixpkgs config (`pkgs.config`): CUDA users allow unfree themselves.
  pkgsConfig ? { },
  # python3Packages names to leave out, as an older nixpkgs would.
  pythonMissing ? [ ],
}:
let
  # The nix-community/nixpkgs.lib checkout, or its lib/ directory.
  root = /. + nixpkgsLib;
  lib = import (if builtins.pathExists (root + "/lib/default.nix") then root + "/lib" else root);
  pkgs = import ./fake-pkgs.nix { inherit lib pkgsConfig pythonMissing; };
  utils = import ./fake-utils.nix { inherit lib; };

  evaluated = lib.evalModules {
    modules = [
      ./nixos-standin.nix
      ../../modules/tensorforge.nix
      configuration
      { _module.args = { inherit pkgs utils; }; }
    ];
  };
  inherit (evaluated) config options;
  tf = config.services.tensorforge;

  # Derivations as the JSON would show them: their name, not their (fake) store path.
  plain =
    v:
    if lib.isDerivation v then
      "<drv ${v.name}>"
    else if builtins.isAttrs v then
      lib.mapAttrs (_: plain) v
    else if builtins.isList v then
      map plain v
    else if builtins.isPath v then
      toString v
    else
      v;

  ours = lib.filterAttrs (n: _: lib.hasPrefix "tensorforge" n || n == "grafana") config.systemd.services;
  showService = s: {
    inherit (s)
      description
      wantedBy
      wants
      after
      environment
      preStart
      ;
    path = map plain s.path;
    serviceConfig = plain s.serviceConfig;
    restartTriggers = map plain s.restartTriggers;
    reloadTriggers = map plain s.reloadTriggers;
  };
  desiredFile = tf.desiredStateFile;
in
{
  failedAssertions = map (a: a.message) (lib.filter (a: !a.assertion) config.assertions);
  inherit (config) warnings;
  enabled = tf.enable;
  # What desired.json holds (the module writes `builtins.toJSON desiredState`).
  desired = if tf.enable then builtins.fromJSON (builtins.toJSON tf.desiredState) else null;
  # The build step that writes desired.json: it must run `tensorforge validate`.
  desiredBuild = desiredFile.fakeScript or null;
  services = lib.mapAttrs (_: showService) ours;
  etc = lib.mapAttrs (_: e: { inherit (e) mode; source = plain e.source; }) config.environment.etc;
  firewall = config.networking.firewall.allowedTCPPorts;
  users = lib.mapAttrs (_: u: { inherit (u) isSystemUser group home; }) config.users.users;
  tmpfiles = config.systemd.tmpfiles.rules;
  nixpkgsConfig = config.nixpkgs.config;
  prometheus = {
    inherit (config.services.prometheus) enable checkConfig scrapeConfigs;
    ruleFiles = map toString config.services.prometheus.ruleFiles;
  };
  grafana = {
    inherit (config.services.grafana) enable;
    dashboards = plain config.services.grafana.provision.dashboards.settings;
  };
  nvidia = plain config.hardware.nvidia // {
    graphics = config.hardware.graphics.enable;
  };
  tuning = {
    inherit (config.boot) kernelParams;
    sysctl = config.boot.kernel.sysctl;
    governor = config.powerManagement.cpuFreqGovernor;
  };
  # What modules/package.nix asked buildPythonApplication for.
  package = tf.package.fakeBuild // {
    inherit (tf.package) name;
    maintainers = tf.package.meta.maintainers or [ ];
  };
  moduleMaintainers = config.meta.maintainers or [ ];
  # Each backend's server executable, from the package NixOS chose for it.
  backendBinaries = lib.mapAttrs (_: b: b.binary or null) (tf.desiredState.backends or { });
  # Every option's type check runs when its value is forced: force the whole tree.
  optionCount = builtins.length (lib.collect lib.isOption options.services.tensorforge);
}
