# The b200Optimized preset as plain values in the schema's own keys (builtins only). The NixOS
# module (../b200.nix) sets them in services.tensorforge.settings with lib.mkDefault, so any
# value a host sets itself wins.
{
  # Every local backend of the kind gets these. Four B200s per replica: fp8 weights and fp8
  # KV cache leave room for long contexts.
  tuning = {
    vllm = {
      tensor_parallel_size = 4;
      quantization = "fp8";
      kv_cache_dtype = "fp8";
    };
    llamacpp = {
      flash_attn = true;
      context_size = 32768;
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

  # The backends `b200Optimized.{vllm,llamacpp}.enable` declare; the tuning above applies to
  # them as to any other local backend of their kind.
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
  backendFor = {
    vllm = "b200-vllm";
    llamacpp = "b200-llamacpp";
  };
}
