#!/usr/bin/env bash
# Download, verify and register a model.
#   ./scripts/model-pull.sh --model smollm2                 # declared in the config
#   ./scripts/model-pull.sh --model qwen2.5-coder-32b       # from the catalog, no config needed
#   ./scripts/model-pull.sh --model bartowski/Qwen2.5-7B-Instruct-GGUF --pattern '*Q4_K_M.gguf'
# Other flags (--revision, --pattern, --file, --config) go to `tensorforge pull`.
# HF_TOKEN reads gated or private repositories; TF_MODELS is where models go;
# TF_REGISTRY_URL=postgresql://… keeps the registry in PostgreSQL instead of SQLite.
set -euo pipefail
model=""
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --model) model="${2:-}"; shift 2 || { echo "--model needs a NAME" >&2; exit 2; } ;;
    --model=*) model="${1#*=}"; shift ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) args+=("$1"); shift ;;
  esac
done
if [ -z "$model" ]; then
  echo "usage: $0 --model NAME [--revision REV] [--pattern GLOB] [--config FILE]" >&2
  exit 2
fi
source "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/lib/setup.sh"  # a symlink to the script works too
ensure_venv cpu
exec "$TF_VENV/bin/tensorforge" pull "$model" ${args[@]+"${args[@]}"}
