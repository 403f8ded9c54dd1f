# b200-node as a NixOS configuration: ./settings.nix (two vLLM TP=4 replicas, b200Optimized)
# plus what only NixOS knows about. Any preset value can be overridden here, for example
# `services.tensorforge.backends.qwen3-a.quantization = null;` or
# `hardware.nvidia.package = config.boot.kernelPackages.nvidiaPackages.dc_580;`.
{ ... }:
{
  imports = [
    ../common.nix
    { services.tensorforge = import ./settings.nix; }
  ];
  networking.hostName = "b200-node";

  services.tensorforge = {
    enable = true;
    gateway.openFirewall = true;
    # gateway-only routes to each replica directly.
    backends.qwen3-a.openFirewall = true;
    backends.qwen3-b.openFirewall = true;
  };
}
