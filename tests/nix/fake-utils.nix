# NixOS' `utils` module argument, the part modules/*.nix use: ExecStart= quoting as the NixOS
# manual documents it (each argument JSON-quoted, `%` and `$` doubled).
{ lib }:
let
  escapeSystemdExecArg =
    arg:
    let
      s =
        if builtins.isPath arg then
          "${arg}"
        else if builtins.isString arg then
          arg
        else if builtins.isInt arg || builtins.isFloat arg || lib.isDerivation arg then
          toString arg
        else
          throw "escapeSystemdExecArg only allows strings, paths, numbers and derivations";
    in
    lib.replaceStrings [ "%" "$" ] [ "%%" "$$" ] (builtins.toJSON s);
in
{
  inherit escapeSystemdExecArg;
  escapeSystemdExecArgs = lib.concatMapStringsSep " " escapeSystemdExecArg;
}
