#!/usr/bin/env bash
# What recording metrics costs the example: one server records every metric into a Prometheus
# registry (as shipped), the other runs with METRICS=off (swift-metrics' no-op handlers). Both
# run READ_YOUR_WRITES=off against a local primary + replica, loaded with wrk in turns, on the
# workloads of scripts/bench-http.sh (insert, read, write-then-read).
#
# Two figures per run: requests/s, and the server's CPU time per request (user + system, from
# /proc/PID/stat, divided by the requests wrk completed). Throughput on a small shared machine
# moves by more than the cost measured here; CPU time per request is the steadier figure of what
# the metrics add.
#
# Usage: scripts/bench-metrics.sh     Settings: BENCH_DURATION (10s), BENCH_ROUNDS (5),
#                                     BENCH_CONNECTIONS (32), BENCH_THREADS (2), and the
#                                     scripts/pg-cluster.sh settings.
set -euo pipefail
cd "$(dirname "$0")/.."
duration=${BENCH_DURATION:-10s}
rounds=${BENCH_ROUNDS:-5}
connections=${BENCH_CONNECTIONS:-32}
threads=${BENCH_THREADS:-2}
on_port=8190
off_port=8191

export PG_PRIMARY_PORT=${PG_PRIMARY_PORT:-28542}
export PG_REPLICA_PORT=${PG_REPLICA_PORT:-28543}
export PG_REPLICAS=1

. scripts/bench-common.sh

echo "== building the example in release mode (in the Benchmarks package)"
(cd Benchmarks && swift build -c release --product ContextDBExample 2>&1 | tail -n 1)
bin=$(cd Benchmarks && swift build -c release --show-bin-path)/ContextDBExample

declare -A server_pid
READ_YOUR_WRITES=off LOG_LEVEL=warning "$bin" --port "$on_port" > "$work/on.log" 2>&1 &
pids+=($!)
server_pid[on]=$!
until curl -sf "http://127.0.0.1:$on_port/health" >/dev/null; do sleep 0.2; done  # also creates the tables
METRICS=off READ_YOUR_WRITES=off LOG_LEVEL=warning "$bin" --port "$off_port" > "$work/off.log" 2>&1 &
pids+=($!)
server_pid[off]=$!
until curl -sf "http://127.0.0.1:$off_port/health" >/dev/null; do sleep 0.2; done
curl -sf -X POST -H 'content-type: application/json' --data '{"text":"bench"}' "http://127.0.0.1:$on_port/items" >/dev/null
sleep 1

cat > "$work/post.lua" <<'LUA'
wrk.method = "POST"
wrk.body = '{"text":"bench"}'
wrk.headers["Content-Type"] = "application/json"
LUA

ticks=$(getconf CLK_TCK)
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }  # utime + stime of a process, in clock ticks

run() { # server port path script → "rps cpu_us_per_request"
    local args=(-t "$threads" -c "$connections" -d "$duration")
    [ -n "$4" ] && args+=(-s "$4")
    local before after out
    before=$(cpu_ticks "${server_pid[$1]}")
    out=$(wrk "${args[@]}" "http://127.0.0.1:$2$3")
    after=$(cpu_ticks "${server_pid[$1]}")
    awk -v b="$before" -v a="$after" -v t="$ticks" '
        / requests in / { requests = $1 }
        /Requests\/sec/ { rps = $2 }
        END { printf "%s %.1f\n", rps, (a - b) / t * 1e6 / requests }' <<<"$out"
}

printf '\n%-6s %-16s %-8s %12s %16s\n' round workload metrics requests/s "CPU µs/request"
declare -A rps cpu
for workload in insert read write-then-read; do
    case $workload in
        insert) path=/items; script=$work/post.lua ;;
        read) path=/items/1; script="" ;;
        write-then-read) path=/items/write_then_read; script=$work/post.lua ;;
    esac
    for ((round = 1; round <= rounds; round++)); do
        order=(on off)
        ((round % 2 == 0)) && order=(off on)
        for server in "${order[@]}"; do
            port=$on_port
            [ "$server" = off ] && port=$off_port
            settle
            read -r r c < <(run "$server" "$port" "$path" "$script")
            rps[$workload.$server]="${rps[$workload.$server]:-} $r"
            cpu[$workload.$server]="${cpu[$workload.$server]:-} $c"
            printf '%-6s %-16s %-8s %12s %16s\n' "$round" "$workload" "$server" "$r" "$c"
        done
    done
done
echo
echo "medians over $rounds rounds (cost: what recording into Prometheus adds over METRICS=off):"
for workload in insert read write-then-read; do
    awk -v w="$workload" \
        -v ron="$(median <<<"${rps[$workload.on]}")" -v roff="$(median <<<"${rps[$workload.off]}")" \
        -v con="$(median <<<"${cpu[$workload.on]}")" -v coff="$(median <<<"${cpu[$workload.off]}")" \
        'BEGIN { printf "%-16s requests/s %8.1f vs %8.1f (%+.1f%%)   CPU µs/request %7.1f vs %7.1f (%+.1f%%)\n", w, ron, roff, (ron / roff - 1) * 100, con, coff, (con / coff - 1) * 100 }'
done
echo "(machine: $(nproc) cores, $(free -g | awk '/Mem:/ { print $2 }') GiB; wrk -t$threads -c$connections -d$duration)"
