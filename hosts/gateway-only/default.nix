# gateway-only as a NixOS configuration: no GPUs, no local backends, just the gateway.
{ ... }:
{
  imports = [
    ../common.nix
    { services.tensorforge.settings = import ./settings.nix; }
  ];
  networking.hostName = "gateway-only";

  services.tensorforge = {
    enable = true;
    gateway.openFirewall = true;
  };
}
