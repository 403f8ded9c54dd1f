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

  # Same defaults as the module's `b200Optimized` options.
  b200Flags = settings:
    let
      given = settings.b200Optimized or { };
      enable = given.enable or false;
      sub = name: enable && ((given.${name} or { }).enable or true);
    in
    {
      inherit enable;
      vllm = sub "vllm";
      llamacpp = sub "llamacpp";
      monitoring = sub "monitoring";
    };

  # A backend declared by url runs elsewhere: presets only tune backends this host starts.
  tuneBackend = flags: backend:
    if (backend.url or null) != null then
      backend
    else if backend.kind == "vllm" && flags.vllm then
      values.vllm // backend
    else if backend.kind == "llamacpp" && flags.llamacpp then
      values.llamacpp // backend
    else
      backend;

  applyPresets = settings:
    let
      flags = b200Flags settings;
      rest = builtins.removeAttrs settings [ "b200Optimized" ];
    in
    rest
    // { backends = builtins.mapAttrs (_: tuneBackend flags) (rest.backends or { }); }
    // (
      if flags.monitoring then
        { monitoring = { enable = true; } // (rest.monitoring or { }); }
      else
        { }
    );
in
{
  b200 = values;
  inherit b200Flags applyPresets;
}
