# A stand-in for the nixpkgs flake input, for `nix flake check --no-build` and `nix flake show`
# under a modern Nix without nixpkgs (tests/test_nix_flake_check.py):
#   nix flake check --no-build --override-input nixpkgs path:STANDIN
# STANDIN is a temporary copy of this directory plus ../fake-pkgs.nix, ../fake-utils.nix,
# ../nixos-standin.nix and `lib/` from nix-community/nixpkgs.lib (never committed here). Its
# `lib` is nixpkgs' real lib, with `nixosSystem` running the real lib.evalModules over the typed
# NixOS stand-in; its packages are derivations that are instantiated but never built.
{
  description = "nixpkgs stand-in: the real lib, typed NixOS options, fake packages";

  outputs =
    { self }:
    let
      baseLib = import ./lib;
      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      utils = import ./fake-utils.nix { lib = baseLib; };

      nixosSystem =
        args:
        let
          system = args.system or "x86_64-linux";
        in
        baseLib.evalModules {
          specialArgs = args.specialArgs or { };
          modules = [
            ./nixos-standin.nix
            {
              _module.args = {
                pkgs = pkgsFor system;
                inherit utils;
              };
            }
          ] ++ args.modules;
        };

      pkgsFor =
        system:
        let
          base = import ./fake-pkgs.nix {
            lib = baseLib;
            inherit system;
            realDerivations = true;
            # CUDA and the NVIDIA driver are unfree: a B200 user allows that.
            pkgsConfig.allowUnfree = true;
          };
        in
        base
        // {
          # A VM test's nodes go through the module system like any host; nothing boots.
          testers.runNixOSTest =
            test:
            base.runCommand "vm-test-run-${test.name}" {
              nativeBuildInputs = baseLib.mapAttrsToList (
                _: node: (nixosSystem { modules = [ node ]; }).config.system.build.toplevel
              ) test.nodes;
            } test.testScript;
        };
    in
    {
      lib = baseLib.extend (_: _: { inherit nixosSystem; });
      legacyPackages = baseLib.genAttrs systems pkgsFor;
    };
}
