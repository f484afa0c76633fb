#!/usr/bin/env bash
# Measures the Redis fault timings BENCHMARKS.md reports: how long after
# Redis accepts connections again live delivery (and the publish API) is
# back, and how long after a silent black hole a node notices. Runs the
# fault tests of tests/it/redis_faults.rs N times (default 5) against real
# redis-server processes on loopback and prints the medians.
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${1:-5}"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
cargo test --release --test it --no-run >/dev/null 2>&1
for _ in $(seq "$runs"); do
  for t in live_delivery_is_back a_silently_dead_path; do
    cargo test --release --test it "redis_faults::$t" -- --nocapture 2>/dev/null | grep '^measured:' >>"$log"
  done
done
python3 - "$log" <<'PY'
import re, statistics, sys
lines = open(sys.argv[1]).read().splitlines()
def secs(text):
    m = re.match(r"([\d.]+)(ms|s|µs)", text)
    v = float(m.group(1))
    return v / 1000 if m.group(2) == "ms" else v / 1e6 if m.group(2) == "µs" else v
series = {}
for line in lines:
    for label, value in re.findall(r"(live delivery|publish API|dead path detected after|both connections|delivering) ([\d.]+(?:ms|s|µs))", line):
        series.setdefault(label, []).append(secs(value))
for label, values in series.items():
    print(f"{label:28} median {statistics.median(values):.2f} s  (min {min(values):.2f}, max {max(values):.2f}, n={len(values)})")
PY
