# services.tensorforge.gateway: the gateway options NixOS needs (its keys through LoadCredential,
# its firewall port). Everything else about the gateway is `settings.gateway`.
{ lib, secretFile }:
let
  inherit (lib) mkOption types;
in
{
  apiKeysFile = mkOption {
    type = secretFile;
    default = null;
    example = "/run/secrets/tensorforge-api-keys";
    description = ''
      File with the accepted API keys, one per line as `KEY [NAME]`; KEY may be written as
      `sha256:<hex digest>` so the file holds no secret, NAME labels the client in the
      gateway's metrics. null accepts every request. Read through systemd's `LoadCredential`
      (desired.json gets the credential's path), so it may be owned by root and mode 0400.
      Keep it out of the Nix store (use a string path, or agenix/sops-nix).
    '';
  };
  adminKeysFile = mkOption {
    type = secretFile;
    default = null;
    example = "/run/secrets/tensorforge-admin-keys";
    description = ''
      File with the admin keys (same format as {option}`apiKeysFile`, kept apart from it) that
      may drain or restart backends through `POST /backends/{name}/drain` and `/restart`.
      null: the admin API is off. Read through systemd's `LoadCredential`; keep it out of the
      Nix store.
    '';
  };
  openFirewall = mkOption {
    type = types.bool;
    default = false;
    description = "Open the gateway's port (`settings.gateway.port`) in the firewall.";
  };
}
