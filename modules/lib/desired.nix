# settings (camelCase, the shape of `services.tensorforge`) -> desired state (snake_case, the
# shape of reconciler/config/schema.py). builtins only: no nixpkgs, no lib, so the contract
# can be evaluated with a bare `nix-instantiate --eval` and checked by the Python schema.
#
# Keys are converted, never filtered: a misspelt key reaches the schema, which rejects it by
# name (unknown keys are errors there). Nulls are omitted so the schema's defaults apply.
let
  upper = [ "A" "B" "C" "D" "E" "F" "G" "H" "I" "J" "K" "L" "M" "N" "O" "P" "Q" "R" "S" "T" "U" "V" "W" "X" "Y" "Z" ];
  snakeParts = map (c: "_" + c) [ "a" "b" "c" "d" "e" "f" "g" "h" "i" "j" "k" "l" "m" "n" "o" "p" "q" "r" "s" "t" "u" "v" "w" "x" "y" "z" ];

  # "tensorParallelSize" -> "tensor_parallel_size"
  toSnake = builtins.replaceStrings upper snakeParts;

  # `_module` is the module system's own bookkeeping inside submodule values, never a setting.
  dropNulls = attrs:
    builtins.removeAttrs attrs ([ "_module" ] ++ builtins.filter (k: attrs.${k} == null) (builtins.attrNames attrs));

  # Convert the keys of a record (fixed field names); `maps` names the fields whose values are
  # maps keyed by user-chosen names (models, backends, environment, ...), kept verbatim.
  record = maps: attrs:
    let
      clean = dropNulls attrs;
      convert = k:
        let v = clean.${k}; in
        {
          name = toSnake k;
          value = if builtins.hasAttr k maps then maps.${k} v else v;
        };
    in
    builtins.listToAttrs (map convert (builtins.attrNames clean));

  # A map keyed by user names whose values are records.
  named = maps: attrs: builtins.mapAttrs (_: record maps) (dropNulls attrs);
  # A map keyed by user names whose values are plain (strings, lists of strings).
  verbatim = attrs: dropNulls attrs;

  toDesired = settings:
    { version = 1; }
    // record {
      models = named { };
      backends = named { environment = verbatim; };
      gateway = record { routing = record { fallbacks = verbatim; modelAliases = verbatim; }; cors = record { }; };
      monitoring = record { };
    } settings;
in
{
  inherit toSnake toDesired;
}
