#!/usr/bin/env bash
# A real Kubernetes control plane on loopback for the Kubernetes integration tests: etcd,
# kube-apiserver v1.20.2 and kube-controller-manager (only its endpoints controllers, so a
# Service's Endpoints follow its pods as in a cluster, and its namespace controller, so a
# deleted namespace goes away). There is no scheduler and no kubelet:
# tests patch a pod's status (phase, IP, Ready) to stand in for the kubelet.
#
# The two Kubernetes binaries are built from Debian bookworm's `kubernetes` source package
# (the full tree with vendor/, so the build is offline apart from apt), with Debian's Go, once
# per machine, into a cache directory outside the work tree
# (../shared/reference/machines.md, Q1). Later runs reuse them.
#
#   ci/kube-apiserver.sh build        build (or find) the binaries; prints where they are
#   ci/kube-apiserver.sh start DIR    start the three processes with their state in DIR, wait
#                                     until the API server is ready; writes DIR/kubeconfig
#   ci/kube-apiserver.sh stop DIR     stop what `start DIR` started (by the PIDs it recorded)
#
# CONDUIT_KUBE_CACHE overrides the cache directory (default ~/.cache/conduit/kube-v1.20.2).
# The tests find the server through CONDUIT_TEST_KUBECONFIG=DIR/kubeconfig; without it they
# skip and say why.
set -euo pipefail

VERSION=1.20.2
ORIG=kubernetes_1.20.5+really1.20.2.orig.tar.gz
CACHE=${CONDUIT_KUBE_CACHE:-${HOME:-/root}/.cache/conduit/kube-v$VERSION}
BIN=$CACHE/bin
# Loopback ports, away from the defaults a developer's own cluster tools would use.
ETCD_CLIENT=23790
ETCD_PEER=23800
APISERVER=16443
KCM=16444
TOKEN=conduit-test-token

log() { echo "kube-apiserver.sh: $*" >&2; }

apt_install() {
    local missing=()
    for pkg in "$@"; do
        dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
    done
    ((${#missing[@]})) || return 0
    if [[ $(id -u) != 0 ]] || ! command -v apt-get >/dev/null; then
        log "needs the Debian packages ${missing[*]} (not root, or no apt-get)"
        return 1
    fi
    log "installing ${missing[*]}"
    # Retried once after refreshing the lists: a machine image's lists may be stale.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null 2>&1 ||
        { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null; }
}

build() {
    apt_install etcd-server openssl
    if [[ -x $BIN/kube-apiserver && -x $BIN/kube-controller-manager ]]; then
        log "cached: $BIN"
        echo "$BIN"
        return
    fi
    local start=$SECONDS src=$CACHE/src
    apt_install golang-go rsync make golang-github-modern-go-reflect2-dev golang-github-json-iterator-go-dev
    mkdir -p "$src/lists/partial" "$src/parts"
    if [[ ! -f $src/$ORIG ]]; then
        # deb-src entries derived from the machine's own apt sources, in a private list
        # directory: the machine's apt configuration is left as it was.
        local sources=/etc/apt/sources.list.d/debian.sources
        if [[ -f $sources ]]; then
            sed 's/^Types: deb$/Types: deb-src/' "$sources" >"$src/parts/debian-src.sources"
        else
            sed -n 's/^deb /deb-src /p' /etc/apt/sources.list >"$src/parts/debian-src.list"
        fi
        local o=(-o Dir::Etc::sourcelist=/dev/null -o "Dir::Etc::sourceparts=$src/parts" -o "Dir::State::Lists=$src/lists")
        apt-get "${o[@]}" update -q >/dev/null
        (cd "$src" && apt-get "${o[@]}" source --download-only kubernetes >/dev/null)
    fi
    local tree=$src/kubernetes-$VERSION
    rm -rf "$tree"
    tar xzf "$src/$ORIG" -C "$src"
    # With Go >= 1.18 the vendored reflect2 1.0.1 makes the API server crash ("fatal error:
    # fault" in mapiterinit) on its first JSON-encoded map; Debian's reflect2 and json-iterator
    # are fixed.
    local d
    for d in modern-go/reflect2 json-iterator/go; do
        rm -rf "$tree/vendor/github.com/$d"
        cp -r "/usr/share/gocode/src/github.com/$d" "$tree/vendor/github.com/$d"
        rm -f "$tree/vendor/github.com/$d/go.mod"
    done
    log "building kube-apiserver and kube-controller-manager v$VERSION (about 10-15 minutes cold)"
    (cd "$tree" && KUBE_GIT_VERSION=v$VERSION KUBE_GIT_TREE_STATE=clean GOLDFLAGS="-s -w" \
        make WHAT="cmd/kube-apiserver cmd/kube-controller-manager" >"$src/build.log" 2>&1) ||
        { tail -30 "$src/build.log" >&2; return 1; }
    mkdir -p "$BIN"
    cp "$tree/_output/bin/kube-apiserver" "$tree/_output/bin/kube-controller-manager" "$BIN/"
    # The tree (1 GB built) is not needed again; the downloaded tarball stays for a rebuild.
    rm -rf "$tree"
    log "built in $((SECONDS - start)) s: $BIN"
    echo "$BIN"
}

wait_ready() {
    local dir=$1 i
    for i in $(seq 1 120); do
        if curl -sk --max-time 2 -H "Authorization: Bearer $TOKEN" "https://127.0.0.1:$APISERVER/readyz" 2>/dev/null | grep -qx ok; then
            return 0
        fi
        sleep 0.5
    done
    log "the API server was not ready after 60 s; its log:"
    tail -20 "$dir/kube-apiserver.log" >&2
    return 1
}

start() {
    local dir=${1:?usage: start DIR}
    build >/dev/null
    apt_install curl
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    stop "$dir" 2>/dev/null || true
    local port
    for port in $ETCD_CLIENT $ETCD_PEER $APISERVER $KCM; do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            log "port $port is in use (another API server? \`$0 stop ITS_DIR\` stops one this script started)"
            return 1
        fi
    done
    rm -rf "$dir/etcd" "$dir/certs"
    [[ -f $dir/sa.key ]] || openssl genrsa -out "$dir/sa.key" 2048 2>/dev/null
    openssl rsa -in "$dir/sa.key" -pubout -out "$dir/sa.pub" 2>/dev/null
    echo "$TOKEN,admin,1,system:masters" >"$dir/tokens.csv"
    cat >"$dir/kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: local
  cluster:
    server: https://127.0.0.1:$APISERVER
    insecure-skip-tls-verify: true
users:
- name: admin
  user:
    token: $TOKEN
contexts:
- name: local
  context: { cluster: local, user: admin, namespace: default }
current-context: local
EOF
    etcd --data-dir "$dir/etcd" --listen-client-urls "http://127.0.0.1:$ETCD_CLIENT" \
        --advertise-client-urls "http://127.0.0.1:$ETCD_CLIENT" \
        --listen-peer-urls "http://127.0.0.1:$ETCD_PEER" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER" \
        --initial-cluster "default=http://127.0.0.1:$ETCD_PEER" >"$dir/etcd.log" 2>&1 &
    echo $! >"$dir/etcd.pid"
    "$BIN/kube-apiserver" --etcd-servers="http://127.0.0.1:$ETCD_CLIENT" --bind-address=127.0.0.1 \
        --advertise-address=127.0.0.1 --secure-port="$APISERVER" --cert-dir="$dir/certs" \
        --token-auth-file="$dir/tokens.csv" --authorization-mode=RBAC \
        --service-account-key-file="$dir/sa.pub" --service-account-signing-key-file="$dir/sa.key" \
        --service-account-issuer=https://kubernetes.default.svc --service-cluster-ip-range=10.96.0.0/24 \
        --allow-privileged=true --disable-admission-plugins=ServiceAccount \
        --endpoint-reconciler-type=none >"$dir/kube-apiserver.log" 2>&1 &
    echo $! >"$dir/kube-apiserver.pid"
    wait_ready "$dir"
    "$BIN/kube-controller-manager" --kubeconfig="$dir/kubeconfig" --controllers=endpoint,endpointslice,namespace \
        --leader-elect=false --bind-address=127.0.0.1 --secure-port="$KCM" --port=0 \
        >"$dir/kube-controller-manager.log" 2>&1 &
    echo $! >"$dir/kube-controller-manager.pid"
    log "ready: KUBECONFIG=$dir/kubeconfig"
}

stop() {
    local dir=${1:?usage: stop DIR} name pid
    for name in kube-controller-manager kube-apiserver etcd; do
        [[ -f $dir/$name.pid ]] || continue
        pid=$(cat "$dir/$name.pid")
        kill "$pid" 2>/dev/null && for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
        rm -f "$dir/$name.pid"
    done
}

case ${1:-} in
build) build ;;
start) start "${2:-}" ;;
stop) stop "${2:-}" ;;
*)
    echo "usage: $0 build | start DIR | stop DIR" >&2
    exit 2
    ;;
esac
