# Shared by the VM tests: a node that runs TensorForge with SmolLM2 on CPU through the real
# llama.cpp server from nixpkgs. `backend` and `gateway` pick the roles (two-node test).
{
  self,
  backendHost ? "127.0.0.1",
  gateway ? true,
  localBackend ? true,
  remoteBackendUrl ? null,
}:
{ pkgs, ... }:
let
  smollm2 = pkgs.callPackage ./smollm2.nix { };
in
{
  imports = [ self.nixosModules.default ];

  virtualisation.memorySize = 2048;
  virtualisation.cores = 2;
  environment.systemPackages = [
    pkgs.curl
    pkgs.jq
  ];

  services.tensorforge = {
    enable = true;
    settings = {
      models.smollm2 = {
        source = "path:${smollm2}";
        inherit (smollm2) file sha256;
        format = "gguf";
        aliases = [ "smollm2-135m" ];
      };
      backends.smollm2-cpu =
        {
          kind = "llamacpp";
          model = "smollm2";
          port = 8080;
        }
        // (
          if localBackend then
            {
              host = backendHost;
              context_size = 2048;
              parallel = 2;
              threads = 1;
            }
          else
            { url = remoteBackendUrl; }
        );
      gateway = {
        enable = gateway;
        host = "0.0.0.0";
        port = 8000;
        # Notice a dead backend quickly.
        health_interval = 1;
        connect_timeout = 2;
      };
    };
    backends.smollm2-cpu.openFirewall = localBackend && backendHost != "127.0.0.1";
    gateway.openFirewall = true;
  };
}
