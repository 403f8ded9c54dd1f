# The b200Optimized preset as plain values (builtins only). The NixOS module applies them with
# lib.mkDefault; `applyPresets` applies them the same way for pure evaluation: a value the host
# sets itself always wins.
let
  values = {
    # Four B200s per replica: fp8 weights and fp8 KV cache leave room for long contexts.
    vllm = {
      tensorParallelSize = 4;
      quantization = "fp8";
      kvCacheDtype = "fp8";
    };
    llamacpp = {
      flashAttn = true;
      contextSize = 32768;
    };
  };

  # The models the preset's own backends serve unless the host names others
  # (`b200Optimized.vllm.model`, `b200Optimized.llamacpp.model`).
  models = {
    # MoE, 22B active: bf16 weights (~470 GB) quantized to fp8 on load (~235 GB on 4 GPUs).
    qwen3-235b = {
      source = "hf:Qwen/Qwen3-235B-A22B-Instruct-2507";
      format = "safetensors";
      aliases = [ "qwen3" ];
    };
    # MoE, 3B active, Q8_0 GGUF (~32 GB): one B200 with a 32768-token context to spare.
    qwen3-30b-gguf = {
      source = "hf:Qwen/Qwen3-30B-A3B-GGUF";
      file = "Qwen3-30B-A3B-Q8_0.gguf";
      format = "gguf";
    };
  };

  # The backends `b200Optimized.{vllm,llamacpp}.enable` declare; the tuning values above
  # apply to them as to any other local backend of their kind.
  backends = {
    b200-vllm = {
      kind = "vllm";
      model = "qwen3-235b";
      port = 8001;
    };
    b200-llamacpp = {
      kind = "llamacpp";
      model = "qwen3-30b-gguf";
      port = 8002;
      gpus = 1;
    };
  };
  backendFor = { vllm = "b200-vllm"; llamacpp = "b200-llamacpp"; };

  # Same defaults as the module's `b200Optimized` options.
  b200Flags = settings:
    let
      given = settings.b200Optimized or { };
      enable = given.enable or false;
      part = name: default: enable && ((given.${name} or { }).enable or default);
    in
    {
      inherit enable;
      vllm = part "vllm" false;
      llamacpp = part "llamacpp" false;
      monitoring = part "monitoring" true;
    };

  # A backend declared by url runs elsewhere: presets only tune backends this host starts.
  tuneBackend = flags: backend:
    if !flags.enable || (backend.url or null) != null then
      backend
    else if backend.kind == "vllm" then
      values.vllm // backend
    else if backend.kind == "llamacpp" then
      values.llamacpp // backend
    else
      backend;

  # The preset backend for `kind` with the host's model and extra arguments.
  presetBackend = given: kind:
    let part = given.${kind} or { }; in
    backends.${backendFor.${kind}}
    // (if part ? model then { inherit (part) model; } else { })
    // (if part ? extraArgs then { inherit (part) extraArgs; } else { });

  applyPresets = settings:
    let
      flags = b200Flags settings;
      given = settings.b200Optimized or { };
      rest = builtins.removeAttrs settings [ "b200Optimized" ];
      kinds = builtins.filter (k: flags.${k}) [ "vllm" "llamacpp" ];
      declared = builtins.listToAttrs (map (k: { name = backendFor.${k}; value = presetBackend given k; }) kinds);
      # A preset model the host did not declare itself.
      wanted = builtins.filter (m: models ? ${m}) (map (k: declared.${backendFor.${k}}.model) kinds);
      presetModels = builtins.listToAttrs (map (m: { name = m; value = models.${m}; }) wanted);
    in
    rest
    // {
      models = presetModels // (rest.models or { });
      backends = builtins.mapAttrs (_: tuneBackend flags) (
        builtins.mapAttrs (name: b: b // ((rest.backends or { }).${name} or { })) declared
        // builtins.removeAttrs (rest.backends or { }) (builtins.attrNames declared)
      );
    }
    // (
      if flags.monitoring then
        { monitoring = { enable = true; } // (rest.monitoring or { }); }
      else
        { }
    );
in
{
  b200 = values;
  inherit b200Flags applyPresets models backends backendFor;
}
