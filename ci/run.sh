#!/usr/bin/env bash
# What CI runs on a clean clone (called by .ci/run). Every step prints how long it took.
# Needs only the Rust toolchain of the machine image; installs nothing else yet.
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

total=$SECONDS
step "rustfmt" cargo fmt --all -- --check
step "core dependency tree is IO-free" core_is_io_free
step "clippy" cargo clippy --workspace --all-targets --locked -- -D warnings
# The README's test command.
step "tests" cargo test --workspace --locked
echo "::: all steps passed in $((SECONDS - total)) s"
