#!/usr/bin/env bash
# The test command: starts a throwaway PostgreSQL primary + replica (scripts/pg-cluster.sh),
# builds with warnings treated as errors, runs the whole test suite, and stops the cluster on
# every exit path.
# Usage: scripts/test.sh [extra swift test arguments, e.g. --filter ContextDBTests]
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

# Own ports, so a developer's cluster on the default ports is left alone; below 32768, where
# Linux never hands out a port to an outgoing connection.
export PG_PRIMARY_PORT=${PG_PRIMARY_PORT:-26432}
export PG_REPLICA_PORT=${PG_REPLICA_PORT:-26433}
export PG_REPLICAS=${PG_REPLICAS:-2}
# A data folder of this run's own, always: one inherited from `pg-cluster.sh env` may hold a
# developer's running cluster, which this script's cleanup must never stop.
PG_CLUSTER_DIR=$(mktemp -d "${TMPDIR:-/tmp}/contextdb-test-XXXXXX")
export PG_CLUSTER_DIR

log=$(mktemp)
cleanup() {
    rm -f "$log"
    scripts/pg-cluster.sh stop || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# libpq's headers and pkg-config file, for ContextDBLibPQ (the CLibPQ system library).
if ! { command -v pkg-config >/dev/null && pkg-config --exists libpq; }; then
    [ "$(id -u)" = 0 ] || { echo "error: libpq-dev and pkg-config are missing; install them (apt-get install libpq-dev pkg-config)" >&2; exit 1; }
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends libpq-dev pkg-config
fi

scripts/pg-cluster.sh start
eval "$(scripts/pg-cluster.sh env)"

swift build --build-tests 2>&1 | tee "$log"
# Our own code must build without warnings (dependencies' warnings are theirs).
if grep -E "^$root/(Sources|Tests|Benchmarks)/.*: warning:" "$log"; then
    echo "error: the build has warnings (above); fix them" >&2
    exit 1
fi
swift test --skip-build "$@"
