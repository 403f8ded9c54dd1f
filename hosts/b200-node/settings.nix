# b200-node: one HGX B200 (8 x B200 192 GB, all GPUs on one NVSwitch fabric).
#
# Choice: two vLLM replicas with tensor parallelism 4 (GPUs 0-3 and 4-7) rather than one vLLM
# TP=4 plus llama.cpp. Four B200s (768 GB) hold Qwen3-235B in fp8 (~235 GB) with ~450 GB left
# for fp8 KV cache, so one replica per half of the board doubles throughput, and a replica that
# restarts (driver reset, OOM, upgrade) leaves the other serving: the gateway routes around it.
# llama.cpp would leave four B200s on a single-stream GGUF server, a poor use of the hardware;
# small GGUF models are served by cpu-dev instead. Each half matches one CPU socket's PCIe
# root complexes on HGX boards, so pinning keeps host memory traffic NUMA-local.
#
# The b200Optimized preset supplies tensorParallelSize 4, quantization fp8 and an fp8 KV cache
# for both (see modules/lib/presets.nix); any of them can be set here to override it.
let
  replica = port: gpuIds: {
    kind = "vllm";
    model = "qwen3-235b";
    host = "0.0.0.0";
    inherit port gpuIds;
    contextSize = 65536;
    # vLLM's --max-num-seqs: concurrent sequences per replica.
    parallel = 256;
    gpuMemoryUtilization = 0.92;
    # Loading ~470 GB of safetensors (first start downloads them too) takes a while.
    healthTimeout = 3600;
    # A thinking model's answer can stream for minutes: let it finish before a rolling change
    # restarts the replica (the other one serves meanwhile).
    drainTimeout = 600;
  };
in
{
  host = "b200-node";
  b200Optimized.enable = true;
  models = {
    inherit (import ../models.nix) qwen3-235b;
  };
  backends = {
    qwen3-a = replica 8001 [ 0 1 2 3 ];
    qwen3-b = replica 8002 [ 4 5 6 7 ];
  };
  gateway = {
    host = "0.0.0.0";
    port = 8000;
    routing.strategy = "cache-aware";
    # Long prompts on a 235B model: allow a slow first token.
    firstByteTimeout = 600;
  };
}
