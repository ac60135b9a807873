#!/usr/bin/env bash
# Install the servers the marked tests start on 127.0.0.1: Prometheus and the Pushgateway
# (Debian packages; apt does not start them). Idempotent: does nothing when both are on PATH.
#
#   scripts/install-services.sh
set -euo pipefail

need=()
command -v prometheus >/dev/null 2>&1 || need+=(prometheus)
command -v prometheus-pushgateway >/dev/null 2>&1 || need+=(prometheus-pushgateway)

if [ "${#need[@]}" -eq 0 ]; then
    echo "install-services: prometheus and prometheus-pushgateway already installed; nothing to do"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-services: missing ${need[*]} and apt-get is not available; install them by hand" >&2
    exit 1
fi

sudo=()
if [ "$(id -u)" -ne 0 ]; then
    if ! command -v sudo >/dev/null 2>&1; then
        echo "install-services: missing ${need[*]}; run as root or install sudo" >&2
        exit 1
    fi
    sudo=(sudo)
fi

echo "install-services: installing ${need[*]} with apt-get"
"${sudo[@]}" apt-get update -qq
# Both packages are asked for so a half-installed pair is completed; apt skips what is there.
DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends \
    prometheus prometheus-pushgateway >/dev/null
echo "install-services: installed $(prometheus --version 2>&1 | head -n1)"
echo "install-services: installed $(prometheus-pushgateway --version 2>&1 | head -n1)"
