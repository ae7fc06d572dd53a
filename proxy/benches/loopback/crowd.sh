#!/usr/bin/env bash
# A crowd of h2 clients leaving at once, and what it costs the clients who stay.
#
# Through conduit-proxy to a hello server (h2c upstream, the h2 crate under hyper, which
# closes a connection whose client resets more than 20 streams it has not yet accepted):
# each round, 1,000 h2 connections (h2load -c1000 -m1) send for DUR seconds and then leave
# together with requests in flight, while 10 other connections keep sending for DUR + 2
# seconds. The proxy's cancellations of the crowd's streams travel on the upstream
# connections the stayers share. Reports, per proxy, the stayers' failed requests, the
# proxy's answers by status (its own 502s show here; h2load cannot count answers to clients
# that left) and the hello server's logged connection errors.
#
# Usage: proxy/benches/loopback/crowd.sh [ROUNDS] [DUR]   (defaults 3 rounds of 3 s);
#        BASELINE_BIN=<conduit-proxy> adds that binary as `conduit-base`.
# Sends traffic only to 127.0.0.1, ends every process it started (by PID), stops by itself.
set -euo pipefail
cd "$(dirname "$0")/../../.."
. proxy/benches/loopback/common.sh
ROUNDS=${1:-3}
DUR=${2:-3}
OUT=target/bench/crowd/$(date +%Y%m%d-%H%M%S)
mkdir -p "$OUT"
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

command -v h2load >/dev/null 2>&1 || {
    apt-get update -qq && apt-get install -y -qq nghttp2-client >/dev/null
}
build_release
BIN=target/release

PIDS=()
cleanup() { for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

# run NAME BINARY PORT ADMIN HELLO_PORT
run() {
    local name=$1 bin=$2 port=$3 admin=$4 hello=127.0.0.1:$5
    taskset -c 0 "$BIN/conduit" hello --listen "$hello" >"$OUT/hello-$name.log" 2>&1 &
    local hello_pid=$!; PIDS+=("$hello_pid")
    cat >"$OUT/mesh-$name.yaml" <<MESH
services:
  hello:
    endpoints:
      - addr: $hello
MESH
    CONDUIT_PROXY_OUTBOUND_ADDR=127.0.0.1:$port CONDUIT_PROXY_ADMIN_ADDR=127.0.0.1:$admin \
    CONDUIT_PROXY_DISCOVERY="file:$PWD/$OUT/mesh-$name.yaml" CONDUIT_PROXY_WORKERS=1 \
    CONDUIT_PROXY_LOG=warn CONDUIT_PROXY_MAX_CONNECTIONS=9000 \
        taskset -c 0 "$bin" >"$OUT/$name.log" 2>&1 &
    local proxy_pid=$!; PIDS+=("$proxy_pid")
    await_answer "$name" "127.0.0.1:$port"
    local failed=0 sent=0
    for round in $(seq 1 "$ROUNDS"); do
        taskset -c 1 h2load -t1 -c10 -m1 -D $((DUR + 2)) -H ':authority: hello' \
            "http://127.0.0.1:$port/" >"$OUT/$name-stayers-$round.txt" 2>&1 &
        local stayers=$!
        taskset -c 1 h2load -t1 -c1000 -m1 -D "$DUR" -H ':authority: hello' \
            "http://127.0.0.1:$port/" >"$OUT/$name-crowd-$round.txt" 2>&1 || true
        wait "$stayers" || true
        # "requests: N total, N started, N done, N succeeded, N failed, N errored, N timeout"
        read -r s f < <(awk '/^requests:/ {print $2, $10 + $12}' "$OUT/$name-stayers-$round.txt")
        local non2xx
        non2xx=$(awk '/^status codes:/ {print $7 + $9}' "$OUT/$name-stayers-$round.txt")
        sent=$((sent + s)); failed=$((failed + f + non2xx))
    done
    curl -fsS "http://127.0.0.1:$admin/metrics" | grep '^response_total' >"$OUT/$name.responses" || true
    echo "== $name: $ROUNDS rounds of a 1,000-connection crowd leaving after ${DUR} s"
    echo "   stayers: $failed of $sent requests failed"
    echo "   answered by status (all clients):"
    awk '{match($0, /status_code="[0-9]+"/); n[substr($0, RSTART + 13, 3)] += $NF}
         END {for (s in n) printf "     %s: %d\n", s, n[s]}' "$OUT/$name.responses" | sort
    echo "   hello server connection errors: $(grep -c 'connection ended in error' "$OUT/hello-$name.log" || true)"
    grep -m1 -o 'remotely-reset pending-accept streams reached limit ([0-9]*)' "$OUT/hello-$name.log" \
        | sed 's/^/     e.g. /' || true
    kill "$proxy_pid" "$hello_pid" 2>/dev/null || true
    wait "$proxy_pid" "$hello_pid" 2>/dev/null || true
}

run conduit "$BIN/conduit-proxy" 18485 18591 18480
if [ -n "${BASELINE_BIN:-}" ]; then
    run conduit-base "$BASELINE_BIN" 18486 18592 18489
fi
echo "results in $OUT"
