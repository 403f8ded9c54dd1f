{
  description = "TensorForge: declarative LLM inference (NixOS module, reconciler, OpenAI-compatible gateway)";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs =
    { self, nixpkgs }:
    let
      inherit (nixpkgs) lib;
      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      forAllSystems = f: lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});

      # Every directory under hosts/ with a default.nix is a host: hosts/<name>/default.nix
      # (NixOS) and hosts/<name>/settings.nix (its services.tensorforge.settings as plain
      # data, also read by eval-desired.sh). Other directories (hosts/inventories: GPU inventories) are data.
      hostNames = lib.attrNames (
        lib.filterAttrs (
          name: type: type == "directory" && builtins.pathExists ./hosts/${name}/default.nix
        ) (builtins.readDir ./hosts)
      );
      hostModules = name: [
        self.nixosModules.default
        ./hosts/${name}
      ];

      vmTest = pkgs: file: pkgs.testers.runNixOSTest (import file { inherit self; });
    in
    {
      packages = forAllSystems (pkgs: {
        tensorforge = pkgs.python3Packages.callPackage ./modules/package.nix { };
        default = self.packages.${pkgs.stdenv.hostPlatform.system}.tensorforge;
      });

      apps = forAllSystems (pkgs: {
        default = {
          type = "app";
          program = lib.getExe self.packages.${pkgs.stdenv.hostPlatform.system}.default;
          meta.description = "The tensorforge CLI";
        };
      });

      devShells = forAllSystems (pkgs: {
        default = pkgs.mkShell {
          inputsFrom = [ self.packages.${pkgs.stdenv.hostPlatform.system}.default ];
          packages = [
            pkgs.python3Packages.pytest
            pkgs.python3Packages.pytest-timeout
            pkgs.ruff
            pkgs.nixfmt
            pkgs.colmena
          ];
        };
      });

      # nixfmt is the RFC 166 formatter now (nixfmt-rfc-style is its deprecated alias).
      formatter = forAllSystems (pkgs: pkgs.nixfmt);

      nixosModules = {
        tensorforge = ./modules/tensorforge.nix; # imports ./modules/b200.nix and ./modules/monitoring.nix
        default = self.nixosModules.tensorforge;
      };

      nixosConfigurations = lib.genAttrs hostNames (
        name:
        lib.nixosSystem {
          modules = hostModules name;
        }
      );

      # Fleet rollout with colmena (https://github.com/zhaofengli/colmena): `colmena apply`,
      # `colmena apply --on @gpu`. Same hosts and modules as nixosConfigurations.
      colmena =
        {
          meta = {
            nixpkgs = import nixpkgs { system = "x86_64-linux"; };
            description = "TensorForge inference fleet";
          };
          defaults = {
            deployment = {
              targetUser = "root";
              buildOnTarget = false;
            };
          };
        }
        // lib.genAttrs hostNames (name: {
          imports = hostModules name;
          deployment = {
            targetHost = name;
            tags = {
              b200-node = [ "gpu" "backends" ];
              cpu-dev = [ "cpu" "backends" ];
              gateway-only = [ "gateway" ];
            }.${name} or [ ];
          };
        });

      checks = {
        x86_64-linux =
          let
            pkgs = nixpkgs.legacyPackages.x86_64-linux;
          in
          {
            # Building the package runs its pytest suite (tests not marked slow).
            package = self.packages.x86_64-linux.default;
            # The same as tests/test_nix_contract.py's core, in the sandbox: every host's
            # settings evaluate through modules/lib and pass `tensorforge validate`.
            contract =
              pkgs.runCommand "tensorforge-contract"
                {
                  nativeBuildInputs = [
                    pkgs.nix
                    self.packages.x86_64-linux.default
                  ];
                }
                ''
                  export HOME=$TMPDIR NIX_STATE_DIR=$TMPDIR/nix
                  bash ${self}/scripts/eval-desired.sh $TMPDIR/desired
                  for f in $TMPDIR/desired/*.json ${self}/hosts/*.yaml; do
                    tensorforge validate --no-file-checks --config "$f"
                  done
                  touch $out
                '';
            vm-single-node = vmTest pkgs ./tests/nixos/single-node.nix;
            vm-recovery = vmTest pkgs ./tests/nixos/recovery.nix;
            vm-two-node = vmTest pkgs ./tests/nixos/two-node.nix;
          }
          # Every host's system closure builds. b200-node is only evaluated (flake check
          # evaluates every nixosConfiguration): building it means CUDA and the unfree driver.
          // lib.mapAttrs' (
            name: host: lib.nameValuePair "host-${name}" host.config.system.build.toplevel
          ) (lib.filterAttrs (name: _: name != "b200-node") self.nixosConfigurations);
        aarch64-linux = {
          package = self.packages.aarch64-linux.default;
        };
      };
    };
}
