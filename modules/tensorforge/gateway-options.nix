# services.tensorforge.gateway: the schema's `gateway`, plus the NixOS-only `openFirewall`.
{ lib, defaults }:
let
  inherit (lib) mkOption types literalExpression;
  g = defaults.gateway;
  r = defaults.routing;
  positive = types.addCheck types.number (x: x > 0) // {
    description = "positive number";
  };
in
{
  enable = mkOption {
    type = types.bool;
    default = g.enable;
    description = "Run the gateway (`tensorforge-gateway.service`) on this host.";
  };
  host = mkOption {
    type = types.str;
    default = g.host;
    example = "0.0.0.0";
    description = "Address the gateway listens on (was `address`).";
  };
  port = mkOption {
    type = types.port;
    default = g.port;
    description = "Port of the OpenAI-compatible API (`/v1/...`) and `/health`, `/metrics`.";
  };
  apiKeysFile = mkOption {
    # A string, not a path: a path literal would copy the keys into the world-readable store.
    type = types.nullOr (types.strMatching "/.+");
    default = null;
    example = "/run/secrets/tensorforge-api-keys";
    description = ''
      File with the accepted API keys, one per line as `KEY [NAME]`; KEY may be written as
      `sha256:<hex digest>` so the file holds no secret, NAME labels the client in the
      gateway's metrics. null accepts every request. Read through
      systemd's `LoadCredential`, so it may be owned by root and mode 0400. Keep it out of the
      Nix store (use a string path, or agenix/sops-nix).
    '';
  };
  openFirewall = mkOption {
    type = types.bool;
    default = false;
    description = "Open {option}`port` in the firewall.";
  };
  routing = {
    strategy = mkOption {
      type = types.enum [ "least-load" "round-robin" "session-affinity" ];
      default = r.strategy;
      description = "How the gateway picks among healthy backends serving the requested model.";
    };
    affinityHeader = mkOption {
      type = types.str;
      default = r.affinityHeader;
      description = "Request header that keys `session-affinity` routing.";
    };
    fallbacks = mkOption {
      type = types.attrsOf (types.listOf types.str);
      default = r.fallbacks;
      example = literalExpression ''{ qwen3-235b = [ "smollm2" ]; }'';
      description = "Model -> models to try, in order, when no backend for it is healthy.";
    };
  };
  maxBodyBytes = mkOption {
    type = types.ints.positive;
    default = g.maxBodyBytes;
    description = "Largest request body accepted, in bytes.";
  };
  connectTimeout = mkOption {
    type = positive;
    default = g.connectTimeout;
    description = "Seconds to connect to a backend.";
  };
  firstByteTimeout = mkOption {
    type = positive;
    default = g.firstByteTimeout;
    description = "Seconds to wait for a backend's first response byte (prefill of long prompts).";
  };
  idleTimeout = mkOption {
    type = positive;
    default = g.idleTimeout;
    description = "Seconds a stream may stay silent before the gateway gives up on it.";
  };
  maxConcurrencyPerBackend = mkOption {
    type = types.ints.positive;
    default = g.maxConcurrencyPerBackend;
    description = "Requests in flight per backend before the gateway queues or picks another.";
  };
  maxConcurrencyPerKey = mkOption {
    type = types.nullOr types.ints.positive;
    default = null;
    example = 16;
    description = "Open requests one API key may have; more get 429. null: no limit.";
  };
  healthInterval = mkOption {
    type = positive;
    default = g.healthInterval;
    description = "Seconds between health probes of each backend (at least 0.1).";
  };
  maxWebsocketsPerKey = mkOption {
    type = types.ints.positive;
    default = g.maxWebsocketsPerKey;
    description = "Open WebSocket connections per API key (per client address without keys).";
  };
  maxWebsockets = mkOption {
    type = types.ints.positive;
    default = g.maxWebsockets;
    description = "Open WebSocket connections in total.";
  };
  maxWebsocketQueuedBytes = mkOption {
    type = types.ints.positive;
    default = g.maxWebsocketQueuedBytes;
    description = "Bytes of queued WebSocket messages all connections together may hold.";
  };
}
