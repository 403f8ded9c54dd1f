# services.tensorforge.backends.<name>: what NixOS needs for one backend of
# `settings.backends.<name>`: its server package, its firewall port and its key file.
#
# The module's old camelCase options (`kind`, `contextSize`, …) are still accepted here: each
# one used is translated to `settings.backends.<name>.<snake_case key>` (with its priority)
# and warns once, saying what to write instead.
{
  lib,
  json,
  toSnake,
  secretFile,
}:
{ name, options, ... }:
let
  inherit (lib) mkOption types literalExpression literalMD;
  legacy = [
    "kind" "model" "host" "port" "url" "protocol" "gpus" "gpuIds" "contextSize" "parallel"
    "threads" "tensorParallelSize" "flashAttn" "quantization" "kvCacheDtype"
    "gpuMemoryUtilization" "maxLoadedModels" "extraArgs" "environment" "healthTimeout"
    "drainTimeout"
  ];
  used = lib.filter (o: options.${o}.isDefined) legacy;
in
{
  options =
    {
      package = mkOption {
        type = types.nullOr types.package;
        default = null;
        defaultText = literalMD ''
          null: by kind pkgs.llama-cpp, pkgs.vllm or pkgs.ollama, their CUDA build
          (`override { cudaSupport = true; }`, Ollama's `acceleration = "cuda"`) when the
          backend wants GPUs; nixpkgs has no tgi, so a tgi backend must set one
        '';
        example = literalExpression "pkgs.llama-cpp.override { cudaSupport = true; }";
        description = "The server package; its executable becomes the backend's `binary`.";
      };
      openFirewall = mkOption {
        type = types.bool;
        default = false;
        description = "Open the backend's `port` in the firewall, for a gateway on another host.";
      };
      apiKeyFile = mkOption {
        type = secretFile;
        default = null;
        example = "/run/secrets/remote-vllm-key";
        description = ''
          File holding the key the gateway sends this backend as `Authorization: Bearer` (a vLLM
          started with `--api-key`, a hosted OpenAI-compatible API). Read by the gateway through
          systemd's `LoadCredential`, so it may be owned by root and mode 0400.
        '';
      };
      legacySettings = mkOption {
        type = types.raw;
        internal = true;
        readOnly = true;
        default = lib.listToAttrs (
          map (o: lib.nameValuePair (toSnake o) (lib.mkOverride options.${o}.highestPrio options.${o}.value)) used
        );
        description = "The old options used, as settings.backends.<name> definitions.";
      };
      legacyWarnings = mkOption {
        type = types.raw;
        internal = true;
        readOnly = true;
        default = map (
          o:
          "services.tensorforge.backends.${name}.${o} is obsolete (used in ${lib.concatStringsSep ", " (map toString options.${o}.files)}): write services.tensorforge.settings.backends.${name}.${toSnake o} instead, the desired-state key. It is translated for now."
        ) used;
        description = "One warning per old option used.";
      };
    }
    // lib.genAttrs legacy (
      o:
      mkOption {
        type = json;
        visible = false;
        description = "Obsolete: services.tensorforge.settings.backends.<name>.${toSnake o}.";
      }
    );
}
