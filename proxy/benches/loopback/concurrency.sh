#!/usr/bin/env bash
# Cost as concurrency grows: conduit-proxy against nginx and haproxy at 50, 500, 1,000 and
# 5,000 client connections, HTTP/1.1 (wrk) and h2 (h2load), one run, targets interleaved.
#
# Each proxy has a hello server (`conduit hello`) of its own; they and the proxy under test
# share CPU 0, load generators run on CPU 1. One hello server per proxy, because each holds
# its proxy's upstream pool (up to 5,000 connections, kept after a step until the pool's idle
# timeout): one server behind four proxies reached the 20,000-descriptor limit these machines
# set per process, failed its accepts, and the proxies' requests with them. Every proxy has one worker; nginx and haproxy keep upstream connections alive.
# Upstream protocols: conduit-proxy and haproxy speak h2 upstream for h2 clients (to the hello
# server, which answers h2c); nginx cannot proxy h2 upstream, so its h2 rows use HTTP/1.1
# upstream. Per point it records requests/s, the proxy's CPU per request (from /proc) and its
# resident memory at the end of the step, and reports medians over reps with each proxy's
# ratio to its own 50-connection figure.
#
# Usage: proxy/benches/loopback/concurrency.sh [REPS] [DUR] [LEVELS]
#        (defaults 3 reps, 10 s per point, "50 500 1000 5000"); BASELINE_BIN=<conduit-proxy>
#        adds that binary as `conduit-base`.
# Sends traffic only to 127.0.0.1, ends every process it started (by PID), stops by itself.
set -euo pipefail
cd "$(dirname "$0")/../../.."
. proxy/benches/loopback/common.sh
REPS=${1:-3}
DUR=${2:-10}
LEVELS=${3:-"50 500 1000 5000"}
OUT=target/bench/concurrency/$(date +%Y%m%d-%H%M%S)
mkdir -p "$OUT"
# 5,000 connections through a proxy take 10,000 descriptors in it and 5,000 in the generator
# (haproxy asks for twice its maxconn).
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

need() { command -v "$1" >/dev/null 2>&1; }
if ! need wrk || ! need nginx || ! need haproxy || ! need h2load; then
    apt-get update -qq && apt-get install -y -qq wrk nginx-light haproxy nghttp2-client >/dev/null
fi
build_release
BIN=target/release

declare -A ADDR H2ADDR PID HELLO HELLO_PID ADMIN
PIDS=()
cleanup() { for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

# start_hello TARGET PORT: the hello server behind TARGET.
start_hello() {
    HELLO[$1]=127.0.0.1:$2
    taskset -c 0 "$BIN/conduit" hello --listen "${HELLO[$1]}" >"$OUT/hello-$1.log" 2>&1 &
    HELLO_PID[$1]=$!; PIDS+=("${HELLO_PID[$1]}")
}
start_hello conduit 18480
start_hello nginx 18487
start_hello haproxy 18488
HELLO_FD_LIMIT=$(ulimit -n)
echo "descriptor limit per process: $HELLO_FD_LIMIT"

cat >"$OUT/nginx.conf" <<CONF
worker_processes 1;
worker_rlimit_nofile 20000;
master_process off;
daemon off;
pid $PWD/$OUT/nginx.pid;
error_log $PWD/$OUT/nginx.log warn;
events { worker_connections 19000; }
http {
    access_log off;
    # Clients' connections too are kept for the whole run: nginx closes one after 1,000
    # requests by default, which wrk survives by reconnecting but h2load does not (each h2
    # connection stopped after 1,000 requests, capping nginx's h2 rows at 1,000 per connection).
    keepalive_requests 1000000;
    upstream hello { server ${HELLO[nginx]}; keepalive 10000; keepalive_requests 1000000; }
    server {
        listen 127.0.0.1:18481;
        listen 127.0.0.1:18491 http2;
        location / { proxy_pass http://hello; proxy_http_version 1.1; proxy_set_header Connection ""; }
    }
}
CONF
taskset -c 0 nginx -c "$PWD/$OUT/nginx.conf" &
PID[nginx]=$!; PIDS+=("${PID[nginx]}")
ADDR[nginx]=127.0.0.1:18481; H2ADDR[nginx]=127.0.0.1:18491

{ haproxy_defaults; cat <<CONF
frontend h1
    bind 127.0.0.1:18482
    default_backend hello
frontend h2
    bind 127.0.0.1:18492 proto h2
    default_backend hello2
backend hello
    server s1 ${HELLO[haproxy]}
backend hello2
    server s1 ${HELLO[haproxy]} proto h2
CONF
} >"$OUT/haproxy.cfg"
taskset -c 0 haproxy -db -f "$OUT/haproxy.cfg" >"$OUT/haproxy.log" 2>&1 &
PID[haproxy]=$!; PIDS+=("${PID[haproxy]}")
ADDR[haproxy]=127.0.0.1:18482; H2ADDR[haproxy]=127.0.0.1:18492

# start_proxy NAME BINARY PORT ADMIN (after start_hello NAME)
start_proxy() {
    cat >"$OUT/mesh-$1.yaml" <<MESH
services:
  hello:
    endpoints:
      - addr: ${HELLO[$1]}
MESH
    CONDUIT_PROXY_OUTBOUND_ADDR=127.0.0.1:$3 CONDUIT_PROXY_ADMIN_ADDR=127.0.0.1:$4 \
    CONDUIT_PROXY_DISCOVERY="file:$PWD/$OUT/mesh-$1.yaml" CONDUIT_PROXY_WORKERS=1 \
    CONDUIT_PROXY_LOG=${PROXY_LOG:-warn} CONDUIT_PROXY_MAX_CONNECTIONS=9000 \
        taskset -c 0 "$2" >"$OUT/$1.log" 2>&1 &
}
start_proxy conduit "$BIN/conduit-proxy" 18485 18591
ADMIN[conduit]=127.0.0.1:18591
PID[conduit]=$!; PIDS+=("${PID[conduit]}")
ADDR[conduit]=127.0.0.1:18485; H2ADDR[conduit]=127.0.0.1:18485
TARGETS="conduit nginx haproxy"
if [ -n "${BASELINE_BIN:-}" ]; then
    start_hello conduit-base 18489
    start_proxy conduit-base "$BASELINE_BIN" 18486 18592
    ADMIN[conduit-base]=127.0.0.1:18592
    PID[conduit-base]=$!; PIDS+=("${PID[conduit-base]}")
    ADDR[conduit-base]=127.0.0.1:18486; H2ADDR[conduit-base]=127.0.0.1:18486
    TARGETS="$TARGETS conduit-base"
fi

for t in $TARGETS; do
    await_answer "$t" "${ADDR[$t]}"
done

TICK=$(getconf CLK_TCK)
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
rss_kb() { awk '$1 == "VmRSS:" {print $2}' "/proc/$1/status"; }

echo "[" >"$OUT/results.json"
first=1
for rep in $(seq 1 "$REPS"); do
    for level in $LEVELS; do
        for proto in h1 h2; do
            for t in $TARGETS; do
                pid=${PID[$t]}
                load=$(cut -d' ' -f1 /proc/loadavg)
                c0=$(cpu_ticks "$pid")
                if [ $proto = h1 ]; then
                    out=$(taskset -c 1 wrk -t1 -c"$level" -d"${DUR}s" -H 'Host: hello' "http://${ADDR[$t]}/" 2>&1)
                    requests=$(echo "$out" | awk '/requests in/ {print $1}')
                    rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
                    errors=$(echo "$out" | awk '/Non-2xx or 3xx responses/ {print $5}')
                else
                    out=$(taskset -c 1 h2load -t1 -c"$level" -m1 -D "$DUR" -H ':authority: hello' "http://${H2ADDR[$t]}/" 2>&1)
                    rps=$(echo "$out" | awk '/^finished in/ {print $4}')
                    # In timed mode h2load's totals can read 0; its rate is over the run.
                    requests=$(echo "$out" | awk '/^requests:/ {print $8}')
                    # A proxy's own errors are not the path being measured: count them.
                    errors=$(echo "$out" | awk '/^status codes:/ {print $7 + $9}')
                    if [ "${requests:-0}" = 0 ]; then
                        requests=$(awk -v r="$rps" -v d="$DUR" 'BEGIN { printf "%d", r * d }')
                    fi
                fi
                c1=$(cpu_ticks "$pid")
                rss=$(rss_kb "$pid")
                hello_fds=$(ls "/proc/${HELLO_PID[$t]}/fd" | wc -l)
                [ $first = 1 ] || echo "," >>"$OUT/results.json"
                first=0
                cpu_s=$(awk -v a="$c0" -v b="$c1" -v t="$TICK" 'BEGIN { printf "%.4f", (b - a) / t }')
                echo "{\"rep\": $rep, \"target\": \"$t\", \"proto\": \"$proto\", \"connections\": $level, \"loadavg\": $load, \"requests\": ${requests:-0}, \"rps\": ${rps:-0}, \"cpu_s\": $cpu_s, \"rss_kb\": $rss, \"hello_fds\": $hello_fds, \"errors\": ${errors:-0}}" >>"$OUT/results.json"
                echo "rep $rep $proto c=$level $t: ${rps:-?} req/s, ${cpu_s} s CPU, RSS ${rss} kB, hello fds $hello_fds (load $load)"
                if [ "${errors:-0}" != 0 ]; then echo "  WARNING: ${errors} responses were not 2xx"; fi
                # The hello server holds its proxy's upstream pool; near its descriptor limit its
                # accepts fail and the proxy's new upstream connects with them.
                if [ $((hello_fds * 10)) -ge $((HELLO_FD_LIMIT * 9)) ]; then
                    echo "  WARNING: $t's hello server holds $hello_fds descriptors of its limit $HELLO_FD_LIMIT"
                fi
            done
        done
    done
done
echo "]" >>"$OUT/results.json"
# What each conduit answered, by status: a proxy's own errors (502, 503, 504) show here with
# the reason's status, where the load generators only count them.
for t in "${!ADMIN[@]}"; do
    curl -fsS "http://${ADMIN[$t]}/metrics" | grep '^response_total' >"$OUT/$t.responses" || true
    if grep -v 'status_code="200"' "$OUT/$t.responses" | grep -q .; then
        echo "$t answered, besides 200s:"; grep -v 'status_code="200"' "$OUT/$t.responses"
    fi
done
python3 proxy/benches/loopback/summarize_concurrency.py "$OUT/results.json" | tee "$OUT/summary.md"
