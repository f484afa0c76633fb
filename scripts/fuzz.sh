#!/usr/bin/env bash
# Runs the cargo-fuzz targets (fuzz/fuzz_targets): the event parser, the
# client-message parser and the token verifier.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]     default: 60 s each, all targets
#
# cargo-fuzz needs nightly compiler flags; with only a stable toolchain this
# script sets RUSTC_BOOTSTRAP=1 and builds without a sanitizer (-s none),
# which still finds panics, overflows (debug assertions) and timeouts.
# Set FUZZ_SANITIZER=address for AddressSanitizer (slower to build).
# Findings are written to fuzz/artifacts/<target>/.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

seconds=${1:-60}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(event_parser client_message token_verifier)

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "== installing cargo-fuzz"
  cargo install --locked cargo-fuzz
fi
export RUSTC_BOOTSTRAP=1
sanitizer=${FUZZ_SANITIZER:-none}
cargo fuzz build -s "$sanitizer"
for target in "${targets[@]}"; do
  echo "== fuzzing $target for ${seconds}s"
  cargo fuzz run -s "$sanitizer" "$target" -- -max_total_time="$seconds" -rss_limit_mb=2048 2>&1 | tail -n 3
done
