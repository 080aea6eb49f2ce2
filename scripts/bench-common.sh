# Shared by scripts/bench-http.sh and scripts/bench-python.sh (sourced, not run): installs the
# load tools a fresh machine lacks, starts the scripts/pg-cluster.sh cluster with the caller's
# PG_* settings, and stops it and every server in `pids` on exit.

# need COMMAND PACKAGE: installs the Debian package when the command is missing.
need() { command -v "$1" >/dev/null || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$2"; }; }
need wrk wrk
need curl curl
need psql postgresql-client

pids=()
work=$(mktemp -d)
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true; done
    rm -rf "$work"
    scripts/pg-cluster.sh stop || true
}
trap cleanup EXIT

scripts/pg-cluster.sh start >/dev/null
eval "$(scripts/pg-cluster.sh env)"

# median: the median of the numbers on standard input (space or newline separated).
median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

# settle: before each measurement, so no autovacuum or checkpoint of the previous one's rows
# runs into it (the example's `items` table).
settle() {
    PGPASSWORD=$POSTGRES_PASSWORD psql -h 127.0.0.1 -p "$POSTGRES_PORT" -U "$POSTGRES_USER" -d "$POSTGRES_DB" -Atqc \
        "VACUUM ANALYZE items" -c "CHECKPOINT" >/dev/null
    sleep 1
}
