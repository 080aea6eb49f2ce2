#!/usr/bin/env bash
# The test command: builds with warnings treated as errors, then runs the whole test suite.
# Usage: scripts/test.sh [extra swift test arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

log=$(mktemp)
trap 'rm -f "$log"' EXIT
swift build --build-tests 2>&1 | tee "$log"
# Our own code must build without warnings (dependencies' warnings are theirs).
if grep -E "^$root/(Sources|Tests|Benchmarks)/.*: warning:" "$log"; then
    echo "error: the build has warnings (above); fix them" >&2
    exit 1
fi
swift test --skip-build "$@"
