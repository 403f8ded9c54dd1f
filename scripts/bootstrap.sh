#!/usr/bin/env bash
# Build llama.cpp's llama-server from the pinned source and install it into the venv's bin/:
# CUDA when nvcc and a GPU are present (sm_90 H100/H200, sm_100 B200, from the GPU), else CPU.
#   ./scripts/bootstrap.sh                      # about 17 minutes on 2 cores (CPU build)
#   ./scripts/bootstrap.sh --cuda-arch 100      # override the architecture
#   ./scripts/bootstrap.sh --source ./llama.cpp --dry-run
# Flags go to `tensorforge bootstrap`. LLAMA_CPP_BUILD_JOBS sets the compile jobs (default: all
# cores); TF_LLAMACPP_BIN_DIR installs elsewhere.
set -euo pipefail
source "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/lib/setup.sh"  # a symlink to the script works too
ensure_venv cpu
case " $* " in
  *" --dry-run "*|*" --help "*|*" -h "*) ;;  # nothing is built: no compilers needed
  *) TF_SKIP_WHY="install them first, or the build below fails" ensure_debian cmake build-essential ninja-build ;;
esac
exec "$TF_VENV/bin/tensorforge" bootstrap --jobs "${LLAMA_CPP_BUILD_JOBS:-$(nproc)}" "$@"
