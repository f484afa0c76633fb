#!/usr/bin/env bash
# The demo page serves a committed copy of the TypeScript client's browser
# bundle (src/http/demo/wsgateway-client.js, include_str!'d), so that the
# gateway builds and `dev` runs without Node. This keeps the copy in step:
#   scripts/demo_bundle.sh check    fail when the copy differs from the built
#                                   bundle (build the client first)
#   scripts/demo_bundle.sh refresh  build the client (npm ci && npm run build)
#                                   and copy its bundle; then commit the copy
set -euo pipefail
cd "$(dirname "$0")/.."

bundle=clients/typescript/dist/browser/wsgateway-client.js
copy=src/http/demo/wsgateway-client.js

case "${1:-}" in
  check)
    if [ ! -f "$bundle" ]; then
      echo "scripts/demo_bundle.sh: $bundle is missing: build the client first (cd clients/typescript && npm ci && npm run build)" >&2
      exit 1
    fi
    if ! cmp -s "$bundle" "$copy"; then
      echo "scripts/demo_bundle.sh: $copy differs from $bundle (the demo page would serve another client than the one built): run 'scripts/demo_bundle.sh refresh' and commit $copy" >&2
      exit 1
    fi
    echo "$copy is the built $bundle"
    ;;
  refresh)
    (cd clients/typescript && npm ci --no-audit --no-fund && npm run build)
    cp "$bundle" "$copy"
    echo "copied $bundle to $copy: commit it"
    ;;
  *)
    echo "usage: scripts/demo_bundle.sh check|refresh" >&2
    exit 2
    ;;
esac
