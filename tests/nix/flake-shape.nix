# The flake's output tree, names only, evaluated without nixpkgs (CI has no nixpkgs checkout
# and no binary cache). `nixpkgs` here is a stub: it gives the handful of `lib` functions the
# flake calls to build its attribute names, and a `legacyPackages` whose every value throws if
# forced. So this proves which outputs `nix flake show` would list and that the VM tests are
# well-formed test attrsets; it proves nothing about the values (packages, systems), which
# only a machine with nixpkgs can build (docs/deployment.md, "Checks and where they run").
let
  flake = import ../../flake.nix;

  notHere = what: throw "${what} needs nixpkgs, which this evaluation does not have";

  stubLib = {
    genAttrs = names: f: builtins.listToAttrs (map (n: { name = n; value = f n; }) names);
    attrNames = builtins.attrNames;
    filterAttrs = pred: set:
      builtins.listToAttrs (
        builtins.concatMap (n: if pred n set.${n} then [ { name = n; value = set.${n}; } ] else [ ])
          (builtins.attrNames set)
      );
    nameValuePair = name: value: { inherit name value; };
    "mapAttrs'" = f: set: builtins.listToAttrs (map (n: f n set.${n}) (builtins.attrNames set));
    getExe = _: notHere "lib.getExe";
    nixosSystem = _: notHere "lib.nixosSystem";
  };

  nixpkgs = {
    lib = stubLib;
    legacyPackages = builtins.listToAttrs (
      map (system: { name = system; value = notHere "legacyPackages.${system}"; }) [
        "x86_64-linux"
        "aarch64-linux"
      ]
    );
    outPath = notHere "nixpkgs' source";
  };

  self = flake.outputs { inherit self nixpkgs; } // { outPath = ../..; };

  names = set: builtins.attrNames set;
  perSystem = set: builtins.mapAttrs (_: names) set;
  vmTest = file: let t = import file { inherit self; }; in {
    inherit (t) name;
    nodes = names t.nodes;
    hasScript = builtins.isString t.testScript;
  };
in
{
  outputs = names self;
  inputs = names flake.inputs;
  packages = perSystem self.packages;
  apps = perSystem self.apps;
  devShells = perSystem self.devShells;
  formatter = names self.formatter;
  nixosModules = names self.nixosModules;
  nixosConfigurations = names self.nixosConfigurations;
  colmena = names self.colmena;
  colmenaTags = builtins.mapAttrs (_: h: h.deployment.tags)
    (builtins.removeAttrs self.colmena [ "meta" "defaults" ]);
  checks = perSystem self.checks;
  vmTests = map vmTest [
    ../nixos/single-node.nix
    ../nixos/recovery.nix
    ../nixos/two-node.nix
  ];
}
