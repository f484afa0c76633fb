#!/usr/bin/env bash
# Measures what maximal publish requests leave in memory (BENCHMARKS.md,
# "Publish memory"): starts a release gateway (and, for `redis`, a private
# redis-server without persistence on loopback), sends N requests of
# ITEMS items x CHANNELS channels each, every channel a table session
# out of a pool of SESSIONS (so every item is kept in CHANNELS history
# scopes; SESSIONS=0: every channel a new session), and prints
# the gateway's RSS (VmRSS from /proc) after each request, and with Redis
# its `used_memory`, with the growth per publication.
#
#   scripts/publish_memory.sh [embedded|redis] [N] [ITEMS] [CHANNELS] [SESSIONS]
#       default: embedded 5 1000 100 1000 (the default bounds)
#
# The Redis command timeout is raised to 300 s so that a slow request
# completes instead of answering 504. WSGATEWAY_BIN=path runs another build (for example one from before a
# change); by default the script builds and runs target/release/wsgateway.
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-embedded}"
requests="${2:-5}"
items="${3:-1000}"
channels="${4:-100}"
sessions="${5:-1000}"
if [ -z "${WSGATEWAY_BIN:-}" ]; then
  cargo build --release --quiet
  WSGATEWAY_BIN=target/release/wsgateway
fi
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done' EXIT
redis_port=""
if [ "$mode" = redis ]; then
  redis_port="$(free_port)"
  redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no \
    --daemonize no --loglevel warning >/dev/null &
  pids+=($!)
  for _ in $(seq 100); do redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break; sleep 0.05; done
fi
port="$(free_port)"
env -i PATH="$PATH" \
  JWT_SECRET=publish-memory-jwt-secret-0123456789 \
  TABLE_TOKEN_SECRET=publish-memory-table-secret-0123456789 \
  WSGATEWAY_API_KEY=publish-memory-key \
  WSGATEWAY_MAX_PUBLISH_ITEMS="$items" \
  WSGATEWAY_MAX_PUBLISH_CHANNELS="$channels" \
  WSGATEWAY_MAX_PUBLISH_BYTES=67108864 \
  WSGATEWAY_REDIS_TIMEOUT_S=300 \
  RUST_LOG=warn \
  ${redis_port:+REDIS_URL=redis://127.0.0.1:$redis_port} \
  "$WSGATEWAY_BIN" serve --listen "127.0.0.1:$port" >/dev/null 2>&1 &
gateway=$!
pids+=("$gateway")
python3 - "$port" "$gateway" "$requests" "$items" "$channels" "$redis_port" "$sessions" <<'PY'
import json, subprocess, sys, time, urllib.request
port, pid, requests, items, channels, redis_port, sessions = sys.argv[1:8]
requests, items, channels, sessions = int(requests), int(items), int(channels), int(sessions)
pool = sessions or 2**62
base = f"http://127.0.0.1:{port}"

def rss_kib():
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])

def used_memory():
    if not redis_port:
        return None
    for _ in range(600):  # Redis answers BUSY while a long function runs
        info = subprocess.run(["redis-cli", "-p", redis_port, "info", "memory"],
                              capture_output=True, text=True).stdout
        for l in info.splitlines():
            if l.startswith("used_memory:"):
                return int(l.split(":")[1])
        time.sleep(0.5)
    sys.exit("Redis did not answer INFO")

for _ in range(300):
    try:
        health = json.load(urllib.request.urlopen(base + "/ws/health/detailed", timeout=1))
        if health["broker"]["status"] == "connected":
            break
    except Exception:
        pass
    time.sleep(0.05)
else:
    sys.exit("the gateway did not come up")
time.sleep(0.5)
rss0, mem0 = rss_kib(), used_memory()
print(f"{'mode':>10}: {'redis' if redis_port else 'embedded'}; {requests} requests of "
      f"{items} items x {channels} channels, sessions from a pool of {sessions or 'unbounded'}")
print(f"{'start':>10}: RSS {rss0/1024:8.1f} MiB" + (f"   Redis used_memory {mem0/2**20:8.1f} MiB" if redis_port else ""))
for r in range(requests):
    body = json.dumps([
        {"channels": [f"channel:session:{((r * items + i) * channels + k) % pool}" for k in range(channels)],
         "event": {"type": "ROUND_READY", "tenant_id": 1, "branch_id": 5, "n": i}}
        for i in range(items)]).encode()
    req = urllib.request.Request(base + "/api/publish", data=body, method="POST", headers={
        "Authorization": "Bearer publish-memory-key", "Content-Type": "application/json"})
    started = time.monotonic()
    try:
        status = urllib.request.urlopen(req, timeout=600).status
    except urllib.error.HTTPError as e:
        status = e.code
    took = time.monotonic() - started
    time.sleep(1.0)  # let the dispatcher drain its queue
    line = f"{'after ' + str(r + 1):>10}: RSS {rss_kib()/1024:8.1f} MiB"
    if redis_port:
        line += f"   Redis used_memory {used_memory()/2**20:8.1f} MiB"
    print(line + f"   (HTTP {status} in {took:.2f} s, body {len(body)/2**20:.1f} MiB)")
rss1, mem1 = rss_kib(), used_memory()
pubs = requests * items
print(f"{'growth':>10}: RSS {(rss1 - rss0)/1024:8.1f} MiB = {(rss1 - rss0) * 1024 / pubs:,.0f} B per publication"
      + (f";  Redis {(mem1 - mem0)/2**20:.1f} MiB = {(mem1 - mem0) / pubs:,.0f} B per publication" if redis_port else ""))
PY
