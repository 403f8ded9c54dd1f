# Prometheus scrape jobs for one host's desired state (builtins only): the same jobs, names and
# target labels as reconciler/monitoring/prometheus.py's `scrape_config`, which the dashboards
# and alert rules select on. tests/test_nix_monitoring.py compares the two for every host.
#
# Input: the desired state as `toDesired` returns it (snake_case, nulls omitted), so missing
# keys take the schema's defaults from ./defaults.nix.
let
  defaults = import ./defaults.nix;

  # The backend kinds, generated from reconciler/backends/registry.py (a test keeps it in sync).
  kinds = builtins.fromJSON (builtins.readFile ./kinds.json);
  # Backend kinds whose servers serve Prometheus metrics (Ollama has none).
  kindsWithMetrics = builtins.filter (k: kinds.${k}.metrics_path != null) (builtins.attrNames kinds);

  # A wildcard listen address is scraped on loopback.
  local = host: if host == "0.0.0.0" || host == "::" || host == "" then "127.0.0.1" else host;

  # HOST:PORT, an IPv6 literal in brackets (as schema.host_port).
  hostPort = host: port:
    if lib_hasColon host && builtins.substring 0 1 host != "[" then "[${host}]:${toString port}" else "${host}:${toString port}";
  lib_hasColon = s: builtins.match ".*:.*" s != null;

  job = name: target: labels: scheme: path: {
    job_name = name;
    metrics_path = path;
    inherit scheme;
    static_configs = [ { targets = [ target ]; inherit labels; } ];
  };

  # "https://far:8443/v1/" -> { scheme = "https"; netloc = "far:8443"; path = "/v1/"; }
  splitUrl = url:
    let m = builtins.match "([A-Za-z][A-Za-z0-9+.-]*)://([^/?#]*)([^?#]*).*" url;
    in
    if m == null then
      throw "scrape.nix: url ${url} is not scheme://host[:port][/path]"
    else
      {
        scheme = builtins.elemAt m 0;
        netloc = builtins.elemAt m 1;
        path = builtins.elemAt m 2;
      };

  # Trailing slashes off, as Python's str.rstrip("/").
  stripSlashes = s:
    let m = builtins.match "(.*[^/])/*" s; in if m == null then "" else builtins.head m;

  # BackendSpec.base_url: the url if given, else where the backend listens.
  baseUrl = b:
    if (b.url or null) != null then
      stripSlashes b.url
    else
      let host = b.host or defaults.backend.host; in
      "http://${hostPort (if host == "0.0.0.0" || host == "::" then "127.0.0.1" else host) b.port}";

  backendJob = hostName: name: b:
    let parts = splitUrl (baseUrl b);
    in
    job "tensorforge-backend-${name}" parts.netloc
      {
        host = hostName;
        backend = name;
        inherit (b) model kind;
      }
      (if parts.scheme == "" then "http" else parts.scheme)
      (stripSlashes parts.path + kinds.${b.kind}.metrics_path);

  scrapeConfigs = desired:
    let
      hostName = desired.host or "localhost";
      hostLabel = { host = hostName; };
      gateway = defaults.gateway // (desired.gateway or { });
      monitoring = defaults.monitoring // (desired.monitoring or { });
      backends = desired.backends or { };
    in
    (if gateway.enable then
      [
        ((job "tensorforge-gateway" (hostPort (local gateway.host) gateway.port) hostLabel "http" "/metrics")
          # With API keys on, /metrics answers 401 to a scraper without one.
          // (if (monitoring.scrape_key_file or null) != null then
            { authorization = { type = "Bearer"; credentials_file = monitoring.scrape_key_file; }; }
          else
            { }))
      ]
    else
      [ ])
    ++ (if monitoring.enable then
      [
        (job "tensorforge-reconciler" (hostPort (local monitoring.listen_address) monitoring.reconciler_metrics_port) hostLabel "http" "/metrics")
        (job "tensorforge-gpu" (hostPort (local monitoring.listen_address) monitoring.gpu_exporter_port) hostLabel "http" "/metrics")
      ]
    else
      [ ])
    # attrNames is sorted, like Python's sorted(state.backends.items()).
    ++ map (name: backendJob hostName name backends.${name}) (
      builtins.filter (name: builtins.elem backends.${name}.kind kindsWithMetrics) (builtins.attrNames backends)
    );

  # Backends Prometheus cannot scrape (listed, not scraped).
  withoutMetrics = desired:
    let backends = desired.backends or { }; in
    builtins.filter (name: !(builtins.elem backends.${name}.kind kindsWithMetrics)) (builtins.attrNames backends);
in
{
  inherit scrapeConfigs withoutMetrics kindsWithMetrics;
}
