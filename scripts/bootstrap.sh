#!/usr/bin/env bash
# Build llama.cpp's llama-server from the pinned source and install it into the venv's bin/:
# CUDA when nvcc and a GPU are present (sm_90 H100/H200, sm_100 B200, from the GPU), else CPU.
#   ./scripts/bootstrap.sh                      # about 17 minutes on 2 cores (CPU build)
#   ./scripts/bootstrap.sh --cuda-arch 100      # override the architecture
#   ./scripts/bootstrap.sh --source ./llama.cpp --dry-run
# Flags go to `tensorforge bootstrap`. LLAMA_CPP_BUILD_JOBS sets the compile jobs (default: all
# cores); TF_LLAMACPP_BIN_DIR installs elsewhere.
set -euo pipefail
source "$(dirname "$0")/lib/setup.sh"
ensure_venv cpu
ensure_debian cmake build-essential ninja-build
exec "$TF_VENV/bin/tensorforge" bootstrap --jobs "${LLAMA_CPP_BUILD_JOBS:-$(nproc)}" "$@"
