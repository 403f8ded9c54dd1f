# services.tensorforge.backends.<name>: one entry of the schema's `backends`, plus the
# NixOS-only `package` and `openFirewall`.
{
  pkgs,
  defaults,
  presets,
  presetFlags,
}:
{
  name,
  config,
  lib,
  ...
}:
let
  inherit (lib) mkOption types literalExpression literalMD;
  d = defaults.backend;

  # nixpkgs attribute and executable per kind; TGI is not packaged in nixpkgs (null).
  serverFor = {
    llamacpp = { attr = "llama-cpp"; exe = "llama-server"; };
    vllm = { attr = "vllm"; exe = "vllm"; };
    tgi = { attr = "text-generation-inference"; exe = "text-generation-launcher"; };
    ollama = { attr = "ollama"; exe = "ollama"; };
  };
  tuned = kind: config.kind == kind && config.url == null && presetFlags.${kind};
in
{
  options = {
    kind = mkOption {
      type = types.enum [ "llamacpp" "vllm" "tgi" "ollama" ];
      example = "vllm";
      description = "Which inference server runs this backend.";
    };
    model = mkOption {
      type = types.str;
      example = "smollm2";
      description = "Name of an entry in {option}`services.tensorforge.models`.";
    };
    host = mkOption {
      type = types.str;
      default = d.host;
      example = "0.0.0.0";
      description = "Address the backend listens on; `0.0.0.0` to serve a gateway on another host.";
    };
    port = mkOption {
      type = types.nullOr types.port;
      default = null;
      defaultText = literalMD "`null`: required for a backend this host runs; a `url` backend takes the URL's port";
      example = 8080;
      description = ''
        Port the backend listens on. Required unless {option}`url` is set; a `url` backend
        without it uses the port in the URL (80/443 by scheme when the URL names none).
      '';
    };
    url = mkOption {
      type = types.nullOr (types.strMatching "https?://[^/[:space:]]+.*");
      default = null;
      example = "http://b200-node:8001";
      description = ''
        A backend that runs elsewhere: the gateway routes to this URL and the local reconciler
        leaves it alone (no package, no GPUs, no unit on this host).
      '';
    };
    protocol = mkOption {
      type = types.nullOr (types.enum [ "llamacpp" "vllm" "tgi" "ollama" "openai" ]);
      default = null;
      example = "openai";
      description = "Wire protocol the gateway speaks to it; null means the kind's own.";
    };
    apiKeyFile = mkOption {
      # A string, not a path: a path literal would copy the key into the world-readable store.
      type = types.nullOr (types.strMatching "/.+");
      default = null;
      example = "/run/secrets/remote-vllm-key";
      description = ''
        File holding the key the gateway sends this backend as `Authorization: Bearer` (a vLLM
        started with `--api-key`, a hosted OpenAI-compatible API). Read by the gateway through
        systemd's `LoadCredential`, so it may be owned by root and mode 0400.
      '';
    };
    gpus = mkOption {
      type = types.ints.unsigned;
      default = d.gpus;
      example = 4;
      description = "Number of GPUs wanted; 0 runs on CPU (vllm/tgi take one per shard anyway).";
    };
    gpuIds = mkOption {
      type = types.nullOr (types.listOf types.ints.unsigned);
      default = null;
      example = [ 0 1 2 3 ];
      description = "Pin to these GPU indices instead of placement by free VRAM.";
    };
    tensorParallelSize = mkOption {
      type = types.ints.positive;
      default = d.tensorParallelSize;
      defaultText = literalMD "`4` for vllm backends with `b200Optimized.vllm`, else `1`";
      example = 4;
      description = "GPUs one model is sharded across (vllm and tgi only).";
    };
    contextSize = mkOption {
      type = types.ints.positive;
      default = d.contextSize;
      defaultText = literalMD "`32768` for llamacpp backends with `b200Optimized.llamacpp`, else `4096`";
      example = 32768;
      description = "Context length in tokens (llama.cpp splits it across `parallel` slots).";
    };
    flashAttn = mkOption {
      type = types.bool;
      default = d.flashAttn;
      defaultText = literalMD "`true` for llamacpp backends with `b200Optimized.llamacpp`, else `false`";
      description = "Use flash attention (llama.cpp `--flash-attn on`, Ollama `OLLAMA_FLASH_ATTENTION`).";
    };
    quantization = mkOption {
      type = types.nullOr types.str;
      default = null;
      defaultText = literalMD ''`"fp8"` for vllm backends with `b200Optimized.vllm`, else `null`'';
      example = "fp8";
      description = "Weight quantization passed to vLLM (`--quantization`) or TGI (`--quantize`).";
    };
    kvCacheDtype = mkOption {
      type = types.nullOr types.str;
      default = null;
      defaultText = literalMD ''`"fp8"` for vllm backends with `b200Optimized.vllm`, else `null`'';
      example = "fp8";
      description = "KV cache data type (vLLM `--kv-cache-dtype`).";
    };
    gpuMemoryUtilization = mkOption {
      type = types.addCheck types.number (x: x > 0 && x <= 1) // {
        description = "number in (0, 1]";
      };
      default = d.gpuMemoryUtilization;
      example = 0.92;
      description = "Fraction of each GPU's memory vLLM may use.";
    };
    parallel = mkOption {
      type = types.ints.positive;
      default = d.parallel;
      example = 8;
      description = "Parallel request slots (llama.cpp `--parallel`, vLLM `--max-num-seqs`).";
    };
    threads = mkOption {
      type = types.nullOr types.ints.positive;
      default = null;
      example = 4;
      description = "CPU threads for llama.cpp; null lets the server choose.";
    };
    maxLoadedModels = mkOption {
      type = types.nullOr types.ints.positive;
      default = null;
      example = 2;
      description = "Models Ollama keeps loaded at once.";
    };
    extraArgs = mkOption {
      type = types.listOf types.str;
      default = d.extraArgs;
      example = [ "--enable-prefix-caching" ];
      description = "Extra command-line arguments, appended verbatim.";
    };
    environment = mkOption {
      type = types.attrsOf types.str;
      default = d.environment;
      example = { NCCL_DEBUG = "WARN"; };
      description = "Extra environment variables for the server process.";
    };
    healthTimeout = mkOption {
      type = types.addCheck types.number (x: x > 0);
      default = d.healthTimeout;
      example = 900;
      description = "Seconds to wait for the backend to become healthy (large models load slowly).";
    };
    drainTimeout = mkOption {
      type = types.addCheck types.number (x: x > 0);
      default = d.drainTimeout;
      example = 600;
      description = ''
        Seconds open requests (streams too) get to finish, once the gateway has stopped sending
        new ones, before a rolling change stops or restarts this backend. Raise it for long
        generations; a stream still open then is cut with an error event.
      '';
    };
    requestTimeout = mkOption {
      type = types.addCheck types.number (x: x >= 0.1 && x <= 604800);
      default = d.requestTimeout;
      example = 1800;
      description = ''
        Most seconds one request may take, first byte sent to last received; past it the
        gateway cancels it at the backend and answers 504 (a stream ends with an error event).
      '';
    };
    minTokensPerSecond = mkOption {
      type = types.addCheck types.number (x: x > 0);
      default = d.minTokensPerSecond;
      description = ''
        Slowest generation that still counts as working: a request with max_tokens gets at most
        firstByteTimeout + n * max_tokens / this seconds, when shorter than requestTimeout.
      '';
    };
    cacheRamMib = mkOption {
      type = types.nullOr types.ints.unsigned;
      default = null;
      example = 0;
      description = ''
        llama.cpp's host-memory prompt cache (--cache-ram), MiB; 0 turns it off. null: the
        size of the KV cache, so the server's memory stays bounded (counted in the estimate).
      '';
    };

    # NixOS only: not part of the desired state.
    package = mkOption {
      type = types.nullOr types.package;
      default = if config.url != null then null else pkgs.${serverFor.${config.kind}.attr} or null;
      defaultText = literalMD ''
        null for a url backend, else pkgs.llama-cpp, pkgs.vllm, pkgs.ollama or
        pkgs.text-generation-inference (by kind)
      '';
      example = literalExpression "pkgs.llama-cpp.override { cudaSupport = true; }";
      description = "The server package; its executable becomes the backend's `binary`.";
    };
    openFirewall = mkOption {
      type = types.bool;
      default = false;
      description = "Open {option}`port` in the firewall, for a gateway on another host.";
    };
    binary = mkOption {
      type = types.nullOr types.str;
      readOnly = true;
      default =
        if config.package == null then
          null
        else
          "${config.package}/bin/${serverFor.${config.kind}.exe}";
      defaultText = literalMD "`<package>/bin/<server>`, or null without a package";
      description = "The executable the reconciler starts (derived from {option}`package`).";
    };
  };

  # b200Optimized: defaults only, so a host can override any single value.
  config = lib.mkMerge [
    (lib.mkIf (tuned "vllm") (lib.mapAttrs (_: lib.mkDefault) presets.vllm))
    (lib.mkIf (tuned "llamacpp") (lib.mapAttrs (_: lib.mkDefault) presets.llamacpp))
  ];
}
