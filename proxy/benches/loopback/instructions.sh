#!/usr/bin/env bash
# Instructions per request of conduit-proxy under load (valgrind's callgrind), a figure that
# does not move with the machine's noise: the loopback benchmark's hello server behind one
# proxy (one worker), wrk -c50 for DUR s of warm-up, then DUR s counted; instructions counted
# only in the second window (callgrind_control toggles collection) divided by the requests the
# proxy's request_total counted in it.
#
# Usage: proxy/benches/loopback/instructions.sh [DUR] [BINARY]   (defaults 10 s, this tree's
#        release conduit-proxy). PROFILE=routes gives the proxy the benchmark's 10-route
#        profile. LOAD=h2 drives h2c instead (h2load -c10 -m10, prior knowledge; the proxy
#        speaks h2 upstream), the shape of the h2 row of concurrency.sh and issue #16.
#        CONNS=N and STREAMS=M change the load's connections (and h2 streams per connection),
#        to see whether instructions per request grow with concurrency.
#        MODEL=atomics also counts atomic read-modify-writes per request (atomics.py: an
#        instruction count takes each for one instruction, but each costs some 20 cycles);
#        MODEL=cache also gives callgrind's simulated instruction-cache misses and branch
#        mispredictions per request (the host's cache sizes), which an instruction count
#        does not show either; LL=SIZE,ASSOC,LINE sets the simulated last level (callgrind
#        models two levels: LL=2097152,16,64 makes it this host's 2 MB L2, to see what
#        misses it as connections grow). STEADY=1 (conduit only) counts a window inside one
#        run of the load instead of a whole run, so that opening and closing its connections
#        (one per connection, however long the run) stays out: at CONNS=1000 under valgrind a
#        run completes only about ten requests a connection. TARGET=haproxy measures haproxy
#        instead (one thread, h2 upstream for LOAD=h2, as in concurrency.sh), its requests
#        counted by the load tool.
#        Sends traffic only to 127.0.0.1 and ends every process it started.
set -euo pipefail
cd "$(dirname "$0")/../../.."
. proxy/benches/loopback/common.sh
DUR=${1:-10}
LOAD=${LOAD:-h1} TARGET=${TARGET:-conduit}
OUT=target/bench/instructions/$(date +%Y%m%d-%H%M%S)
mkdir -p "$OUT"
command -v valgrind >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq valgrind >/dev/null; }
command -v wrk >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq wrk >/dev/null; }
if [ "$LOAD" = h2 ] && ! command -v h2load >/dev/null 2>&1; then
    apt-get update -qq && apt-get install -y -qq nghttp2-client >/dev/null
fi
build_release
BINARY=${2:-target/release/conduit-proxy}
HELLO=127.0.0.1:18180 PROXY=127.0.0.1:18185 ADMIN=127.0.0.1:18291
PIDS=()
cleanup() { for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

target/release/conduit hello --listen "$HELLO" >"$OUT/hello.log" 2>&1 &
PIDS+=($!)
if [ "${PROFILE:-}" = routes ]; then
    ROUTES='
    profile:
      routes:
        - { name: create-order, match: { method: POST, path: { prefix: /api/orders } } }
        - { name: get-order, match: { method: GET, path: { regex: "/api/orders/[0-9]+" } } }
        - { name: list-orders, match: { method: GET, path: { exact: /api/orders } } }
        - name: beta-users
          match: { path: { prefix: /api/users/ }, headers: [ { name: x-tenant, exact: beta } ] }
        - { name: delete, match: { method: DELETE, path: { prefix: /api/ } } }
        - { name: assets, match: { path: { regex: "/static/.+[.](css|js)" } } }
        - { name: health, match: { path: { prefix: /healthz } } }
        - { name: update, match: { method: PUT, path: { prefix: /api/ } } }
        - { name: metrics, match: { path: { exact: /metrics } } }
        - name: root
          match: { method: GET, path: { exact: / } }
          timeouts: { request: 10s }'
else
    ROUTES=
fi
cat >"$OUT/mesh.yaml" <<MESH
services:
  hello:
    endpoints:
      - addr: $HELLO$ROUTES
MESH
case "${MODEL:-}" in
    atomics) MODEL_ARGS=(--dump-instr=yes) ;;
    cache) MODEL_ARGS=(--cache-sim=yes --branch-sim=yes ${LL:+--LL=$LL}) ;;
    '') MODEL_ARGS=() ;;
    *) echo "MODEL is atomics or cache"; exit 2 ;;
esac
CALLGRIND=(valgrind --tool=callgrind --instr-atstart=no "${MODEL_ARGS[@]}"
    --callgrind-out-file="$PWD/$OUT/callgrind.out")
if [ "$TARGET" = haproxy ]; then
    command -v haproxy >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq haproxy >/dev/null; }
    BINARY=$(command -v haproxy)
    { haproxy_defaults; cat <<CONF
frontend proxy
    bind $PROXY$([ "$LOAD" = h2 ] && echo " proto h2")
    default_backend hello
backend hello
    server s1 $HELLO$([ "$LOAD" = h2 ] && echo " proto h2")
CONF
    } >"$OUT/haproxy.cfg"
    "${CALLGRIND[@]}" "$BINARY" -db -f "$OUT/haproxy.cfg" >"$OUT/proxy.log" 2>&1 &
else
    CONDUIT_PROXY_OUTBOUND_ADDR=$PROXY CONDUIT_PROXY_ADMIN_ADDR=$ADMIN \
    CONDUIT_PROXY_DISCOVERY="file:$PWD/$OUT/mesh.yaml" CONDUIT_PROXY_WORKERS=1 CONDUIT_PROXY_LOG=warn \
        "${CALLGRIND[@]}" "$BINARY" >"$OUT/proxy.log" 2>&1 &
fi
PROXY_PID=$!; PIDS+=("$PROXY_PID")
for _ in $(seq 1 300); do
    if [ "$TARGET" = haproxy ] && [ "$LOAD" = h2 ]; then
        curl -fsS --http2-prior-knowledge "http://$PROXY/" >/dev/null 2>&1 && break
    else
        curl -fsS -H 'Host: hello' "http://$PROXY/" >/dev/null 2>&1 && break
    fi
    sleep 0.1
done
requests() { curl -fsS "http://$ADMIN/metrics" | awk '/^request_total\{direction="outbound"/ {s += $2} END {print s + 0}'; }
# Every response must be a 2xx from the hello server: a run of the proxy's own errors would
# count the wrong path. h2load's `Host` header does not set `:authority` (the proxy routes h2
# by `:authority`, RFC 9113 §8.3.1), so it is given as the pseudo-header.
# LOADED: the requests the last load completed (what haproxy's runs count).
LOADED=0
load() {
    local out dur=${1:-$DUR}
    if [ "$LOAD" = h2 ]; then
        out=$(h2load -t1 -c${CONNS:-10} -m${STREAMS:-10} -D "$dur" -H ':authority: hello' "http://$PROXY/" 2>&1)
        echo "$out" | grep -q ' 0 4xx, 0 5xx' || { echo "non-2xx responses: $out"; exit 1; }
        LOADED=$(echo "$out" | awk '/^requests:/ {print $8}')
    else
        out=$(wrk -t1 -c${CONNS:-50} -d"${dur}s" -H 'Host: hello' "http://$PROXY/" 2>&1)
        if echo "$out" | grep -q 'Non-2xx'; then echo "non-2xx responses: $out"; exit 1; fi
        LOADED=$(echo "$out" | awk '/requests in/ {print $1}')
    fi
}
load
if [ "${STEADY:-0}" = 1 ] && [ "$TARGET" = conduit ]; then
    # Counted inside one run of the load, from DUR s after it starts to DUR s before it ends:
    # its connections' opening and closing stay out of the window.
    load $((DUR * 3)) &
    LOADER=$!
    sleep "$DUR"
    r0=$(requests)
    callgrind_control -i on "$PROXY_PID" >/dev/null
    sleep "$DUR"
    callgrind_control -i off "$PROXY_PID" >/dev/null
    r1=$(requests)
    wait "$LOADER"
    curl -fsS -X POST "http://$ADMIN/shutdown" >/dev/null
    n=$((r1 - r0))
elif [ "$TARGET" = haproxy ]; then
    callgrind_control -i on "$PROXY_PID" >/dev/null
    load
    callgrind_control -i off "$PROXY_PID" >/dev/null
    kill "$PROXY_PID"
    n=$LOADED
else
    r0=$(requests)
    callgrind_control -i on "$PROXY_PID" >/dev/null
    load
    r1=$(requests)
    callgrind_control -i off "$PROXY_PID" >/dev/null
    curl -fsS -X POST "http://$ADMIN/shutdown" >/dev/null
    # The scrape between the two reads is one request the proxy did not count as outbound.
    n=$((r1 - r0))
fi
wait "$PROXY_PID" || true
ir=$(awk '/^totals:/ {t = $2} END {print t + 0}' "$OUT/callgrind.out")
echo "$TARGET $BINARY profile ${PROFILE:-none} load $LOAD: $n requests, $ir instructions, $((ir / n)) per request"
if [ "${MODEL:-}" = cache ]; then
    # events: Ir Dr Dw I1mr D1mr D1mw ILmr DLmr DLmw Bc Bcm Bi Bim
    awk -v n="$n" '/^totals:/ {printf "per request: %.0f I1 misses, %.0f D1 misses, %.0f LL misses, %.0f mispredicted conditional branches, %.1f mispredicted indirect branches\n", $5 / n, ($6 + $7) / n, ($8 + $9 + $10) / n, $12 / n, $14 / n}' "$OUT/callgrind.out"
elif [ "${MODEL:-}" = atomics ]; then
    python3 proxy/benches/loopback/atomics.py "$OUT/callgrind.out" "$BINARY" "$n" --sites 20
fi
