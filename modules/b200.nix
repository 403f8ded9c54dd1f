# services.tensorforge.b200Optimized: settings for an HGX B200 node (8 x B200 192 GB, NVLink
# through NVSwitch). Every value is a lib.mkDefault, so a host can override any single one.
# The backend values themselves live in ./lib/presets.nix (shared with pure evaluation).
{
  config,
  lib,
  ...
}:
let
  inherit (lib) mkDefault mkIf mkOption types;
  cfg = config.services.tensorforge;
  b200 = cfg.b200Optimized;
  presets = (import ./lib).presets;
  sub = what: default: {
    enable = mkOption {
      type = types.bool;
      inherit default;
      description = "With `b200Optimized.enable`: ${what}.";
    };
  };
in
{
  options.services.tensorforge.b200Optimized = {
    enable = lib.mkEnableOption ''
      defaults for NVIDIA B200 nodes: the datacenter driver with fabric manager and persistence
      daemon, CUDA builds, and tuned vLLM and llama.cpp backends
    '';
    vllm = sub "vllm backends default to tensorParallelSize ${toString presets.vllm.tensorParallelSize}, quantization ${presets.vllm.quantization} and an ${presets.vllm.kvCacheDtype} KV cache" true;
    llamacpp = sub "llama.cpp backends default to flash attention and a ${toString presets.llamacpp.contextSize}-token context" true;
    monitoring = sub "TensorForge metrics, Prometheus and Grafana are enabled" true;
  };

  config = mkIf (cfg.enable && b200.enable) {
    nixpkgs.config.cudaSupport = mkDefault true;
    # CUDA, the driver and fabric manager are unfree.
    nixpkgs.config.allowUnfree = mkDefault true;

    hardware.nvidia = {
      # Datacenter mode: headless driver, nvidia-fabricmanager for the NVSwitch fabric.
      datacenter.enable = mkDefault true;
      # Blackwell needs a >= 570 driver and the open kernel modules.
      package = mkDefault config.boot.kernelPackages.nvidiaPackages.dc_570;
      open = mkDefault true;
      # Keeps the GPUs initialised between jobs: no multi-second start-up per backend launch.
      nvidiaPersistenced = mkDefault true;
    };
    hardware.graphics.enable = mkDefault true; # links the driver's libraries to /run/opengl-driver

    services.tensorforge.monitoring.enable = mkIf b200.monitoring.enable (mkDefault true);
    services.tensorforge.monitoring.prometheus.enable = mkIf b200.monitoring.enable (mkDefault true);
    services.tensorforge.monitoring.grafana.enable = mkIf b200.monitoring.enable (mkDefault true);
  };
}
