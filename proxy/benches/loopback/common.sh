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
