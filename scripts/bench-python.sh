#!/usr/bin/env bash
# ContextDB against the Python original, and pgbench as the limit, on one primary + one replica.
#
#   python    context-async-sqlalchemy (PyPI) on FastAPI + uvicorn (uvloop, 1 worker), SQLAlchemy's
#             asyncio engine on asyncpg, pool 20 per connect: Benchmarks/python/app.py
#   contextdb its Swift twin on ContextDB + Hummingbird, pool 20 per connect:
#             Benchmarks/Sources/TwinServer (release build)
#   pgbench   -M prepared, the same SQL, as the limit of what the database serves
#
# Endpoints (same SQL on both):
#   POST /write       BEGIN; INSERT INTO example (text) VALUES ($1); COMMIT        primary
#   GET  /read        BEGIN READ ONLY; SELECT text FROM reads WHERE id = $1; COMMIT  replica
#   GET  /read_write  both, in one request
#   GET  /noop        the middleware only
# Each endpoint: wrk -t$BENCH_THREADS -c$BENCH_CONNECTIONS for BENCH_DURATION after a 2 s warm-up,
# BENCH_ROUNDS rounds with the order of the two servers alternating; medians. Prints requests/s,
# p50, p99 and the ratios.
#
# Usage: scripts/bench-python.sh    Settings: BENCH_DURATION (10s), BENCH_ROUNDS (2),
#                                   BENCH_CONNECTIONS (64), BENCH_THREADS (2), and the
#                                   scripts/pg-cluster.sh settings. Needs PyPI and Debian packages.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
duration=${BENCH_DURATION:-10s}
rounds=${BENCH_ROUNDS:-2}
connections=${BENCH_CONNECTIONS:-64}
threads=${BENCH_THREADS:-2}
python_port=8290
swift_port=8291
rows=1000

export PG_PRIMARY_PORT=${PG_PRIMARY_PORT:-28432}
export PG_REPLICA_PORT=${PG_REPLICA_PORT:-28433}
export PG_REPLICAS=1

. scripts/bench-common.sh
need pgbench postgresql-contrib
need python3 python3
python3 -c 'import venv, ensurepip' 2>/dev/null \
    || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv; }

export PGPASSWORD=$POSTGRES_PASSWORD
primary=127.0.0.1:$POSTGRES_PORT
replica=127.0.0.1:$POSTGRES_REPLICA_PORT
psql_primary() { psql -h 127.0.0.1 -p "$POSTGRES_PORT" -U "$POSTGRES_USER" -d "$POSTGRES_DB" -Atqc "$1"; }
psql_primary "CREATE TABLE IF NOT EXISTS example (id bigserial PRIMARY KEY, text text)"
psql_primary "CREATE TABLE IF NOT EXISTS reads (id int PRIMARY KEY, text text NOT NULL)"
psql_primary "INSERT INTO reads SELECT i, 'row ' || i FROM generate_series(1, $rows) i ON CONFLICT DO NOTHING"

echo "== installing the Python original in .build-python (a virtualenv)"
venv=$root/.build-python
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install -q --disable-pip-version-check \
    "context-async-sqlalchemy==2.1.9" fastapi "uvicorn[standard]" "sqlalchemy[asyncio]" asyncpg
versions=$("$venv/bin/pip" list --format=freeze 2>/dev/null \
    | grep -iE '^(context-async-sqlalchemy|fastapi|uvicorn|uvloop|sqlalchemy|asyncpg)==' | tr '\n' ' ')

echo "== building the Swift twin in release mode"
(cd Benchmarks && swift build -c release --product TwinServer 2>&1 | tail -n 1)
twin=$(cd Benchmarks && swift build -c release --show-bin-path)/TwinServer

BENCH_PRIMARY=$primary BENCH_REPLICA=$replica "$venv/bin/uvicorn" app:app --app-dir Benchmarks/python \
    --host 127.0.0.1 --port "$python_port" --workers 1 --loop uvloop --http httptools \
    --log-level warning --no-access-log > "$work/python.log" 2>&1 &
pids+=($!)
url() { echo "postgresql://$POSTGRES_USER:$POSTGRES_PASSWORD@$1/$POSTGRES_DB?sslmode=disable"; }
BENCH_PRIMARY_URL=$(url "$primary") BENCH_REPLICA_URL=$(url "$replica") "$twin" "$swift_port" > "$work/swift.log" 2>&1 &
pids+=($!)
for port in $python_port $swift_port; do
    for _ in $(seq 1 150); do curl -sf "http://127.0.0.1:$port/noop" >/dev/null && break; sleep 0.2; done
    curl -sf "http://127.0.0.1:$port/noop" >/dev/null || { echo "server on $port did not start" >&2; cat "$work"/*.log >&2; exit 1; }
done
# Both answer the same.
for port in $python_port $swift_port; do
    [ "$(curl -sf "http://127.0.0.1:$port/read?id=7")" = '{"text":"row 7"}' ] \
        || { echo "server on $port answered /read wrongly" >&2; exit 1; }
done

cat > "$work/write.lua" <<'LUA'
wrk.method = "POST"
LUA
cat > "$work/read.lua" <<LUA
request = function() return wrk.format("GET", "/read?id=" .. math.random(1, $rows)) end
LUA
cat > "$work/read_write.lua" <<LUA
request = function() return wrk.format("GET", "/read_write?id=" .. math.random(1, $rows)) end
LUA

run() { # port path script -> "rps p50 p99 non-2xx"
    local args=(-t "$threads" -c "$connections" --latency)
    [ -n "$3" ] && args+=(-s "$3")
    wrk "${args[@]}" -d 2s "http://127.0.0.1:$1$2" >/dev/null  # warm-up
    local out
    out=$(wrk "${args[@]}" -d "$duration" "http://127.0.0.1:$1$2")
    awk '/Requests\/sec/ { rps = $2 } $1 == "50%" { p50 = $2 } $1 == "99%" { p99 = $2 }
         /Non-2xx or 3xx responses/ { errors = $5 } END { print rps, p50, p99, errors + 0 }' <<<"$out"
}


declare -A rps p50 p99
printf '\n%-6s %-11s %-10s %12s %10s %10s %8s\n' round endpoint server requests/s p50 p99 non-2xx
for endpoint in write read read_write noop; do
    case $endpoint in
        write) path=/write; script=$work/write.lua ;;
        read) path=/read; script=$work/read.lua ;;
        read_write) path=/read_write; script=$work/read_write.lua ;;
        noop) path=/noop; script="" ;;
    esac
    for ((round = 1; round <= rounds; round++)); do
        order=(python contextdb)
        ((round % 2 == 0)) && order=(contextdb python)
        for server in "${order[@]}"; do
            port=$python_port
            [ "$server" = contextdb ] && port=$swift_port
            psql_primary "VACUUM ANALYZE example" >/dev/null; sleep 1
            read -r r a b e < <(run "$port" "$path" "$script")
            rps[$endpoint.$server]="${rps[$endpoint.$server]:-} $r"
            p50[$endpoint.$server]=$a
            p99[$endpoint.$server]=$b
            printf '%-6s %-11s %-10s %12s %10s %10s %8s\n' "$round" "$endpoint" "$server" "$r" "$a" "$b" "$e"
        done
    done
done

echo "== pgbench -M prepared -c $connections -j $threads, the same SQL"
cat > "$work/write.sql" <<'SQL'
BEGIN;
INSERT INTO example (text) VALUES ('bench');
COMMIT;
SQL
cat > "$work/read.sql" <<SQL
\set id random(1, $rows)
BEGIN READ ONLY;
SELECT text FROM reads WHERE id = :id;
COMMIT;
SQL
pgbench_tps() { # port script
    pgbench -h 127.0.0.1 -p "$1" -U "$POSTGRES_USER" -n -M prepared -c "$connections" -j "$threads" \
        -T "${duration%s}" -f "$2" "$POSTGRES_DB" 2>/dev/null | awk '/^tps/ { print $3 }'
}
write_tps=$(pgbench_tps "$POSTGRES_PORT" "$work/write.sql")
read_tps=$(pgbench_tps "$POSTGRES_REPLICA_PORT" "$work/read.sql")

echo
echo "medians over $rounds rounds (requests/s; p50 / p99 of the last round):"
printf '| %-11s | %12s | %15s | %9s | %16s | %18s | %9s |\n' endpoint "python req/s" "contextdb req/s" "cdb/python" "pgbench tps" "cdb/pgbench" "p50 py / cdb"
for endpoint in write read read_write noop; do
    py=$(median <<<"${rps[$endpoint.python]}")
    cdb=$(median <<<"${rps[$endpoint.contextdb]}")
    limit=-
    [ "$endpoint" = write ] && limit=$write_tps
    [ "$endpoint" = read ] && limit=$read_tps
    awk -v e="$endpoint" -v py="$py" -v cdb="$cdb" -v limit="$limit" -v a="${p50[$endpoint.python]}" -v b="${p50[$endpoint.contextdb]}" \
        'BEGIN { ratio = (limit == "-") ? "-" : sprintf("%.2f", cdb / limit)
                 printf "| %-11s | %12.0f | %15.0f | %9.1f | %16s | %18s | %9s |\n", e, py, cdb, cdb / py, limit, ratio, a " / " b }'
done
echo "(versions: $versions; PostgreSQL $(psql_primary 'SHOW server_version'); machine: $(nproc) cores, $(free -g | awk '/Mem:/ { print $2 }') GiB; wrk -t$threads -c$connections -d$duration)"
