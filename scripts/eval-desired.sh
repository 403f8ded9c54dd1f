#!/usr/bin/env bash
# Evaluate every host's settings (hosts/<name>/settings.nix, its services.tensorforge.settings)
# through modules/lib, the same builtins-only code the NixOS module uses, and write the desired
# state as JSON:
#   scripts/eval-desired.sh OUTDIR      -> OUTDIR/<host>.json, one per host
# Needs only nix-instantiate (Nix >= 2.3); no nixpkgs, no network, no daemon.
set -euo pipefail

if [ $# -ne 1 ]; then
  echo "usage: $0 OUTDIR" >&2
  exit 2
fi
root="$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.." && pwd)"
outdir="$1"
mkdir -p "$outdir"

# Pure evaluation needs no store (--store dummy://); Nix still wants a state directory.
if [ -z "${NIX_STATE_DIR:-}" ] && [ ! -w /nix/var/nix ] 2>/dev/null; then
  export NIX_STATE_DIR="${TMPDIR:-/tmp}/tensorforge-nix-state"
fi

status=0
found=0
for settings in "$root"/hosts/*/settings.nix; do
  [ -e "$settings" ] || continue
  found=1
  host="$(basename "$(dirname "$settings")")"
  # restrict-eval: evaluation may read the repository and nothing else.
  if nix-instantiate --eval --strict --json --store dummy:// \
    --option restrict-eval true -I "tensorforge=$root" \
    --argstr settingsPath "$settings" \
    --expr '{ settingsPath }: (import <tensorforge/modules/lib>).evalHost (import (/. + settingsPath))' \
    >"$outdir/$host.json.tmp"; then
    mv "$outdir/$host.json.tmp" "$outdir/$host.json"
    echo "$outdir/$host.json"
  else
    rm -f "$outdir/$host.json.tmp"
    echo "error: evaluating $settings failed" >&2
    status=1
  fi
done
if [ "$found" = 0 ]; then
  echo "error: no hosts/*/settings.nix under $root" >&2
  exit 1
fi
exit "$status"
