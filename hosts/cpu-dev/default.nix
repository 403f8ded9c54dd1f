# cpu-dev as a NixOS configuration: ./settings.nix plus what only NixOS knows about.
{ ... }:
{
  imports = [
    ../common.nix
    { services.tensorforge.settings = import ./settings.nix; }
  ];
  networking.hostName = "cpu-dev";

  services.tensorforge = {
    enable = true;
    gateway.openFirewall = true;
    # gateway-only routes to this backend directly.
    backends.smollm2-cpu.openFirewall = true;
  };
}
