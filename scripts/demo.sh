#!/usr/bin/env bash
# Runs the example app against a throwaway local primary + replica and walks through every
# route with curl, printing what happened: the status, the rows left in the table, the
# X-WAL-LSN cookie, and which host served each read. Stops everything at the end.
#
# Usage: scripts/demo.sh [--vapor] [--serve]
#   --vapor   the Vapor example (ContextDBVaporExample) instead of the Hummingbird one: the
#             same routes, statuses, bodies and cookies
#   --serve   leave the cluster and the app running (stop them with: kill <pid>;
#             scripts/pg-cluster.sh stop)
# Settings: DEMO_PORT (default 8080) and the scripts/pg-cluster.sh settings.
set -euo pipefail
cd "$(dirname "$0")/.."

serve=false
product=ContextDBExample
for argument in "$@"; do
    case $argument in
        --serve) serve=true ;;
        --vapor) product=ContextDBVaporExample ;;
        *) echo "usage: scripts/demo.sh [--vapor] [--serve]" >&2; exit 2 ;;
    esac
done
port=${DEMO_PORT:-8080}

command -v curl >/dev/null || { apt-get update -q && apt-get install -y -q curl; }

app_pid=""
cleanup() {
    if [ "$serve" = false ]; then
        [ -n "$app_pid" ] && kill "$app_pid" 2>/dev/null && wait "$app_pid" 2>/dev/null || true
        scripts/pg-cluster.sh stop || true
    fi
}
trap cleanup EXIT

export PG_REPLICAS=${PG_REPLICAS:-2}
scripts/pg-cluster.sh start
eval "$(scripts/pg-cluster.sh env)"

echo "== building $product (a first build takes several minutes; progress below)"
build_log=$(mktemp)
# One line per finished build step, overwritten in place; the whole log when the build fails.
if ! swift build --product "$product" 2>&1 | tee "$build_log" \
        | while IFS= read -r line; do printf '\r\033[K%.100s' "$line"; done; then
    echo
    echo "== the build failed; its whole output:" >&2
    cat "$build_log" >&2
    exit 1
fi
echo
rm -f "$build_log"
bin=$(swift build --product "$product" --show-bin-path)/$product

echo "== starting it on 127.0.0.1:$port (DATABASE_URL=${DATABASE_URL/:$POSTGRES_PASSWORD@/:***@})"
"$bin" --hostname 127.0.0.1 --port "$port" > /tmp/contextdb-demo-app.log 2>&1 &
app_pid=$!
for _ in $(seq 1 100); do
    curl -sf "http://127.0.0.1:$port/health" >/dev/null 2>&1 && break
    kill -0 "$app_pid" 2>/dev/null || { cat /tmp/contextdb-demo-app.log; exit 1; }
    sleep 0.2
done

sql() { PGPASSWORD=$POSTGRES_PASSWORD psql -h 127.0.0.1 -p "$POSTGRES_PORT" -U "$POSTGRES_USER" -d "$POSTGRES_DB" -Atqc "$1"; }
post() { # path [json]
    curl -s -o /tmp/contextdb-demo-body -D /tmp/contextdb-demo-head -w '%{http_code}' -X POST \
        -H 'content-type: application/json' --data "${2:-}" "http://127.0.0.1:$port$1"
}
cookie() { grep -i '^set-cookie:' /tmp/contextdb-demo-head | sed 's/^[^:]*: //; s/;.*//' | tr -d '\r' || true; }

echo
echo "== the nine routes of the Python original (table 'example' emptied before each)"
printf '%-34s %-7s %-5s %s\n' route status rows cookie
for route in simple_usage atomic_base_example atomic_and_previous_transaction early_commit \
    concurrent_queries early_rollback auto_rollback_by_exception auto_rollback_by_status_code \
    early_connection_close; do
    sql "TRUNCATE example" >/dev/null
    status=$(post "/$route")
    printf '%-34s %-7s %-5s %s\n' "/$route" "$status" "$(sql 'SELECT count(*) FROM example')" "$(cookie)"
done
cat <<'TEXT'
Three routes answer 500 on purpose, as in the Python original: /auto_rollback_by_exception
throws and /auto_rollback_by_status_code returns 500, so the middleware rolls their work back
(0 rows); /atomic_and_previous_transaction ends with an atomic block in .fail mode, which throws
because a transaction is open — yet 5 rows stay: the rows its .commit, .rollback and .append
blocks committed before that; only what was still open is rolled back.
TEXT

echo
echo "== items: write on the primary, read through a replica"
status=$(post /items '{"text":"hello from the demo"}')
id=$(sed 's/.*"id":\([0-9]*\).*/\1/' /tmp/contextdb-demo-body)
token=$(cookie | sed 's/^X-WAL-LSN=//')
echo "POST /items                      -> $status $(cat /tmp/contextdb-demo-body)  $(cookie)"
# Sending the token back routes the read to a replica that has the row (or to the primary).
status=$(curl -s -o /tmp/contextdb-demo-body -w '%{http_code}' -H "X-WAL-LSN: $token" "http://127.0.0.1:$port/items/$id")
echo "GET /items/$id (X-WAL-LSN: $token) -> $status $(cat /tmp/contextdb-demo-body)"
status=$(post /items/write_then_read '{"text":"read it back"}')
echo "POST /items/write_then_read      -> $status $(cat /tmp/contextdb-demo-body)"
status=$(post /items '{"text":')
echo "POST /items (malformed JSON)     -> $status $(cat /tmp/contextdb-demo-body)"
status=$(curl -s -o /tmp/contextdb-demo-body -w '%{http_code}' "http://127.0.0.1:$port/items/abc")
echo "GET /items/abc                   -> $status $(cat /tmp/contextdb-demo-body)"
status=$(curl -s -o /tmp/contextdb-demo-body -w '%{http_code}' "http://127.0.0.1:$port/health")
echo "GET /health                      -> $status $(cat /tmp/contextdb-demo-body)"
status=$(curl -s -o /tmp/contextdb-demo-body -w '%{http_code}' "http://127.0.0.1:$port/topology")
echo "GET /topology                    -> $status $(cat /tmp/contextdb-demo-body)"
rm -f /tmp/contextdb-demo-body /tmp/contextdb-demo-head

if [ "$serve" = true ]; then
    echo
    echo "== serving on http://127.0.0.1:$port (app pid $app_pid; stop: kill $app_pid; scripts/pg-cluster.sh stop)"
fi
