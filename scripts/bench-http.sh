#!/usr/bin/env bash
# Loads the example app and a hand-written PostgresNIO baseline (Benchmarks/Sources/BaselineServer)
# side by side with wrk, on the same three workloads, against a local primary + replica:
#   insert          POST /items                   one INSERT … RETURNING on the primary
#   read            GET  /items/1                 one SELECT on the replica
#   write-then-read POST /items/write_then_read   INSERT on the primary, then SELECT on the replica
# The example runs twice: with READ_YOUR_WRITES=off it sends the same SQL as the baseline (the
# like-for-like ratio); as shipped, read-your-own-writes adds two round trips per committed write
# and makes write-then-read wait for the replica (reported as its own rows). A fourth server,
# example-noreset, is the like-for-like example with RESET_SESSION_STATE=off: the difference
# from `example` is what resetting released connections costs. A fifth, example-nometrics, has
# METRICS=off (no backend: swift-metrics' no-op handlers), while `example` records every metric
# into a Prometheus registry: the difference is what metrics cost. A sixth, example-libpq, is the
# like-for-like example on libpq's engine (DATABASE_ENGINE=libpq).
# Prints requests/s, p50 and p99 for each, and the example/baseline ratios.
#
# Each workload runs BENCH_ROUNDS times per server, the order rotated each round, after a VACUUM
# and a CHECKPOINT; the ratios are of the medians.
#
# Usage: scripts/bench-http.sh        Settings: BENCH_DURATION (10s), BENCH_ROUNDS (3),
#                                     BENCH_CONNECTIONS (32), BENCH_THREADS (2), and the
#                                     scripts/pg-cluster.sh settings.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
duration=${BENCH_DURATION:-10s}
rounds=${BENCH_ROUNDS:-3}
connections=${BENCH_CONNECTIONS:-32}
threads=${BENCH_THREADS:-2}
example_port=8180
baseline_port=8181
ryow_port=8182
noreset_port=8183
nometrics_port=8184
libpq_port=8185

export PG_PRIMARY_PORT=${PG_PRIMARY_PORT:-28532}
export PG_REPLICA_PORT=${PG_REPLICA_PORT:-28533}
export PG_REPLICAS=1

. scripts/bench-common.sh

echo "== building both servers in release mode (in the Benchmarks package, sharing one build)"
(cd Benchmarks && swift build -c release --product ContextDBExample 2>&1 | tail -n 1)
(cd Benchmarks && swift build -c release --product BaselineServer 2>&1 | tail -n 1)
bin=$(cd Benchmarks && swift build -c release --show-bin-path)
example_bin=$bin/ContextDBExample
baseline_bin=$bin/BaselineServer

READ_YOUR_WRITES=off LOG_LEVEL=warning "$example_bin" --port "$example_port" > "$work/example.log" 2>&1 &
pids+=($!)
until curl -sf "http://127.0.0.1:$example_port/health" >/dev/null; do sleep 0.2; done  # also creates the tables
LOG_LEVEL=warning "$example_bin" --port "$ryow_port" > "$work/example-ryow.log" 2>&1 &
pids+=($!)
until curl -sf "http://127.0.0.1:$ryow_port/health" >/dev/null; do sleep 0.2; done
RESET_SESSION_STATE=off READ_YOUR_WRITES=off LOG_LEVEL=warning "$example_bin" --port "$noreset_port" > "$work/example-noreset.log" 2>&1 &
pids+=($!)
until curl -sf "http://127.0.0.1:$noreset_port/health" >/dev/null; do sleep 0.2; done
METRICS=off READ_YOUR_WRITES=off LOG_LEVEL=warning "$example_bin" --port "$nometrics_port" > "$work/example-nometrics.log" 2>&1 &
pids+=($!)
until curl -sf "http://127.0.0.1:$nometrics_port/health" >/dev/null; do sleep 0.2; done
DATABASE_ENGINE=libpq READ_YOUR_WRITES=off LOG_LEVEL=warning "$example_bin" --port "$libpq_port" > "$work/example-libpq.log" 2>&1 &
pids+=($!)
until curl -sf "http://127.0.0.1:$libpq_port/health" >/dev/null; do sleep 0.2; done
"$baseline_bin" "$baseline_port" > "$work/baseline.log" 2>&1 &
pids+=($!)
until [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$baseline_port/items/0")" = 404 ]; do sleep 0.2; done

# A row for the read workload, replayed on the replica.
curl -sf -X POST -H 'content-type: application/json' --data '{"text":"bench"}' "http://127.0.0.1:$example_port/items" >/dev/null
sleep 1

cat > "$work/insert.lua" <<'LUA'
wrk.method = "POST"
wrk.body = '{"text":"bench"}'
wrk.headers["Content-Type"] = "application/json"
LUA
cp "$work/insert.lua" "$work/write-then-read.lua"

run() { # name port path script → "rps p50 p99"
    local args=(-t "$threads" -c "$connections" -d "$duration" --latency)
    [ -n "$4" ] && args+=(-s "$4")
    local out
    out=$(wrk "${args[@]}" "http://127.0.0.1:$2$3")
    local rps p50 p99
    rps=$(awk '/Requests\/sec/ { print $2 }' <<<"$out")
    p50=$(awk '$1 == "50%" { print $2 }' <<<"$out")
    p99=$(awk '$1 == "99%" { print $2 }' <<<"$out")
    local errors
    errors=$(awk '/Non-2xx or 3xx responses/ { print $5 }' <<<"$out")
    echo "$rps $p50 $p99 ${errors:-0}"
}


servers=(example baseline example+ryow example-noreset example-nometrics example-libpq)
printf '\n%-6s %-16s %-13s %12s %10s %10s %8s\n' round workload server requests/s p50 p99 non-2xx
declare -A result
for workload in insert read write-then-read; do
    case $workload in
        insert) path=/items; script=$work/insert.lua ;;
        read) path=/items/1; script="" ;;
        write-then-read) path=/items/write_then_read; script=$work/write-then-read.lua ;;
    esac
    for ((round = 1; round <= rounds; round++)); do
        # Rotate the order each round, so no server always runs right after another's load.
        for ((i = 0; i < ${#servers[@]}; i++)); do
            server=${servers[$(((i + round - 1) % ${#servers[@]}))]}
            case $server in
                example) port=$example_port ;;
                baseline) port=$baseline_port ;;
                example+ryow) port=$ryow_port ;;
                example-noreset) port=$noreset_port ;;
                example-nometrics) port=$nometrics_port ;;
                example-libpq) port=$libpq_port ;;
            esac
            settle
            read -r rps p50 p99 errors < <(run "$workload" "$port" "$path" "$script")
            result[$workload.$server]="${result[$workload.$server]:-} $rps"
            printf '%-6s %-16s %-13s %12s %10s %10s %8s\n' "$round" "$workload" "$server" "$rps" "$p50" "$p99" "$errors"
        done
    done
done
echo
echo "median requests/s over $rounds rounds:"
for workload in insert read write-then-read; do
    e=$(median <<<"${result[$workload.example]}")
    b=$(median <<<"${result[$workload.baseline]}")
    r=$(median <<<"${result[$workload.example+ryow]}")
    n=$(median <<<"${result[$workload.example-noreset]}")
    m=$(median <<<"${result[$workload.example-nometrics]}")
    l=$(median <<<"${result[$workload.example-libpq]}")
    awk -v w="$workload" -v e="$e" -v b="$b" -v r="$r" -v n="$n" -v m="$m" -v l="$l" \
        'BEGIN { printf "%-16s example %8.1f  baseline %8.1f  example/baseline = %.3f   (with read-your-own-writes: %8.1f, %.3f; without the session reset: %8.1f, reset cost %.1f%%; without metrics: %8.1f, metrics cost %.1f%%; on libpq: %8.1f, %.3f)\n", w, e, b, e / b, r, r / b, n, (1 - e / n) * 100, m, (1 - e / m) * 100, l, l / b }'
done
echo "(machine: $(nproc) cores, $(free -g | awk '/Mem:/ { print $2 }') GiB; wrk -t$threads -c$connections -d$duration)"
