# Sourced by the loopback benchmarks: what they share.

# The head of every benchmark's haproxy.cfg: one thread (as each proxy has one worker),
# upstream connections kept and shared, timeouts well past any run.
haproxy_defaults() {
    cat <<CONF
global
    nbthread 1
    maxconn 9000
defaults
    mode http
    http-reuse always
    timeout connect 5s
    timeout client 30s
    timeout server 30s
CONF
}

# await_answer NAME ADDR: waits up to 10 s for an HTTP/1.1 request to ADDR (Host: hello) to
# succeed, and ends the benchmark if it never does.
await_answer() {
    for _ in $(seq 1 100); do
        curl -fsS -H 'Host: hello' "http://$2/" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    curl -fsS -H 'Host: hello' "http://$2/" >/dev/null || { echo "$1 did not answer"; exit 1; }
}

# build_release [PACKAGE...]: the release conduit-proxy as it ships, then the CLI (the hello
# server, load tools) and any other PACKAGE. Separate builds: cargo unifies features across the
# packages of one build, and the CLI's simulation turns on the proxy's `fault-points`, which a
# shipped proxy never carries (CI checks it); built together, the benchmarked proxy would be
# one nobody runs. BUILD=0 skips both: to measure a binary just built by hand, without
# relinking the CLI after each change to the proxy (a few minutes on 2 cores).
build_release() {
    [ "${BUILD:-1}" = 0 ] && return
    cargo build --release -q -p conduit-proxy
    local package args=(-p conduit-cli)
    for package in "$@"; do args+=(-p "$package"); done
    cargo build --release -q "${args[@]}"
}
