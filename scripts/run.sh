#!/usr/bin/env bash
# The main job: answer a prompt with the embedded default (llama.cpp + SmolLM2 on CPU).
#   ./scripts/run.sh --prompt "Explain quantum computing" --output result.json
# Extra flags go to `tensorforge run` (a positional prompt, --system, --temperature (0.1),
# --file, --batch DIR --output-dir DIR, --model, --prompts-file, --config, --max-tokens ...).
set -euo pipefail
source "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/lib/setup.sh"  # a symlink to the script works too
ensure_venv cpu
exec "$TF_VENV/bin/tensorforge" run "$@"
