# services.tensorforge.b200Optimized: an HGX B200 node (8 x B200 192 GB, NVLink through
# NVSwitch) as the product page promises it. On its own, `b200Optimized.enable` with
# `vllm.enable` and `llamacpp.enable` is a working appliance: the service, a vLLM backend
# (tensor parallel 4, fp8), a llama.cpp backend (flash attention, 32768 tokens), monitoring and
# the host tuning. Every value is a lib.mkDefault in services.tensorforge.settings (or the NixOS
# option it concerns), so a host can override any single one; the values live in
# ./lib/presets.nix. The tuning of every local vLLM and llama.cpp backend, declared here or by
# the host, is applied by the settings type (./tensorforge/settings.nix).
{
  config,
  lib,
  pkgs,
  ...
}:
let
  inherit (lib) mkDefault mkIf mkOption types;
  cfg = config.services.tensorforge;
  b200 = cfg.b200Optimized;
  tfLib = import ./lib;
  presets = tfLib.presets;

  # b200Optimized.vllm / .llamacpp: declare the preset's backend of that kind.
  backendPart = kind: what: {
    enable = mkOption {
      type = types.bool;
      default = false;
      example = true;
      description = ''
        With `b200Optimized.enable`: declare the backend `${presets.backendFor.${kind}}`, ${what}.
        Every ${kind} backend this host runs gets the same tuning, declared here or not.
      '';
    };
    model = mkOption {
      type = types.str;
      default = presets.backends.${presets.backendFor.${kind}}.model;
      example = "my-model";
      description = ''
        The model it serves: a name in {option}`services.tensorforge.settings.models`. The
        default is declared by the preset (as defaults); another name must be declared by the host.
      '';
    };
    extraArgs = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [ "--enable-prefix-caching" ];
      description = "Extra command-line arguments for that backend's server.";
    };
  };
  declared = lib.filter (kind: b200.${kind}.enable) [ "vllm" "llamacpp" ];
  tuning = b200.enable && b200.systemTuning.enable;
in
{
  options.services.tensorforge.b200Optimized = {
    enable = lib.mkEnableOption ''
      TensorForge tuned for NVIDIA B200 nodes: enables the service, tunes every local vLLM
      (tensor parallel ${toString presets.tuning.vllm.tensor_parallel_size}, ${presets.tuning.vllm.quantization}, ${presets.tuning.vllm.kv_cache_dtype} KV cache) and
      llama.cpp backend (flash attention, ${toString presets.tuning.llamacpp.context_size}-token context), and by default
      the host (see `systemTuning`) and monitoring'';
    vllm = backendPart "vllm" "vLLM with tensor parallelism ${toString presets.tuning.vllm.tensor_parallel_size} and ${presets.tuning.vllm.quantization} weights";
    llamacpp = backendPart "llamacpp" "llama.cpp with flash attention and a ${toString presets.tuning.llamacpp.context_size}-token context on one GPU";
    monitoring.enable = mkOption {
      type = types.bool;
      default = true;
      description = "With `b200Optimized.enable`: TensorForge metrics, Prometheus and Grafana with the TensorForge dashboards.";
    };
    systemTuning.enable = mkOption {
      type = types.bool;
      default = true;
      description = ''
        With `b200Optimized.enable`: the NVIDIA datacenter driver (open kernel modules, >= 570
        for Blackwell) with fabric manager and the persistence daemon, the `performance` CPU
        governor and {option}`systemTuning.kernelParams`. The driver is unfree: allow it in
        your nixpkgs config.
      '';
    };
    systemTuning.kernelParams = mkOption {
      type = types.listOf types.str;
      default = [
        # PyTorch's host allocator madvise()s huge pages for pinned buffers; nothing else gets them.
        "transparent_hugepage=madvise"
        # IOMMU passthrough: GPU peer-to-peer and NIC DMA without translation overhead.
        "iommu=pt"
      ];
      description = ''
        Kernel parameters added with `systemTuning` (an option rather than a default on
        `boot.kernelParams`, which NixOS itself defines, so a default there would be dropped).
      '';
    };
  };

  config = mkIf b200.enable (
    lib.mkMerge [
      {
        services.tensorforge.enable = mkDefault true;

        services.tensorforge.settings.backends = lib.listToAttrs (
          map (kind: {
            name = presets.backendFor.${kind};
            value = lib.mapAttrs (_: mkDefault) (
              presets.backends.${presets.backendFor.${kind}}
              // {
                inherit (b200.${kind}) model;
                extra_args = b200.${kind}.extraArgs;
              }
            );
          }) declared
        );
        # The preset's default models; a host that names another model declares it itself.
        services.tensorforge.settings.models = lib.listToAttrs (
          map (model: {
            name = model;
            value = lib.mapAttrs (_: mkDefault) presets.models.${model};
          }) (lib.filter (m: presets.models ? ${m}) (map (kind: b200.${kind}.model) declared))
        );

        services.tensorforge.settings.monitoring.enable = mkIf b200.monitoring.enable (mkDefault true);
        services.tensorforge.monitoring = mkIf b200.monitoring.enable {
          prometheus.enable = mkDefault true;
          grafana.enable = mkDefault true;
        };
      }
      (mkIf tuning {
        # CUDA and the driver are unfree; a service module must not allow that for the whole
        # system (nor set cudaSupport globally): the backends take CUDA builds per package.
        assertions = [
          {
            assertion = pkgs.config.allowUnfree or false || pkgs.config ? allowUnfreePredicate;
            message = ''services.tensorforge.b200Optimized.systemTuning: the NVIDIA datacenter driver, fabric manager and CUDA are unfree. Set nixpkgs.config.allowUnfree = true (or an allowUnfreePredicate that admits nvidia-x11, nvidia-fabricmanager and the cuda packages), or set b200Optimized.systemTuning.enable = false and configure the driver yourself.'';
          }
        ];
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
        # Inference hosts are never idle enough for frequency scaling to pay off. Above
        # mkDefault: nixos-generate-config writes `mkDefault "powersave"` into many hardware
        # configurations, and two mkDefaults would conflict; a plain setting still wins.
        powerManagement.cpuFreqGovernor = lib.mkOverride 900 "performance";
        boot.kernelParams = b200.systemTuning.kernelParams;
      })
    ]
  );
}
