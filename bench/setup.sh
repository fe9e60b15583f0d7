#!/usr/bin/env bash
# Install the load generator (wrk) and the static pass-through baseline (nginx) from Debian, and
# valgrind for the instruction counts of bench.instructions.
# Optional: without them the benchmark falls back to its Python load client and skips nginx.
set -u
if command -v wrk >/dev/null 2>&1 && command -v nginx >/dev/null 2>&1 && command -v valgrind >/dev/null 2>&1; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "bench/setup.sh: apt-get unavailable; using the Python load client, no nginx baseline"
    exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO="sudo -n"
    else
        echo "bench/setup.sh: not root; using the Python load client, no nginx baseline"
        exit 0
    fi
fi
export DEBIAN_FRONTEND=noninteractive
if ! { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq --no-install-recommends wrk nginx-light valgrind; } >/dev/null 2>&1; then
    echo "bench/setup.sh: apt-get install wrk nginx-light valgrind failed; using the Python load client, no nginx baseline"
fi
exit 0
