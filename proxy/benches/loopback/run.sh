#!/usr/bin/env bash
# Loopback benchmark of conduit-proxy against a direct connection and nginx, in one run.
#
# A one-thread hello server (`conduit hello`), nginx (one process, upstream keep-alive) and
# conduit-proxy (one worker, metrics and balancing on, no TLS) share CPU 0, as a sidecar shares
# its app's core; every load generator runs on CPU 1. Two conduit-proxy targets run: `proxy`
# (the service has no route profile) and `proxy-routes` (a 10-route profile: method, exact,
# prefix, regex and header matches, the request matching the last route, which has a request
# timeout, so route matching, per-route metrics and a deadline are paid on every request;
# circuit breaking off), and `proxy-retries` (the same profile with a retry policy and its
# budget on the matched route, and circuit breaking on: what retries and the breaker cost when
# nothing fails).
# With BASELINE_BIN=path/to/an/older/conduit-proxy, a `proxy-base` target runs that binary
# with the `proxy` setup, for before/after figures from one run. Targets are interleaved
# within each rep (direct -> nginx -> proxy -> proxy-routes [-> proxy-base]) and each rep
# records the load average, so noisy runs show. Per target and rep it measures:
#   closed loop  wrk -t1 -c50 for DUR s: requests/s and server CPU per request (from /proc)
#   open loop    `conduit load` at 1,000 and 5,000 req/s, 50 connections, latency from the
#                intended send time (no coordinated omission): exact p50/p90/p99/p99.9
#   memory       conduit-proxy's RSS and high-water mark after its HTTP/1.1 runs (50 connections)
#   h2 open loop then the same two rates over h2 with prior knowledge (`conduit load --h2`, 50
#                connections, requests multiplexed on them), direct and proxy only: the proxy
#                speaks h2 upstream to an h2 client; nginx cannot proxy h2 upstream, so it has
#                no h2 row. (From rep 2 on, the memory high-water mark includes earlier h2 runs.)
# Results: target/bench/loopback/<time>/results.json and a summary table (medians over reps).
#
# Usage: proxy/benches/loopback/run.sh [REPS] [DUR]   (defaults 3 reps of 10 s per step)
# Sends traffic only to 127.0.0.1, ends every process it started (by PID), and stops by itself.
set -euo pipefail
cd "$(dirname "$0")/../../.."
. proxy/benches/loopback/common.sh
REPS=${1:-3}
DUR=${2:-10}
OUT=target/bench/loopback/$(date +%Y%m%d-%H%M%S)
mkdir -p "$OUT"

need() { command -v "$1" >/dev/null 2>&1; }
if ! need wrk || ! need nginx; then
    apt-get update -qq && apt-get install -y -qq wrk nginx-light >/dev/null
fi
build_release
BIN=target/release

HELLO=127.0.0.1:18080 NGINX=127.0.0.1:18081 PROXY=127.0.0.1:18085 ROUTES=127.0.0.1:18086
RETRIES=127.0.0.1:18088
BASE=127.0.0.1:18087
PIDS=()
cleanup() { for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

taskset -c 0 "$BIN/conduit" hello --listen "$HELLO" >"$OUT/hello.log" 2>&1 &
HELLO_PID=$!; PIDS+=("$HELLO_PID")

cat >"$OUT/nginx.conf" <<CONF
worker_processes 1;
master_process off;
daemon off;
pid $PWD/$OUT/nginx.pid;
error_log $PWD/$OUT/nginx.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    upstream hello { server $HELLO; keepalive 128; keepalive_requests 1000000; }
    server {
        listen $NGINX;
        location / { proxy_pass http://hello; proxy_http_version 1.1; proxy_set_header Connection ""; }
    }
}
CONF
taskset -c 0 nginx -c "$PWD/$OUT/nginx.conf" &
NGINX_PID=$!; PIDS+=("$NGINX_PID")

cat >"$OUT/mesh.yaml" <<MESH
services:
  hello:
    endpoints:
      - addr: $HELLO
MESH
routes_mesh() { # BREAKER RETRY
cat <<MESH
services:
  hello:
    endpoints:
      - addr: $HELLO
    breaker: { enabled: $1 }
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
          timeouts: { request: 10s }
$2
MESH
}
routes_mesh false "" >"$OUT/mesh-routes.yaml"
routes_mesh true "          retry: { max_attempts: 3, budget: { ratio: 0.2, min_per_second: 10, ttl: 10s } }" \
    >"$OUT/mesh-retries.yaml"
# start_proxy NAME BINARY LISTEN ADMIN MESH
start_proxy() {
    CONDUIT_PROXY_OUTBOUND_ADDR=$3 CONDUIT_PROXY_INBOUND_ADDR=127.0.0.1:0 \
    CONDUIT_PROXY_ADMIN_ADDR=$4 CONDUIT_PROXY_DISCOVERY="file:$PWD/$OUT/$5" \
    CONDUIT_PROXY_WORKERS=1 CONDUIT_PROXY_LOG=warn \
        taskset -c 0 "$2" >"$OUT/$1.log" 2>&1 &
}
start_proxy proxy "$BIN/conduit-proxy" $PROXY 127.0.0.1:18191 mesh.yaml
PROXY_PID=$!; PIDS+=("$PROXY_PID")
start_proxy proxy-routes "$BIN/conduit-proxy" $ROUTES 127.0.0.1:18192 mesh-routes.yaml
ROUTES_PID=$!; PIDS+=("$ROUTES_PID")
start_proxy proxy-retries "$BIN/conduit-proxy" $RETRIES 127.0.0.1:18194 mesh-retries.yaml
RETRIES_PID=$!; PIDS+=("$RETRIES_PID")
TARGETS="direct nginx proxy proxy-routes proxy-retries"
ADDRS="$HELLO $NGINX $PROXY $ROUTES $RETRIES"
BASE_PID=""
if [ -n "${BASELINE_BIN:-}" ]; then
    start_proxy proxy-base "$BASELINE_BIN" $BASE 127.0.0.1:18193 mesh.yaml
    BASE_PID=$!; PIDS+=("$BASE_PID")
    TARGETS="$TARGETS proxy-base"
    ADDRS="$ADDRS $BASE"
fi

# Wait (bounded) for all of them to answer.
for addr in $ADDRS; do
    await_answer "$addr" "$addr"
done
# And h2 with prior knowledge where it is measured (when this curl speaks HTTP/2).
if curl -V | grep -qw HTTP2; then
    for addr in $ADDRS; do
        [ "$addr" = "$NGINX" ] && continue
        curl -fsS --http2-prior-knowledge "http://hello/" --connect-to "hello:80:$addr" >/dev/null \
            || { echo "$addr did not answer h2"; exit 1; }
    done
fi

TICK=$(getconf CLK_TCK)
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
seconds() { awk -v a="$1" -v b="$2" -v t="$TICK" 'BEGIN { printf "%.4f", (b - a) / t }'; }
rss_kb() { awk -v k="$2" '$1 == k":" {print $2}' "/proc/$1/status"; }

target_addr() {
    case $1 in direct) echo $HELLO ;; nginx) echo $NGINX ;; proxy) echo $PROXY ;;
        proxy-routes) echo $ROUTES ;; proxy-retries) echo $RETRIES ;; proxy-base) echo $BASE ;; esac
}
target_pid() {
    case $1 in direct) echo "" ;; nginx) echo $NGINX_PID ;; proxy) echo $PROXY_PID ;;
        proxy-routes) echo $ROUTES_PID ;; proxy-retries) echo $RETRIES_PID ;;
        proxy-base) echo $BASE_PID ;; esac
}

echo "[" >"$OUT/results.json"
first=1
for rep in $(seq 1 "$REPS"); do
    for target in $TARGETS; do
        addr=$(target_addr $target); pid=$(target_pid $target)
        load=$(cut -d' ' -f1 /proc/loadavg)
        # Closed loop: saturation throughput and CPU per request.
        h0=$(cpu_ticks $HELLO_PID); p0=0; [ -n "$pid" ] && p0=$(cpu_ticks "$pid")
        wrk_out=$(taskset -c 1 wrk -t1 -c50 -d"${DUR}s" -H 'Host: hello' "http://$addr/")
        h1=$(cpu_ticks $HELLO_PID); p1=0; [ -n "$pid" ] && p1=$(cpu_ticks "$pid")
        requests=$(echo "$wrk_out" | awk '/requests in/ {print $1}')
        rps=$(echo "$wrk_out" | awk '/Requests\/sec/ {print $2}')
        # Open loop at fixed rates.
        open1k=$(taskset -c 1 "$BIN/conduit" load "$addr" --authority hello --rate 1000 --duration "${DUR}s" --connections 50 --output json)
        open5k=$(taskset -c 1 "$BIN/conduit" load "$addr" --authority hello --rate 5000 --duration "${DUR}s" --connections 50 --output json)
        rss=0 hwm=0
        case $target in proxy*) rss=$(rss_kb "$pid" VmRSS); hwm=$(rss_kb "$pid" VmHWM) ;; esac
        # The same open loop over h2 (prior knowledge); nginx cannot proxy h2 upstream.
        h2open1k=null h2open5k=null
        if [ "$target" != nginx ]; then
            h2open1k=$(taskset -c 1 "$BIN/conduit" load "$addr" --h2 --authority hello --rate 1000 --duration "${DUR}s" --connections 50 --output json)
            h2open5k=$(taskset -c 1 "$BIN/conduit" load "$addr" --h2 --authority hello --rate 5000 --duration "${DUR}s" --connections 50 --output json)
        fi
        [ $first = 1 ] || echo "," >>"$OUT/results.json"
        first=0
        cat >>"$OUT/results.json" <<JSON
{"rep": $rep, "target": "$target", "loadavg": $load, "requests": $requests, "rps": $rps,
 "server_cpu_s": $(seconds "$p0" "$p1"), "hello_cpu_s": $(seconds "$h0" "$h1"),
 "rss_kb": $rss, "hwm_kb": $hwm, "open_1000": $open1k, "open_5000": $open5k,
 "h2_open_1000": $h2open1k, "h2_open_5000": $h2open5k}
JSON
        echo "rep $rep $target: ${rps} req/s closed loop (load average $load)"
    done
done
echo "]" >>"$OUT/results.json"
python3 proxy/benches/loopback/summarize.py "$OUT/results.json" | tee "$OUT/summary.md"
