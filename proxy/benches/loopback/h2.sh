#!/usr/bin/env bash
# HTTP/2 and gRPC cost of conduit-proxy against haproxy, side by side in one run (issue #16).
#
# Backends (not ours for h2): nghttpd (Debian's nghttp2-server) serving a 12-byte file over
# h2c, and `conduit hello` answering unary gRPC (an empty message, grpc-status 0 in the
# trailers). In front of each: conduit-proxy (one worker) and haproxy (one thread), both h2c in
# and h2c out. Backends and proxies share CPU 0; h2load runs on CPU 1.
# Rows, per target and rep, targets interleaved within each rep:
#   h2     closed loop `h2load -t1 -c10 -m10 -n N` GET of the file
#   grpc   the same shape of unary gRPC calls (POST of an empty message, te: trailers)
#   open   open loop over h2 (`conduit load --h2`, 50 connections) at 1,000 and 5,000 req/s:
#          p50 latency, direct to nghttpd and through each proxy (the latency a proxy adds)
# CPU per request is the proxy process's utime+stime from /proc over the run / requests;
# resident memory is read after the h2 row (50 connections were opened by then in rep 1's
# open loop of the previous rep; 10 by h2load).
#
# Usage: proxy/benches/loopback/h2.sh [REPS] [N]   (defaults 3 reps, 200,000 requests per row)
#        BASELINE_BIN=<conduit-proxy> adds that binary as `conduit-base`.
# Sends traffic only to 127.0.0.1, ends every process it started (by PID), stops by itself.
set -euo pipefail
cd "$(dirname "$0")/../../.."
. proxy/benches/loopback/common.sh
REPS=${1:-3}
N=${2:-200000}
OUT=target/bench/h2/$(date +%Y%m%d-%H%M%S)
mkdir -p "$OUT"

need() { command -v "$1" >/dev/null 2>&1; }
if ! need haproxy || ! need h2load || ! need nghttpd; then
    apt-get update -qq && apt-get install -y -qq haproxy nghttp2-client nghttp2-server >/dev/null
fi
build_release
BIN=target/release

NGHTTPD=127.0.0.1:18680 GRPC=127.0.0.1:18681
declare -A ADDR PID
PIDS=()
cleanup() { for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

mkdir -p "$OUT/www"
printf 'hello world\n' >"$OUT/www/index.html"
taskset -c 0 nghttpd --no-tls -n 1 -d "$OUT/www" 18680 >"$OUT/nghttpd.log" 2>&1 &
PIDS+=($!)
taskset -c 0 "$BIN/conduit" hello --listen "$GRPC" >"$OUT/hello.log" 2>&1 &
PIDS+=($!)
# An empty gRPC message: no compression, length 0.
printf '\0\0\0\0\0' >"$OUT/grpc-message"

{ haproxy_defaults; cat <<CONF
frontend h2
    bind 127.0.0.1:18682 proto h2
    use_backend grpc if { req.hdr(content-type) -m beg application/grpc }
    default_backend nghttpd
backend nghttpd
    server s1 $NGHTTPD proto h2
backend grpc
    server s1 $GRPC proto h2
CONF
} >"$OUT/haproxy.cfg"
taskset -c 0 haproxy -db -f "$OUT/haproxy.cfg" >"$OUT/haproxy.log" 2>&1 &
PID[haproxy]=$!; PIDS+=("${PID[haproxy]}")
ADDR[haproxy]=127.0.0.1:18682

cat >"$OUT/mesh.yaml" <<MESH
services:
  nghttpd:
    endpoints:
      - addr: $NGHTTPD
  grpc:
    endpoints:
      - addr: $GRPC
MESH
# start_proxy NAME BINARY PORT ADMIN
start_proxy() {
    CONDUIT_PROXY_OUTBOUND_ADDR=127.0.0.1:$3 CONDUIT_PROXY_ADMIN_ADDR=127.0.0.1:$4 \
    CONDUIT_PROXY_DISCOVERY="file:$PWD/$OUT/mesh.yaml" CONDUIT_PROXY_WORKERS=1 \
    CONDUIT_PROXY_LOG=warn taskset -c 0 "$2" >"$OUT/$1.log" 2>&1 &
}
start_proxy conduit "$BIN/conduit-proxy" 18685 18691
PID[conduit]=$!; PIDS+=("${PID[conduit]}")
ADDR[conduit]=127.0.0.1:18685
TARGETS="conduit haproxy"
if [ -n "${BASELINE_BIN:-}" ]; then
    start_proxy conduit-base "$BASELINE_BIN" 18686 18692
    PID[conduit-base]=$!; PIDS+=("${PID[conduit-base]}")
    ADDR[conduit-base]=127.0.0.1:18686
    TARGETS="conduit conduit-base haproxy"
fi

for t in $TARGETS; do
    for _ in $(seq 1 100); do
        h2load -n1 -c1 -H ':authority: nghttpd' "http://${ADDR[$t]}/index.html" 2>/dev/null \
            | grep -q '1 2xx' && break
        sleep 0.1
    done
    h2load -n1 -c1 -H ':authority: nghttpd' "http://${ADDR[$t]}/index.html" | grep -q '1 2xx' \
        || { echo "$t did not answer h2"; exit 1; }
done

TICK=$(getconf CLK_TCK)
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
rss_kb() { awk '$1 == "VmRSS:" {print $2}' "/proc/$1/status"; }

# closed ROW TARGET: one closed-loop row; prints "requests rps cpu_s errors".
closed() {
    local row=$1 t=$2 out
    local c0 c1
    c0=$(cpu_ticks "${PID[$t]}")
    if [ "$row" = h2 ]; then
        out=$(taskset -c 1 h2load -t1 -c10 -m10 -n "$N" -H ':authority: nghttpd' "http://${ADDR[$t]}/index.html" 2>&1)
    else
        out=$(taskset -c 1 h2load -t1 -c10 -m10 -n "$N" -d "$OUT/grpc-message" \
            -H ':authority: grpc' -H 'content-type: application/grpc' -H 'te: trailers' \
            "http://${ADDR[$t]}/hello.Hello/Say" 2>&1)
    fi
    c1=$(cpu_ticks "${PID[$t]}")
    local ok rps errors
    ok=$(echo "$out" | awk '/^status codes:/ {print $3}')
    rps=$(echo "$out" | awk '/^finished in/ {print $4}')
    errors=$(echo "$out" | awk '/^requests:/ {print $2 - $8}')
    echo "${ok:-0} ${rps:-0} $(awk -v a="$c0" -v b="$c1" -v t="$TICK" 'BEGIN { printf "%.4f", (b - a) / t }') ${errors:-0}"
}

# open TARGET-ADDR AUTHORITY RATE: p50 latency (us) of an open-loop h2 run.
open_p50() {
    taskset -c 1 "$BIN/conduit" load "$1" --h2 --authority "$2" --path /index.html --rate "$3" \
        --duration 5s --connections 50 --output json \
        | python3 -c 'import json,sys; d=json.load(sys.stdin); print(d.get("p50_us", "null"))' 2>/dev/null || echo null
}

echo "[" >"$OUT/results.json"
first=1
emit() {
    [ $first = 1 ] || echo "," >>"$OUT/results.json"
    first=0
    echo "$1" >>"$OUT/results.json"
}
for rep in $(seq 1 "$REPS"); do
    for row in h2 grpc; do
        for t in $TARGETS; do
            load=$(cut -d' ' -f1 /proc/loadavg)
            read -r requests rps cpu_s errors < <(closed "$row" "$t")
            rss=$(rss_kb "${PID[$t]}")
            emit "{\"rep\": $rep, \"row\": \"$row\", \"target\": \"$t\", \"requests\": $requests, \"rps\": $rps, \"cpu_s\": $cpu_s, \"rss_kb\": $rss, \"errors\": $errors, \"loadavg\": $load}"
            echo "rep $rep $row $t: $rps req/s, $cpu_s s CPU for $requests requests, RSS $rss kB (load $load)"
            if [ "$errors" != 0 ]; then echo "  WARNING: $errors requests failed"; fi
        done
    done
    for rate in 1000 5000; do
        for t in direct $TARGETS; do
            if [ $t = direct ]; then addr=$NGHTTPD; else addr=${ADDR[$t]}; fi
            p50=$(open_p50 "$addr" nghttpd "$rate")
            emit "{\"rep\": $rep, \"row\": \"open$rate\", \"target\": \"$t\", \"p50_us\": $p50}"
            echo "rep $rep open $rate/s $t: p50 ${p50} us"
        done
    done
done
echo "]" >>"$OUT/results.json"
python3 - "$OUT/results.json" <<'PY' | tee "$OUT/summary.md"
import json, statistics, sys
rows = json.load(open(sys.argv[1]))
def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None
targets = sorted({r["target"] for r in rows if r["row"] in ("h2", "grpc")})
print("| row | target | CPU us/request | req/s | RSS MB | x haproxy CPU |")
print("|---|---|---|---|---|---|")
for row in ("h2", "grpc"):
    cpu = {}
    for t in targets:
        rs = [r for r in rows if r["row"] == row and r["target"] == t]
        cpu[t] = med([r["cpu_s"] * 1e6 / r["requests"] for r in rs if r["requests"]])
    for t in targets:
        rs = [r for r in rows if r["row"] == row and r["target"] == t]
        rps = med([r["rps"] for r in rs])
        rss = med([r["rss_kb"] / 1024 for r in rs])
        ratio = cpu[t] / cpu["haproxy"] if cpu.get("haproxy") else float("nan")
        print(f"| {row} | {t} | {cpu[t]:.2f} | {rps:.0f} | {rss:.1f} | {ratio:.2f} |")
print()
print("| open loop | target | p50 us | added over direct |")
print("|---|---|---|---|")
for row in ("open1000", "open5000"):
    direct = med([r["p50_us"] for r in rows if r["row"] == row and r["target"] == "direct"])
    for t in ["direct"] + targets:
        p = med([r["p50_us"] for r in rows if r["row"] == row and r["target"] == t])
        added = "" if p is None or direct is None or t == "direct" else f"{p - direct:+.0f}"
        print(f"| {row} | {t} | {p} | {added} |")
PY
