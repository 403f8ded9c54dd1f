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
# services.tensorforge.settings as plain data, in the schema's keys; hosts/b200-node.yaml is the
# same desired state. The b200Optimized preset (./default.nix) would default tensor parallelism
# 4, fp8 weights and an fp8 KV cache for every local vLLM backend (modules/lib/presets.nix);
# they are written out here because they are this host's choice, and so that the plain data is
# the whole desired state.
let
  replica = port: gpuIds: {
    kind = "vllm";
    model = "qwen3-235b";
    host = "0.0.0.0";
    inherit port;
    gpu_ids = gpuIds;
    tensor_parallel_size = 4;
    quantization = "fp8";
    kv_cache_dtype = "fp8";
    context_size = 65536;
    # vLLM's --max-num-seqs: concurrent sequences per replica.
    parallel = 256;
    gpu_memory_utilization = 0.92;
    # Loading ~470 GB of safetensors (first start downloads them too) takes a while.
    health_timeout = 3600;
    # A thinking model's answer can stream for minutes: let it finish before a rolling change
    # restarts the replica (the other one serves meanwhile).
    drain_timeout = 600;
  };
in
{
  host = "b200-node";
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
    first_byte_timeout = 600;
  };
  # Prometheus and Grafana on this host scrape it (b200Optimized.monitoring would default this).
  monitoring.enable = true;
}
