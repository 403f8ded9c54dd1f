#!/usr/bin/env bash
# Turn `run` results into Markdown, text, JSONL or CSV.
#   ./scripts/export.sh --input result.json --format csv --output result.csv
#   ./scripts/export.sh -i results.jsonl -f md            # to stdout
set -euo pipefail
case "${1:-}" in
  -h|--help) sed -n '2,4p' "$0"; exit 0 ;;
  "") sed -n '2,4p' "$0" >&2; exit 2 ;;
esac
source "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/lib/setup.sh"  # a symlink to the script works too
ensure_venv cpu
exec "$TF_VENV/bin/tensorforge" export "$@"
