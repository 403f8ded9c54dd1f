# b200-node as a NixOS configuration: ./settings.nix (two vLLM TP=4 replicas) plus what only
# NixOS knows about: b200Optimized for the host tuning (driver, fabric manager, governor,
# Prometheus and Grafana). Any preset value can be overridden here, for example
# `hardware.nvidia.package = config.boot.kernelPackages.nvidiaPackages.dc_580;`.
{ ... }:
{
  imports = [
    ../common.nix
    { services.tensorforge.settings = import ./settings.nix; }
  ];
  networking.hostName = "b200-node";

  services.tensorforge = {
    enable = true;
    b200Optimized.enable = true;
    gateway.openFirewall = true;
    # gateway-only routes to each replica directly.
    backends.qwen3-a.openFirewall = true;
    backends.qwen3-b.openFirewall = true;
  };
}
