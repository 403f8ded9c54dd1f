# `import nixpkgs { system = ...; }` (the flake's colmena meta) on the stand-in.
{
  system ? "x86_64-linux",
  ...
}:
import ./fake-pkgs.nix {
  lib = import ./lib;
  inherit system;
  realDerivations = true;
}
