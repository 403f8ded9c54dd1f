# The schema's defaults, once, for the module's option defaults (builtins only).
# tests/test_nix_contract.py checks every value here against reconciler/config/schema.py.
{
  backend = {
    host = "127.0.0.1";
    gpus = 0;
    contextSize = 4096;
    parallel = 1;
    tensorParallelSize = 1;
    flashAttn = false;
    gpuMemoryUtilization = 0.9;
    extraArgs = [ ];
    environment = { };
    healthTimeout = 180.0;
    drainTimeout = 30.0;
    requestTimeout = 600.0;
    minTokensPerSecond = 1.0;
  };
  gateway = {
    enable = true;
    host = "127.0.0.1";
    port = 8000;
    maxBodyBytes = 4194304;
    connectTimeout = 5.0;
    firstByteTimeout = 300.0;
    idleTimeout = 120.0;
    maxConcurrencyPerBackend = 64;
    healthInterval = 2.0;
    maxWebsocketsPerKey = 16;
    maxWebsockets = 256;
    maxWebsocketQueuedBytes = 67108864;
  };
  routing = {
    strategy = "least-load";
    affinityHeader = "x-session-id";
    fallbacks = { };
  };
  monitoring = {
    enable = false;
    listenAddress = "127.0.0.1";
    reconcilerMetricsPort = 9310;
    gpuExporterPort = 9311;
    scrapeInterval = "15s";
  };
}
