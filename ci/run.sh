#!/usr/bin/env bash
# What CI runs on a clean clone (called by .ci/run). Every step prints how long it took.
# Needs the Rust toolchain of the machine image and a C++ compiler (libFuzzer); installs
# cargo-fuzz from crates.io when the machine lacks it (the fuzz step).
# `ci/run.sh fuzz` runs the fuzz step alone.
set -euo pipefail
cd "$(dirname "$0")/.."

# rust-toolchain.toml pins the image's toolchain; fall back to the default one if a machine
# lacks that exact name (no toolchain can be downloaded here).
if ! rustup run "$(sed -n 's/^channel = "\(.*\)"/\1/p' rust-toolchain.toml)" rustc --version >/dev/null 2>&1; then
    echo "ci: pinned toolchain missing; using the default toolchain"
    export RUSTUP_TOOLCHAIN=stable
fi

export CARGO_TERM_COLOR=never
export CI=true            # insta: never write snapshots, fail on a mismatch
export INSTA_UPDATE=no
# A clean clone builds everything once: incremental caches would only take disk (tens of GB on
# this workspace) on a machine whose disk other checkouts share.
export CARGO_INCREMENTAL=0

step() {
    local name=$1
    shift
    local start=$SECONDS
    echo "::: ${name}"
    "$@"
    echo "::: ${name}: ok in $((SECONDS - start)) s"
}

core_is_io_free() {
    local tree
    tree=$(cargo tree -p conduit-core -e normal --prefix none)
    if echo "$tree" | grep -E '^(tokio|hyper|h2|tonic|rustls|kube|mio)( |$)'; then
        echo "conduit-core's dependency tree holds an IO crate (above); the core must stay sans-IO"
        return 1
    fi
}

# cargo-fuzz from crates.io, pinned to a version that builds on the pinned toolchain.
CARGO_FUZZ_VERSION=0.13.2
# Seconds each fuzz target runs in CI (at most 60; README.md, "Fuzzing", runs them longer).
FUZZ_SECONDS=${CONDUIT_FUZZ_SECONDS:-30}

install_cargo_fuzz() {
    if cargo fuzz --version >/dev/null 2>&1; then
        cargo fuzz --version
        return
    fi
    cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked
}

# libFuzzer prints a line for every input it keeps (thousands a run) and a recommended
# dictionary: drop those, keep the starting and final figures and anything else in full (a
# crash report).
fuzz_quiet() {
    awk '/^###### Recommended dictionary/ { skip = 1 }
        !skip && !/^#[0-9]+[[:space:]]+(NEW|REDUCE|pulse) / && !/^[[:space:]]+NEW_FUNC/ { print; fflush() }
        /^###### End of recommended dictionary/ { skip = 0 }'
}

# Every fuzz target for FUZZ_SECONDS from its checked-in corpus (fuzz/corpus/<target>). New
# inputs go to a temporary directory, never into the checked-in corpus; a crash fails the step
# and leaves its input in fuzz/artifacts/<target>/ (git ignores it), printed below.
fuzz_targets() {
    # cargo-fuzz needs nightly compiler flags (-Zsanitizer=address and sanitizer coverage):
    # the pinned toolchain is stable, so allow them there.
    export RUSTC_BOOTSTRAP=1
    # Overflow checks and debug assertions on: the parsers take lengths and counts from peers.
    local build=(--fuzz-dir fuzz --debug-assertions)
    if ! cargo fetch --manifest-path fuzz/Cargo.toml --locked >/dev/null; then
        echo "fuzz/Cargo.lock is out of date (did a crate gain a dependency?): run"
        echo "  cargo fetch --manifest-path fuzz/Cargo.toml   and commit fuzz/Cargo.lock"
        return 1
    fi
    cargo fuzz build "${build[@]}"
    # Inputs the runs find go here (fuzz/target is git-ignored), emptied on every run.
    local scratch=fuzz/target/ci-corpus marker target targets failed=()
    rm -rf "$scratch"
    mkdir -p "$scratch"
    marker="$scratch/start"
    touch "$marker"
    mapfile -t targets < <(cargo fuzz list --fuzz-dir fuzz)
    for target in "${targets[@]}"; do
        echo "--- fuzz ${target} for ${FUZZ_SECONDS} s"
        mkdir -p "$scratch/$target"
        # The first corpus directory receives new inputs; the checked-in one is only read.
        if ! cargo fuzz run "${build[@]}" "$target" "$scratch/$target" "fuzz/corpus/$target" -- \
            -max_total_time="$FUZZ_SECONDS" -timeout=10 -print_final_stats=1 2>&1 | fuzz_quiet; then
            failed+=("$target")
        fi
    done
    if ((${#failed[@]})); then
        echo "fuzz targets failed: ${failed[*]}"
        echo "reproducers (RUSTC_BOOTSTRAP=1 cargo fuzz run -a <target> <file> replays one):"
        find fuzz/artifacts -type f -newer "$marker" -print 2>/dev/null | sed 's/^/  /' || true
        return 1
    fi
}

# In a subshell: RUSTC_BOOTSTRAP stays out of the other steps, and the fuzz builds go to
# fuzz/target whatever CARGO_TARGET_DIR the workspace builds use.
fuzz() (
    unset CARGO_TARGET_DIR
    install_cargo_fuzz
    fuzz_targets
)

# The simulation's seeded crypto (sim/src/crypto.rs, not cryptographically secure) and the
# proxy's fault points (proxy/src/fault_points.rs, compiled in only by the simulation's
# `fault-points` feature) must never reach a production binary: the release proxy and
# controller must carry neither marker. The CLI, which runs simulations, must carry both (so
# the check can fail); `cargo test` built it.
no_simulation_code_in_release() {
    local target=${CARGO_TARGET_DIR:-target} bin marker markers=()
    markers+=("$(sed -n 's/^pub const MARKER: &str = "\(.*\)";$/\1/p' sim/src/crypto.rs)")
    markers+=("$(sed -n 's/^ *pub const MARKER: &str = "\(.*\)";$/\1/p' proxy/src/fault_points.rs)")
    for marker in "${markers[@]}"; do
        if [[ -z $marker ]]; then
            echo "a MARKER constant is missing from sim/src/crypto.rs or proxy/src/fault_points.rs"
            return 1
        fi
        if ! grep -qaF "$marker" "$target/debug/conduit"; then
            echo "the marker \"$marker\" is missing from $target/debug/conduit: the check below would prove nothing"
            return 1
        fi
    done
    cargo build --release --locked -p conduit-proxy -p conduit-controller
    for bin in conduit-proxy conduit-controller; do
        for marker in "${markers[@]}"; do
            if grep -qaF "$marker" "$target/release/$bin"; then
                echo "$target/release/$bin contains simulation-only code (\"$marker\")"
                return 1
            fi
        done
        echo "$bin: no simulation-only code (seeded crypto, fault points)"
    done
}

# `conduit chaos --real --netns` (a test in cli/tests/chaos.rs) needs root, iproute2 and
# iptables; install iptables where we are root and apt can (the test says why it skipped
# otherwise).
netns_tools() {
    if [[ $(id -u) != 0 ]]; then
        echo "not root: the --netns chaos test will skip"
    elif ! command -v ip >/dev/null; then
        echo "no iproute2: the --netns chaos test will skip"
    elif command -v iptables >/dev/null; then
        iptables -V
    elif command -v apt-get >/dev/null; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q iptables >/dev/null || echo "could not install iptables: the --netns chaos test will skip"
        command -v iptables >/dev/null && iptables -V
    else
        echo "no iptables and no apt-get: the --netns chaos test will skip"
    fi
    return 0
}

# A real Kubernetes API server on loopback for the Kubernetes integration tests
# (ci/kube-apiserver.sh: built once per machine into ~/.cache/conduit, then reused), stopped
# when this script exits however it exits.
KUBE_DIR=$(mktemp -d /tmp/conduit-ci-kube.XXXXXX)
kube_apiserver() {
    ci/kube-apiserver.sh build
    ci/kube-apiserver.sh start "$KUBE_DIR"
    export CONDUIT_TEST_KUBECONFIG="$KUBE_DIR/kubeconfig"
    # Helm, for the chart's lint and `helm template` comparison (cli/tests/install.rs).
    local helm_bin
    helm_bin=$(ci/helm.sh)
    export CONDUIT_TEST_HELM="$helm_bin/helm"
}
kube_stop() {
    ci/kube-apiserver.sh stop "$KUBE_DIR" 2>/dev/null || true
    rm -rf "$KUBE_DIR"
}
trap kube_stop EXIT

# Free disk space where the builds go, printed so a run that dies of a full disk says so early.
# Never fails: the target directory may not exist yet.
disk_free() {
    local dir=${CARGO_TARGET_DIR:-.}
    [[ -d $dir ]] || dir=.
    df -h "$dir" | tail -n 1 || true
}

total=$SECONDS
disk_free
if [[ ${1:-} == fuzz ]]; then
    step "fuzz (install cargo-fuzz, build, ${FUZZ_SECONDS} s per target)" fuzz
    echo "::: all steps passed in $((SECONDS - total)) s"
    exit
fi
step "rustfmt" cargo fmt --all -- --check
step "rustfmt (fuzz targets)" cargo fmt --manifest-path fuzz/Cargo.toml -- --check
step "core dependency tree is IO-free" core_is_io_free
step "clippy" cargo clippy --workspace --all-targets --locked -- -D warnings
# The proxy's `fuzzing` module, which only the fuzz targets enable.
step "clippy (proxy, fuzzing feature)" cargo clippy -p conduit-proxy --features fuzzing --lib --locked -- -D warnings
step "tools for the namespace chaos test (iptables)" netns_tools
step "Kubernetes API server and Helm for the integration tests (fetched and built once per machine)" kube_apiserver
# The README's test command.
step "tests" cargo test --workspace --locked
step "release binaries carry no simulation-only code" no_simulation_code_in_release
disk_free
step "fuzz (install cargo-fuzz, build, ${FUZZ_SECONDS} s per target)" fuzz
disk_free
echo "::: all steps passed in $((SECONDS - total)) s"
