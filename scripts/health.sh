#!/usr/bin/env bash
# GPUs, backend health, and a latency benchmark (TTFT, tokens/s, p50/p95) per backend.
#   ./scripts/health.sh                 # the declared backends through the gateway
#   ./scripts/health.sh --json -n 20    # 20 requests per model, machine-readable
# The llama.cpp server at LLAMACPP_URL (default http://127.0.0.1:8080) is also probed and
# measured directly when it answers. Exit 0 when everything is healthy, 1 otherwise.
set -euo pipefail
LLAMACPP_URL="${LLAMACPP_URL:-http://127.0.0.1:8080}"
source "$(dirname "$0")/lib/setup.sh"
ensure_venv cpu
exec "$TF_VENV/bin/tensorforge" health --llamacpp-url "$LLAMACPP_URL" "$@"
