#!/usr/bin/env bash
# Where conduit-proxy's CPU per request goes as connections grow: user and kernel time per
# request (from /proc) and system calls per request (`perf stat` on the syscall tracepoints of
# the proxy's PID), HTTP/1.1 (wrk) and h2 (h2load -m1), at each level.
#
# The hello server and the proxy share CPU 0; the load generator runs on CPU 1, as in
# concurrency.sh. Each point first warms the pool for 2 s, then times DUR s, then counts system
# calls over another DUR s (tracepoints slow each call, so the times come from a window without
# them). Connections the load generator opens and closes fall inside both windows, as in
# concurrency.sh.
# Without perf (or without tracepoint access) the syscall columns are left out.
#
# Usage: proxy/benches/loopback/per_request.sh [DUR] [LEVELS]   (defaults 5 s, "50 1000 5000");
#        PROTOS="h1 h2" picks the protocols; TARGETS="conduit haproxy" measures haproxy the
#        same way (one thread, h2 upstream for h2 clients, a hello server of its own, as in
#        concurrency.sh), to see where the two differ. STEADY=1 times the steady state: each
#        point also runs for 3 x DUR, and the times and requests of the short run are taken
#        from the long one's, so the cost of opening and closing the load's connections
#        (paid once a run, whatever its length) drops out. Sends traffic only to 127.0.0.1,
#        ends every process it started (by PID), stops by itself.
set -euo pipefail
cd "$(dirname "$0")/../../.."
. proxy/benches/loopback/common.sh
DUR=${1:-5}
LEVELS=${2:-"50 1000 5000"}
OUT=target/bench/per_request/$(date +%Y%m%d-%H%M%S)
mkdir -p "$OUT"
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
need() { command -v "$1" >/dev/null 2>&1; }
TARGETS=${TARGETS:-conduit}
if ! need wrk || ! need h2load || { [[ " $TARGETS " == *" haproxy "* ]] && ! need haproxy; }; then
    apt-get update -qq && apt-get install -y -qq wrk nghttp2-client haproxy >/dev/null
fi
build_release
BIN=target/release
HELLO=127.0.0.1:18680 PROXY=127.0.0.1:18685 ADMIN=127.0.0.1:18691
PIDS=()
cleanup() { for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

taskset -c 0 "$BIN/conduit" hello --listen "$HELLO" >"$OUT/hello.log" 2>&1 &
PIDS+=($!)
cat >"$OUT/mesh.yaml" <<MESH
services:
  hello:
    endpoints:
      - addr: $HELLO
MESH
CONDUIT_PROXY_OUTBOUND_ADDR=$PROXY CONDUIT_PROXY_ADMIN_ADDR=$ADMIN \
CONDUIT_PROXY_DISCOVERY="file:$PWD/$OUT/mesh.yaml" CONDUIT_PROXY_WORKERS=1 \
CONDUIT_PROXY_LOG=warn CONDUIT_PROXY_MAX_CONNECTIONS=9000 \
    taskset -c 0 "$BIN/conduit-proxy" >"$OUT/proxy.log" 2>&1 &
PP=$!; PIDS+=("$PP")
declare -A PID H1ADDR H2ADDR
PID[conduit]=$PP; H1ADDR[conduit]=$PROXY; H2ADDR[conduit]=$PROXY
if [[ " $TARGETS " == *" haproxy "* ]]; then
    HAPROXY_HELLO=127.0.0.1:18681
    taskset -c 0 "$BIN/conduit" hello --listen "$HAPROXY_HELLO" >"$OUT/hello-haproxy.log" 2>&1 &
    PIDS+=($!)
    { haproxy_defaults; cat <<CONF
frontend h1
    bind 127.0.0.1:18682
    default_backend hello
frontend h2
    bind 127.0.0.1:18692 proto h2
    default_backend hello2
backend hello
    server s1 $HAPROXY_HELLO
backend hello2
    server s1 $HAPROXY_HELLO proto h2
CONF
    } >"$OUT/haproxy.cfg"
    taskset -c 0 haproxy -db -f "$OUT/haproxy.cfg" >"$OUT/haproxy.log" 2>&1 &
    PID[haproxy]=$!; PIDS+=("${PID[haproxy]}")
    H1ADDR[haproxy]=127.0.0.1:18682; H2ADDR[haproxy]=127.0.0.1:18692
fi
for t in $TARGETS; do
    await_answer "$t" "${H1ADDR[$t]}"
done

EVENTS=raw_syscalls:sys_enter,syscalls:sys_enter_recvfrom,syscalls:sys_enter_sendto,syscalls:sys_enter_epoll_wait,syscalls:sys_enter_epoll_ctl,syscalls:sys_enter_accept4,syscalls:sys_enter_close
PERF=0
if need perf && perf stat -e raw_syscalls:sys_enter true >/dev/null 2>&1; then PERF=1; fi
TICK=$(getconf CLK_TCK)
ticks() { awk '{print $14, $15}' "/proc/$1/stat"; }
# load PROTO LEVEL SECONDS: prints the requests completed.
# load TARGET PROTO CONNECTIONS SECONDS: the requests it completed.
load() {
    if [ "$2" = h1 ]; then
        taskset -c 1 wrk -t1 -c"$3" -d"$4s" -H 'Host: hello' "http://${H1ADDR[$1]}/" 2>&1 | awk '/requests in/ {print $1}'
    else
        taskset -c 1 h2load -t1 -c"$3" -m1 -D "$4" -H ':authority: hello' "http://${H2ADDR[$1]}/" 2>&1 | awk '/^requests:/ {print $8}'
    fi
}
printf '| target | load | connections | requests | user us/req | kernel us/req | syscalls/req | recvfrom | sendto | epoll_wait | epoll_ctl | accept4 | close |\n'
printf '|---|---|---|---|---|---|---|---|---|---|---|---|---|\n'
for proto in ${PROTOS:-h1 h2}; do
    for level in $LEVELS; do
      for t in $TARGETS; do
        PP=${PID[$t]}
        load "$t" "$proto" "$level" 2 >/dev/null
        # Times first, in a window of their own: counting tracepoints slows every syscall.
        read -r u0 s0 < <(ticks "$PP")
        requests=$(load "$t" "$proto" "$level" "$DUR")
        read -r u1 s1 < <(ticks "$PP")
        if [ "${STEADY:-0}" = 1 ]; then
            # The steady state: a run three times as long, less the first. Both open and close
            # the same connections, so what is left is the cost of the extra requests alone.
            # (u0 and s0 become the short run's ticks, u1 and s1 the long run's: the report
            # below takes their difference.)
            read -r v0 t0 < <(ticks "$PP")
            long=$(load "$t" "$proto" "$level" $((DUR * 3)))
            read -r v1 t1 < <(ticks "$PP")
            u0=$((u1 - u0)); s0=$((s1 - s0)); u1=$((v1 - v0)); s1=$((t1 - t0))
            requests=$((long - requests))
        fi
        counts="| | | | | | |"
        if [ $PERF = 1 ]; then
            perf stat -x, -e "$EVENTS" -p "$PP" -o "$OUT/perf.$t.$proto.$level" &
            PERF_PID=$!
            counted=$(load "$t" "$proto" "$level" "$DUR")
            kill -INT "$PERF_PID"; wait "$PERF_PID" || true
            counts=$(awk -F, -v r="$counted" '$1 ~ /^[0-9]+$/ { printf "%s%.2f", (n++ ? " | " : "| "), $1 / r } END { print " |" }' "$OUT/perf.$t.$proto.$level")
        fi
        awk -v n="$t" -v p="$proto" -v l="$level" -v r="$requests" -v u=$((u1 - u0)) -v s=$((s1 - s0)) -v t="$TICK" -v c="$counts" \
            'BEGIN { printf "| %s | %s | %d | %d | %.2f | %.2f %s\n", n, p, l, r, u / t * 1e6 / r, s / t * 1e6 / r, c }'
      done
    done
done | tee "$OUT/summary.md"
