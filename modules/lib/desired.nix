# services.tensorforge.settings (already in the schema's snake_case shape) -> desired.json,
# and the translation of the module's old camelCase option names. builtins only: no nixpkgs,
# no lib, so hosts/<name>/settings.nix evaluate with a bare `nix-instantiate --eval`.
#
# Keys are never filtered: a misspelt key reaches the schema, which rejects it by name
# (unknown keys are errors there). Nulls are omitted so the schema's defaults apply.
let
  upper = [ "A" "B" "C" "D" "E" "F" "G" "H" "I" "J" "K" "L" "M" "N" "O" "P" "Q" "R" "S" "T" "U" "V" "W" "X" "Y" "Z" ];
  snakeParts = map (c: "_" + c) [ "a" "b" "c" "d" "e" "f" "g" "h" "i" "j" "k" "l" "m" "n" "o" "p" "q" "r" "s" "t" "u" "v" "w" "x" "y" "z" ];

  # "tensorParallelSize" -> "tensor_parallel_size" (old option names to schema keys)
  toSnake = builtins.replaceStrings upper snakeParts;

  # Nulls out, recursively; `_module` is the module system's bookkeeping inside submodule
  # values, never a setting. Lists are kept as they are.
  clean =
    v:
    if builtins.isAttrs v then
      builtins.mapAttrs (_: clean) (
        builtins.removeAttrs v ([ "_module" ] ++ builtins.filter (k: v.${k} == null) (builtins.attrNames v))
      )
    else
      v;

  toDesired = settings: { version = 1; } // clean settings;
in
{
  inherit toSnake toDesired clean;
}
