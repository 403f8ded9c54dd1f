#!/usr/bin/env bash
# Everything CI checks: lint, format and types, then the test suite (unit, integration
# against the real llama.cpp server and the real vLLM on CPU, real systemd, Prometheus,
# PostgreSQL and Nix evaluation where present).
#   ./scripts/test.sh            all tests
#   ./scripts/test.sh -k gateway pytest arguments pass through
set -euo pipefail
source "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/lib/setup.sh"  # a symlink to the script works too
ensure_venv cpu,analyze,postgres,test  # every feature the suite covers
# The operations plane's tests: a real NATS server and a headless browser (docs/operations.md).
ensure_debian nats-server chromium
ensure_debian nix-bin systemd-container prometheus postgresql iproute2 shellcheck
# The real vLLM for tests marked `vllm`: built once, outside the clone (about 3.5 GB, minutes
# the first time, nothing after). TF_VLLM=0 skips building it; those tests then skip.
if [ "${TF_VLLM:-1}" != 0 ]; then
  source "$TF_ROOT/scripts/lib/vllm-venv.sh"
  ensure_vllm_venv
  ensure_vllm_model "$(tf_smollm2_gguf)"
fi
cd "$TF_ROOT"
# nixpkgs' lib (nix-community/nixpkgs.lib), unpacked outside the repository: the NixOS module
# is then evaluated by the real lib.evalModules (tests/test_nix_module_eval.py).
if [ -z "${NIXPKGS_LIB:-}" ] && [ -d /opt/nixpkgs-lib ]; then
  export NIXPKGS_LIB=/opt/nixpkgs-lib
fi
"$TF_VENV/bin/ruff" check reconciler tests bench
"$TF_VENV/bin/ruff" format --check reconciler tests bench
# Types: strict on plan, controller, config and gateway; the settings are in pyproject.toml.
"$TF_VENV/bin/mypy" reconciler
exec "$TF_PY" -m pytest "$@"
