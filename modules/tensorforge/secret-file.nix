# The type of every option naming a secret (API keys): an absolute path, as a string, outside
# the Nix store. The store is world-readable, and a path literal (./keys) is copied into it as
# soon as it is used in a string, so both are refused with a message that says what to write.
{ lib }:
let
  storePrefix = "${builtins.storeDir}/";
in
lib.types.nullOr (
  lib.types.addCheck lib.types.str (
    p: lib.hasPrefix "/" p && !(lib.hasPrefix storePrefix (builtins.unsafeDiscardStringContext p))
  )
  // {
    name = "secretFile";
    description = ''absolute path outside the Nix store, as a string (for example "/run/secrets/key"; not a path literal such as ./key, which Nix copies into the world-readable store)'';
  }
)
