#!/usr/bin/env bash
# GPUs, backend health, and a latency benchmark (TTFT, tokens/s, p50/p95) per backend.
#   ./scripts/health.sh                 # the declared backends through the gateway
#   ./scripts/health.sh --json -n 20    # 20 requests per model, machine-readable
# The llama.cpp server at LLAMACPP_URL is also probed and measured directly: when set, always
# (down is then a failure); unset, http://127.0.0.1:8080 only when something listens there.
# Exit 0 when everything is healthy, 1 otherwise.
set -euo pipefail
extra=()
if [ -n "${LLAMACPP_URL:-}" ]; then
  extra=(--llamacpp-url "$LLAMACPP_URL")
elif (exec 3<>/dev/tcp/127.0.0.1/8080) 2>/dev/null; then
  extra=(--llamacpp-url "http://127.0.0.1:8080")
fi
source "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/lib/setup.sh"  # a symlink to the script works too
ensure_venv cpu
exec "$TF_VENV/bin/tensorforge" health "${extra[@]}" "$@"
