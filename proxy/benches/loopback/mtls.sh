#!/usr/bin/env bash
# The cost of a meshed hop with mutual TLS (issue #12): client -> proxy A (outbound, plaintext
# HTTP/1.1) -> mTLS -> proxy B (inbound) -> app, against the same chain in plaintext and against
# two nginx doing the same mTLS hop, in one run.
#
# Targets, interleaved within each rep (direct -> conduit-mtls -> conduit-plain -> nginx-mtls):
#   direct         the client straight to the app (`conduit hello`, one thread): the baseline
#                  for added latency, measured in the same rep
#   conduit-mtls   conduit-proxy A (outbound) -> conduit-proxy B (inbound) -> app. Both proxies
#                  get their identity (a.bench / b.bench.serviceaccount.identity.conduit.local)
#                  from conduit-controller's CA, which bootstraps into $OUT/identity; the mesh
#                  lists `hello.bench:80` with one endpoint, B's inbound, and B's identity, so A
#                  speaks TLS 1.3 with its certificate to B. The script asserts it: B's
#                  request_total{direction="inbound",tls="true"} must grow by at least the
#                  requests wrk completed in every rep, and B must count no plaintext request.
#   conduit-plain  the same two-proxy chain (proxies C -> D) without identities: the mesh lists
#                  `plain.bench:80` (same length as hello.bench) with D's inbound and no
#                  `identity:`, so the hop is plaintext (asserted the other way round). The
#                  difference with conduit-mtls is what mTLS itself costs.
#   nginx-mtls     nginx A (one worker, plaintext listener) -> proxy_pass https:// with a client
#                  certificate, TLS 1.3, verification of B's certificate and name, session
#                  reuse and upstream keep-alive -> nginx B (one worker, `ssl_verify_client on`)
#                  -> app with upstream keep-alive. Certificates (ECDSA P-256, like the mesh's)
#                  are made with openssl into $OUT/tls. Before measuring, a request to
#                  /mtls-check is logged by nginx B with $ssl_client_verify, which must read
#                  SUCCESS over TLSv1.3 (only that location logs, so the measured path does not).
# Every server (app, proxies, nginx, the controller) runs on CPU 0, as sidecars share their
# app's core; every load generator runs on CPU 1. Proxies have CONDUIT_PROXY_WORKERS=1, nginx
# one worker; upstream connections are kept alive everywhere (nginx keepalive_requests raised
# so neither hop reconnects every 1,000 requests). The controller is idle after start-up and is
# left out of the CPU figures (its CPU is recorded to show it).
# Per target and rep:
#   closed loop  wrk -t1 -c50 for DUR s: requests/s, CPU per request of the two proxies
#                together (from /proc utime+stime) and the app's separately
#   open loop    `conduit load` at 1,000 and 5,000 req/s, 50 connections, latency from the
#                intended send time: p50/p90/p99/p99.9 and added p50 against `direct`
#   memory       RSS (and high-water mark) of proxy A and proxy B after the runs, to compare
#                with the issue's target: one proxy with 50 connections at most 25 MB
# Results: target/bench/mtls/<time>/results.json and summary.md (medians over reps).
#
# Usage: proxy/benches/loopback/mtls.sh [REPS] [DUR]   (defaults 3 reps of 10 s per step)
# Sends traffic only to 127.0.0.1, ends every process it started (by PID), and stops by itself.
set -euo pipefail
cd "$(dirname "$0")/../../.."
. proxy/benches/loopback/common.sh
REPS=${1:-3}
DUR=${2:-10}
OUT=target/bench/mtls/$(date +%Y%m%d-%H%M%S)
mkdir -p "$OUT"
ABS=$PWD/$OUT

need() { command -v "$1" >/dev/null 2>&1; }
if ! need wrk || ! need nginx; then
    apt-get update -qq && apt-get install -y -qq wrk nginx-light >/dev/null
fi
need openssl || { apt-get update -qq && apt-get install -y -qq openssl >/dev/null; }
build_release conduit-controller
BIN=target/release

HELLO=127.0.0.1:18680
CTRL=127.0.0.1:18681 CTRL_ADMIN=127.0.0.1:18682
A_OUT=127.0.0.1:18683 A_ADMIN=127.0.0.1:18783
B_IN=127.0.0.1:18684 B_ADMIN=127.0.0.1:18784
C_OUT=127.0.0.1:18685 C_ADMIN=127.0.0.1:18785
D_IN=127.0.0.1:18686 D_ADMIN=127.0.0.1:18786
NGX_A=127.0.0.1:18687 NGX_B=127.0.0.1:18688
A_ID=a.bench.serviceaccount.identity.conduit.local
B_ID=b.bench.serviceaccount.identity.conduit.local
PIDS=()
cleanup() { for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
fail() { echo "mtls.sh: $*" >&2; exit 1; }
# wait_for WHAT CMD...: retries CMD for up to 20 s.
wait_for() {
    local what=$1; shift
    for _ in $(seq 1 200); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
    fail "$what did not come up (see $OUT/*.log)"
}

taskset -c 0 "$BIN/conduit" hello --listen "$HELLO" >"$OUT/hello.log" 2>&1 &
HELLO_PID=$!; PIDS+=("$HELLO_PID")

# --- The controller: the mesh and the identity CA. ---
cat >"$OUT/mesh.yaml" <<MESH
services:
  hello.bench:
    port: 80
    endpoints:
      - addr: $B_IN
        identity: $B_ID
  plain.bench:
    port: 80
    endpoints:
      - addr: $D_IN
MESH
CONDUIT_CONTROLLER_GRPC_ADDR=$CTRL CONDUIT_CONTROLLER_ADMIN_ADDR=$CTRL_ADMIN \
CONDUIT_CONTROLLER_MESH_FILE=$ABS/mesh.yaml CONDUIT_CONTROLLER_IDENTITY_DIR=$ABS/identity \
CONDUIT_CONTROLLER_LOG=warn \
    taskset -c 0 "$BIN/conduit-controller" >"$OUT/controller.log" 2>&1 &
CTRL_PID=$!; PIDS+=("$CTRL_PID")
wait_for controller curl -fsS "http://$CTRL_ADMIN/ready"
wait_for "the controller's trust anchors" test -s "$OUT/identity/trust-anchors.pem"
token_file() { # NAME FILE: the bootstrap token for NAME, in a 0600 file
    (umask 077 && "$BIN/conduit" identity token "$1" --identity-dir "$ABS/identity" >"$2")
}
token_file "$A_ID" "$OUT/a.token"
token_file "$B_ID" "$OUT/b.token"

# --- The proxies. ---
# start_proxy NAME OUTBOUND INBOUND ADMIN [VAR=VALUE...]
start_proxy() {
    local name=$1 outbound=$2 inbound=$3 admin=$4; shift 4
    env CONDUIT_PROXY_OUTBOUND_ADDR="$outbound" CONDUIT_PROXY_INBOUND_ADDR="$inbound" \
        CONDUIT_PROXY_ADMIN_ADDR="$admin" CONDUIT_PROXY_DISCOVERY="$CTRL" \
        CONDUIT_PROXY_WORKERS=1 CONDUIT_PROXY_LOG=warn "$@" \
        taskset -c 0 "$BIN/conduit-proxy" >"$OUT/$name.log" 2>&1 &
}
anchors=CONDUIT_PROXY_IDENTITY_TRUST_ANCHORS=$ABS/identity/trust-anchors.pem
start_proxy proxy-b 127.0.0.1:0 "$B_IN" "$B_ADMIN" CONDUIT_PROXY_IDENTITY_NAME="$B_ID" \
    CONDUIT_PROXY_IDENTITY_TOKEN_FILE="$ABS/b.token" "$anchors" \
    CONDUIT_PROXY_APP_ADDR="$HELLO" CONDUIT_PROXY_SERVICE=hello.bench:80
B_PID=$!; PIDS+=("$B_PID")
start_proxy proxy-a "$A_OUT" 127.0.0.1:0 "$A_ADMIN" CONDUIT_PROXY_IDENTITY_NAME="$A_ID" \
    CONDUIT_PROXY_IDENTITY_TOKEN_FILE="$ABS/a.token" "$anchors"
A_PID=$!; PIDS+=("$A_PID")
start_proxy proxy-d 127.0.0.1:0 "$D_IN" "$D_ADMIN" \
    CONDUIT_PROXY_APP_ADDR="$HELLO" CONDUIT_PROXY_SERVICE=plain.bench:80
D_PID=$!; PIDS+=("$D_PID")
start_proxy proxy-c "$C_OUT" 127.0.0.1:0 "$C_ADMIN"
C_PID=$!; PIDS+=("$C_PID")

# --- nginx, with its own CA (ECDSA P-256): a server certificate for B, a client one for A. ---
TLS=$OUT/tls
mkdir -p "$TLS"
ossl() { openssl "$@" >>"$OUT/openssl.log" 2>&1 || fail "openssl $1 failed (see $OUT/openssl.log)"; }
for key in ca server client; do ossl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$TLS/$key.key"; done
ossl req -x509 -new -key "$TLS/ca.key" -sha256 -days 2 -subj "/CN=bench nginx CA" \
    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign \
    -out "$TLS/ca.crt"
# leaf NAME SUBJECT_NAME EKU
leaf() {
    ossl req -new -key "$TLS/$1.key" -subj "/CN=$2" -out "$TLS/$1.csr"
    printf 'subjectAltName=DNS:%s\nextendedKeyUsage=%s\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n' \
        "$2" "$3" >"$TLS/$1.ext"
    ossl x509 -req -in "$TLS/$1.csr" -CA "$TLS/ca.crt" -CAkey "$TLS/ca.key" -set_serial "0x$(openssl rand -hex 8)" \
        -days 2 -sha256 -extfile "$TLS/$1.ext" -out "$TLS/$1.crt"
}
leaf server "$B_ID" serverAuth
leaf client "$A_ID" clientAuth

cat >"$OUT/nginx-b.conf" <<CONF
worker_processes 1;
master_process off;
daemon off;
pid $ABS/nginx-b.pid;
error_log $ABS/nginx-b.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    log_format verify '\$ssl_client_verify \$ssl_protocol \$ssl_cipher "\$ssl_client_s_dn" \$status';
    upstream hello { server $HELLO; keepalive 64; keepalive_requests 1000000; }
    server {
        listen $NGX_B ssl;
        ssl_certificate $ABS/tls/server.crt;
        ssl_certificate_key $ABS/tls/server.key;
        ssl_protocols TLSv1.3;
        ssl_client_certificate $ABS/tls/ca.crt;
        ssl_verify_client on;
        keepalive_requests 1000000;
        location / { proxy_pass http://hello; proxy_http_version 1.1; proxy_set_header Connection ""; }
        location = /mtls-check {
            access_log $ABS/nginx-b-verify.log verify;
            proxy_pass http://hello; proxy_http_version 1.1; proxy_set_header Connection "";
        }
    }
}
CONF
cat >"$OUT/nginx-a.conf" <<CONF
worker_processes 1;
master_process off;
daemon off;
pid $ABS/nginx-a.pid;
error_log $ABS/nginx-a.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    upstream nginx_b { server $NGX_B; keepalive 64; keepalive_requests 1000000; }
    server {
        listen $NGX_A;
        keepalive_requests 1000000;
        location / {
            proxy_pass https://nginx_b;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_ssl_certificate $ABS/tls/client.crt;
            proxy_ssl_certificate_key $ABS/tls/client.key;
            proxy_ssl_protocols TLSv1.3;
            proxy_ssl_trusted_certificate $ABS/tls/ca.crt;
            proxy_ssl_verify on;
            proxy_ssl_name $B_ID;
            proxy_ssl_server_name on;
            proxy_ssl_session_reuse on;
        }
    }
}
CONF
taskset -c 0 nginx -c "$ABS/nginx-b.conf" &
NB_PID=$!; PIDS+=("$NB_PID")
taskset -c 0 nginx -c "$ABS/nginx-a.conf" &
NA_PID=$!; PIDS+=("$NA_PID")

# --- Wait (bounded) until everything answers, then check each hop is what it claims. ---
wait_for app curl -fsS "http://$HELLO/"
for admin in $A_ADMIN $B_ADMIN $C_ADMIN $D_ADMIN; do wait_for "proxy ($admin) /ready" curl -fsS "http://$admin/ready"; done
wait_for "conduit-mtls" curl -fsS -H 'Host: hello.bench' "http://$A_OUT/"
wait_for "conduit-plain" curl -fsS -H 'Host: plain.bench' "http://$C_OUT/"
wait_for "nginx-mtls" curl -fsS -H 'Host: hello.bench' "http://$NGX_A/"
curl -fsS -H 'Host: hello.bench' "http://$NGX_A/mtls-check" >/dev/null || fail "nginx-mtls /mtls-check failed"
# nginx writes its access log as the request ends; give it a moment.
for _ in $(seq 1 50); do [ -s "$OUT/nginx-b-verify.log" ] && break; sleep 0.1; done
grep -q "^SUCCESS TLSv1.3 " "$OUT/nginx-b-verify.log" \
    || fail "nginx B did not verify nginx A's client certificate over TLS 1.3: $(cat "$OUT/nginx-b-verify.log" 2>/dev/null)"
echo "nginx B: $(head -1 "$OUT/nginx-b-verify.log")"

TICK=$(getconf CLK_TCK)
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
sum_ticks() { local s=0; for p in "$@"; do s=$((s + $(cpu_ticks "$p"))); done; echo $s; }
seconds() { awk -v a="$1" -v b="$2" -v t="$TICK" 'BEGIN { printf "%.4f", (b - a) / t }'; }
rss_kb() { awk -v k="$2" '$1 == k":" {print $2}' "/proc/$1/status"; }
# inbound_count ADMIN tls|plain: requests a proxy's inbound counted over mTLS or in plaintext.
inbound_count() {
    local want='^request_total[{]direction="inbound",tls="true",'
    [ "$2" = plain ] && want='^request_total[{]direction="inbound",authority='
    curl -fsS "http://$1/metrics" | awk -v re="$want" '$0 ~ re { s += $NF } END { printf "%d", s }'
}

target_addr() {
    case $1 in direct) echo $HELLO ;; conduit-mtls) echo $A_OUT ;; conduit-plain) echo $C_OUT ;;
        nginx-mtls) echo $NGX_A ;; esac
}
target_host() { case $1 in conduit-plain) echo plain.bench ;; *) echo hello.bench ;; esac; }
target_pids() { # the client-side proxy, then the server-side one
    case $1 in direct) echo "" ;; conduit-mtls) echo "$A_PID $B_PID" ;;
        conduit-plain) echo "$C_PID $D_PID" ;; nginx-mtls) echo "$NA_PID $NB_PID" ;; esac
}
target_server_admin() { case $1 in conduit-mtls) echo $B_ADMIN ;; conduit-plain) echo $D_ADMIN ;; *) echo "" ;; esac; }

TARGETS="direct conduit-mtls conduit-plain nginx-mtls"
echo "[" >"$OUT/results.json"
first=1
for rep in $(seq 1 "$REPS"); do
    for target in $TARGETS; do
        addr=$(target_addr $target); host=$(target_host $target)
        # shellcheck disable=SC2207
        pids=($(target_pids $target)); admin=$(target_server_admin $target)
        load=$(cut -d' ' -f1 /proc/loadavg)
        tls0=0 plain0=0
        if [ -n "$admin" ]; then tls0=$(inbound_count "$admin" tls); plain0=$(inbound_count "$admin" plain); fi
        # Closed loop: saturation throughput and CPU per request.
        h0=$(cpu_ticks $HELLO_PID); c0=$(cpu_ticks $CTRL_PID); p0=$(sum_ticks "${pids[@]}")
        wrk_out=$(taskset -c 1 wrk -t1 -c50 -d"${DUR}s" -H "Host: $host" "http://$addr/")
        h1=$(cpu_ticks $HELLO_PID); c1=$(cpu_ticks $CTRL_PID); p1=$(sum_ticks "${pids[@]}")
        requests=$(echo "$wrk_out" | awk '/requests in/ {print $1}')
        rps=$(echo "$wrk_out" | awk '/Requests\/sec/ {print $2}')
        non2xx=$(echo "$wrk_out" | awk '/Non-2xx or 3xx responses/ {print $NF}')
        sockerr=$(echo "$wrk_out" | awk '/Socket errors/ {gsub(",", ""); print $4 + $6 + $8 + $10}')
        [ -n "$requests" ] && [ -n "$rps" ] || fail "rep $rep $target: wrk printed no result: $wrk_out"
        # Open loop at fixed rates.
        open1k=$(taskset -c 1 "$BIN/conduit" load "$addr" --authority "$host" --rate 1000 --duration "${DUR}s" --connections 50 --output json)
        open5k=$(taskset -c 1 "$BIN/conduit" load "$addr" --authority "$host" --rate 5000 --duration "${DUR}s" --connections 50 --output json)
        for p in $HELLO_PID $CTRL_PID "${pids[@]}"; do
            kill -0 "$p" 2>/dev/null || fail "rep $rep $target: process $p exited (see $OUT/*.log)"
        done
        rss_a=0 rss_b=0 hwm_a=0 hwm_b=0
        if [ ${#pids[@]} = 2 ]; then
            rss_a=$(rss_kb "${pids[0]}" VmRSS); hwm_a=$(rss_kb "${pids[0]}" VmHWM)
            rss_b=$(rss_kb "${pids[1]}" VmRSS); hwm_b=$(rss_kb "${pids[1]}" VmHWM)
        fi
        # The hop is what it claims: mTLS for conduit-mtls, plaintext for conduit-plain.
        tls_d=0 plain_d=0
        if [ -n "$admin" ]; then
            tls_d=$(( $(inbound_count "$admin" tls) - tls0 )); plain_d=$(( $(inbound_count "$admin" plain) - plain0 ))
            if [ $target = conduit-mtls ]; then
                [ "$tls_d" -ge "$requests" ] && [ "$plain_d" = 0 ] \
                    || fail "rep $rep conduit-mtls: proxy B counted $tls_d requests over mTLS and $plain_d in plaintext; wrk completed $requests"
            else
                [ "$plain_d" -ge "$requests" ] && [ "$tls_d" = 0 ] \
                    || fail "rep $rep conduit-plain: proxy D counted $plain_d requests in plaintext and $tls_d over mTLS; wrk completed $requests"
            fi
        fi
        [ $first = 1 ] || echo "," >>"$OUT/results.json"
        first=0
        cat >>"$OUT/results.json" <<JSON
{"rep": $rep, "target": "$target", "loadavg": $load, "requests": $requests, "rps": $rps,
 "non2xx": ${non2xx:-0}, "socket_errors": ${sockerr:-0},
 "proxies_cpu_s": $(seconds "$p0" "$p1"), "hello_cpu_s": $(seconds "$h0" "$h1"),
 "controller_cpu_s": $(seconds "$c0" "$c1"),
 "rss_a_kb": $rss_a, "rss_b_kb": $rss_b, "hwm_a_kb": $hwm_a, "hwm_b_kb": $hwm_b,
 "server_inbound_tls": $tls_d, "server_inbound_plain": $plain_d,
 "open_1000": $open1k, "open_5000": $open5k}
JSON
        echo "rep $rep $target: ${rps} req/s closed loop (load average $load)"
    done
done
echo "]" >>"$OUT/results.json"
python3 proxy/benches/loopback/summarize_mtls.py "$OUT/results.json" | tee "$OUT/summary.md"
