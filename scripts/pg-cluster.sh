#!/usr/bin/env bash
# A throwaway PostgreSQL primary and streaming replicas on 127.0.0.1, for tests and the demo.
#
# Usage: scripts/pg-cluster.sh start|stop|status|env|promote [N]|stop-replica [N]|start-replica [N]
#                              |stop-primary|start-primary|pause-replay [N]|resume-replay [N]
#                              |freeze-replica [N]|thaw-replica [N]
#
#   start          initialise (first time) and start the primary and its replicas; idempotent
#   stop           stop every server and delete the data folder; idempotent
#   status         print each server's port and role (primary / replica / down)
#   env            print the POSTGRES_* variables the tests read, as `export` lines
#   promote [N]    promote replica N (default 1) to primary
#   stop-replica [N], start-replica [N]     stop or start replica N (default 1)
#   stop-primary, start-primary             stop or start the (original) primary
#   pause-replay [N], resume-replay [N]     pause or resume WAL replay on replica N
#   freeze-replica [N], thaw-replica [N]    SIGSTOP / SIGCONT replica N's postmaster and its
#                  processes: a frozen host, which accepts TCP connections and answers nothing
#
# Settings (environment, with defaults):
#   PG_CLUSTER_DIR   data folder             ${TMPDIR:-/tmp}/contextdb-pg-$PG_PRIMARY_PORT
#   PG_PRIMARY_PORT  primary's port          25432
#   PG_REPLICA_PORT  first replica's port    25433 (replica N listens on PG_REPLICA_PORT+N-1)
#   PG_REPLICAS      number of replicas      1
#   PG_USER          database superuser      contextdb
#   PG_PASSWORD      its password            contextdb
#   PG_DATABASE      database created        contextdb
#   PG_OS_USER       unprivileged OS user the servers run as (PostgreSQL refuses root):
#                    default "postgres" when it exists, else "contextdb" (created when missing)
#   PG_SSL           "on": the servers accept TLS (ssl = on), with a certificate for the name
#                    localhost (not for 127.0.0.1) signed by a CA made at init with openssl:
#                    $PG_CLUSTER_DIR/tls/ca.crt; other-ca.crt is a CA that signed nothing the
#                    servers use; client.crt/client.key (same CA) log in as role contextdb_cert,
#                    which may log in only with that certificate. Default off.
#
# PostgreSQL is installed with apt-get when no server binaries are found.
set -euo pipefail

PG_PRIMARY_PORT=${PG_PRIMARY_PORT:-25432}
PG_REPLICA_PORT=${PG_REPLICA_PORT:-25433}
PG_REPLICAS=${PG_REPLICAS:-1}
PG_USER=${PG_USER:-contextdb}
PG_PASSWORD=${PG_PASSWORD:-contextdb}
PG_DATABASE=${PG_DATABASE:-contextdb}
PG_CLUSTER_DIR=${PG_CLUSTER_DIR:-${TMPDIR:-/tmp}/contextdb-pg-$PG_PRIMARY_PORT}
PG_SSL=${PG_SSL:-off}

log() { echo "pg-cluster: $*" >&2; }
die() { log "error: $*"; exit 1; }

find_bin() {
    local dir
    for dir in /usr/lib/postgresql/*/bin; do
        [ -x "$dir/initdb" ] && [ -x "$dir/pg_basebackup" ] && { echo "$dir"; return 0; }
    done
    return 1
}

ensure_postgres() {
    if ! BIN=$(find_bin); then
        [ "$(id -u)" = 0 ] || die "PostgreSQL is not installed and installing needs root (apt-get install postgresql)"
        log "installing PostgreSQL with apt-get"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -q >&2
        apt-get install -y -q --no-install-recommends postgresql postgresql-client >&2
        BIN=$(find_bin) || die "PostgreSQL binaries still missing after apt-get install"
    fi
    command -v psql >/dev/null || PATH="$BIN:$PATH"
}

ensure_os_user() {
    if [ "$(id -u)" != 0 ]; then
        OS_USER=$(id -un)
        return
    fi
    if [ -n "${PG_OS_USER:-}" ]; then
        OS_USER=$PG_OS_USER
    elif id postgres >/dev/null 2>&1; then
        OS_USER=postgres
    else
        OS_USER=contextdb
    fi
    if ! id "$OS_USER" >/dev/null 2>&1; then
        log "creating the unprivileged user $OS_USER"
        useradd --system --no-create-home --shell /usr/sbin/nologin "$OS_USER"
    fi
}

# Runs a command as the unprivileged user.
as_user() {
    if [ "$(id -u)" = 0 ]; then
        runuser -u "$OS_USER" -- "$@"
    else
        "$@"
    fi
}

replica_port() { echo $((PG_REPLICA_PORT + $1 - 1)); }
replica_dir() { echo "$PG_CLUSTER_DIR/replica$1"; }
is_running() { [ -f "$1/postmaster.pid" ] && as_user "$BIN/pg_ctl" -D "$1" status >/dev/null 2>&1; }

start_server() { # dir
    is_running "$1" && return 0
    as_user "$BIN/pg_ctl" -D "$1" -l "$1/server.log" -w -t 60 start >/dev/null \
        || { tail -n 20 "$1/server.log" >&2; die "the server in $1 did not start"; }
}

stop_server() { # dir
    is_running "$1" || return 0
    as_user "$BIN/pg_ctl" -D "$1" -m fast -w -t 60 stop >/dev/null
}

signal_server() { # dir signal — the postmaster of this data folder and its children only
    local pid
    pid=$(head -1 "$1/postmaster.pid")
    [ -n "$pid" ] || { echo "no postmaster in $1" >&2; return 1; }
    if [ "$2" = STOP ]; then
        kill -STOP "$pid"  # first, so it forks no new backend
        pkill -STOP -P "$pid" || true
    else
        pkill -CONT -P "$pid" || true
        kill -CONT "$pid"
    fi
}

psql_at() { # port sql
    PGPASSWORD=$PG_PASSWORD "$BIN/psql" -h 127.0.0.1 -p "$1" -U "$PG_USER" -d "$PG_DATABASE" -Atqc "$2"
}

init_primary() {
    local dir=$PG_CLUSTER_DIR/primary
    [ -f "$dir/PG_VERSION" ] && return 0
    mkdir -p "$PG_CLUSTER_DIR"
    chown "$OS_USER" "$PG_CLUSTER_DIR" 2>/dev/null || true
    chmod 700 "$PG_CLUSTER_DIR"
    local pwfile=$PG_CLUSTER_DIR/.pw
    printf '%s\n' "$PG_PASSWORD" > "$pwfile"
    chown "$OS_USER" "$pwfile" 2>/dev/null || true
    as_user "$BIN/initdb" -D "$dir" -U "$PG_USER" --pwfile="$pwfile" --auth-host=scram-sha-256 \
        --auth-local=trust -E UTF8 --locale=C.UTF-8 >/dev/null 2>&1 \
        || as_user "$BIN/initdb" -D "$dir" -U "$PG_USER" --pwfile="$pwfile" --auth-host=scram-sha-256 \
            --auth-local=trust -E UTF8 --locale=C >/dev/null
    rm -f "$pwfile"
    cat >> "$dir/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $PG_PRIMARY_PORT
unix_socket_directories = '$PG_CLUSTER_DIR'
wal_level = replica
max_wal_senders = 10
max_replication_slots = 10
hot_standby = on
hot_standby_feedback = on
max_connections = 300
fsync = off
full_page_writes = off
log_min_messages = warning
CONF
    cat >> "$dir/pg_hba.conf" <<HBA
host replication all 127.0.0.1/32 scram-sha-256
HBA
    [ "$PG_SSL" = on ] && init_tls "$dir"
    start_server "$dir"
    PGPASSWORD=$PG_PASSWORD "$BIN/psql" -h 127.0.0.1 -p "$PG_PRIMARY_PORT" -U "$PG_USER" -d postgres -Atqc \
        "CREATE DATABASE \"$PG_DATABASE\"" >/dev/null
    if [ "$PG_SSL" = on ]; then
        PGPASSWORD=$PG_PASSWORD "$BIN/psql" -h 127.0.0.1 -p "$PG_PRIMARY_PORT" -U "$PG_USER" -d postgres -Atqc \
            "CREATE ROLE contextdb_cert LOGIN" >/dev/null
    fi
}

# init_tls DATADIR: a CA, a server certificate it signed for the name localhost only, a client
# certificate (role contextdb_cert), another CA, and ssl = on in DATADIR's configuration
# (replicas copy it with the base backup).
init_tls() {
    command -v openssl >/dev/null || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q openssl; }
    ssl() { local out; out=$(openssl "$@" 2>&1) || { printf '%s\n' "$out" >&2; die "openssl $1 failed"; }; }
    local tls=$PG_CLUSTER_DIR/tls
    mkdir -p "$tls"
    ssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=ContextDB test CA" \
        -keyout "$tls/ca.key" -out "$tls/ca.crt"
    ssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=Another test CA" \
        -keyout "$tls/other-ca.key" -out "$tls/other-ca.crt"
    ssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" \
        -keyout "$tls/server.key" -out "$tls/server.csr"
    printf 'subjectAltName = DNS:localhost\n' > "$tls/server.ext"
    ssl x509 -req -in "$tls/server.csr" -CA "$tls/ca.crt" -CAkey "$tls/ca.key" -CAcreateserial \
        -days 2 -extfile "$tls/server.ext" -out "$tls/server.crt"
    ssl req -newkey rsa:2048 -nodes -subj "/CN=contextdb_cert" \
        -keyout "$tls/client.key" -out "$tls/client.csr"
    ssl x509 -req -in "$tls/client.csr" -CA "$tls/ca.crt" -CAkey "$tls/ca.key" -CAcreateserial \
        -days 2 -out "$tls/client.crt"
    chmod 644 "$tls"/*.crt
    chmod 600 "$tls"/*.key
    chown -R "$OS_USER" "$tls" 2>/dev/null || true
    cat >> "$1/postgresql.conf" <<CONF
ssl = on
ssl_cert_file = '$tls/server.crt'
ssl_key_file = '$tls/server.key'
ssl_ca_file = '$tls/ca.crt'
CONF
    # First match wins: the certificate role's line goes before the password lines.
    { printf 'hostssl all contextdb_cert 127.0.0.1/32 cert\n'; cat "$1/pg_hba.conf"; } > "$1/pg_hba.conf.new"
    mv "$1/pg_hba.conf.new" "$1/pg_hba.conf"
    chown "$OS_USER" "$1/pg_hba.conf" 2>/dev/null || true
}

init_replica() { # n
    local dir; dir=$(replica_dir "$1")
    [ -f "$dir/PG_VERSION" ] && return 0
    local pgpass=$PG_CLUSTER_DIR/.pgpass
    printf '127.0.0.1:%s:*:%s:%s\n' "$PG_PRIMARY_PORT" "$PG_USER" "$PG_PASSWORD" > "$pgpass"
    chown "$OS_USER" "$pgpass" 2>/dev/null || true
    chmod 600 "$pgpass"
    as_user env PGPASSFILE="$pgpass" "$BIN/pg_basebackup" -h 127.0.0.1 -p "$PG_PRIMARY_PORT" \
        -U "$PG_USER" -D "$dir" -R -X stream -c fast >/dev/null
    rm -f "$pgpass"
    # pg_basebackup -R pointed primary_conninfo at the (now deleted) password file: name the
    # password itself (a throwaway loopback cluster) and the replica in pg_stat_replication.
    cat >> "$dir/postgresql.auto.conf" <<CONF
primary_conninfo = 'host=127.0.0.1 port=$PG_PRIMARY_PORT user=$PG_USER password=$PG_PASSWORD application_name=replica$1'
port = $(replica_port "$1")
CONF
    start_server "$dir"
}

cmd_start() {
    ensure_postgres
    ensure_os_user
    # Never touch a cluster that already runs in this folder (another run's, or yours).
    if [ -f "$PG_CLUSTER_DIR/primary/postmaster.pid" ] && as_user "$BIN/pg_ctl" -D "$PG_CLUSTER_DIR/primary" status >/dev/null 2>&1; then
        die "a cluster already runs in $PG_CLUSTER_DIR; stop it first, or set PG_CLUSTER_DIR"
    fi
    init_primary
    start_server "$PG_CLUSTER_DIR/primary"
    local n
    for n in $(seq 1 "$PG_REPLICAS"); do
        init_replica "$n"
        start_server "$(replica_dir "$n")"
    done
    # Wait until every replica streams from the primary.
    local tries=0
    until [ "$(psql_at "$PG_PRIMARY_PORT" "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'" 2>/dev/null || echo 0)" -ge "$PG_REPLICAS" ]; do
        tries=$((tries + 1))
        [ $tries -lt 120 ] || die "the replicas do not stream from the primary"
        sleep 0.5
    done
    cmd_status
}

cmd_stop() {
    ensure_postgres
    ensure_os_user
    local dir
    for dir in "$PG_CLUSTER_DIR"/replica* "$PG_CLUSTER_DIR/primary"; do
        [ -d "$dir" ] && stop_server "$dir"
    done
    rm -rf "$PG_CLUSTER_DIR"
    log "stopped and removed $PG_CLUSTER_DIR"
}

role_of() { # port
    case "$(psql_at "$1" "SELECT pg_is_in_recovery()" 2>/dev/null || echo down)" in
        f) echo primary ;;
        t) echo replica ;;
        *) echo down ;;
    esac
}

cmd_status() {
    ensure_postgres
    echo "primary       127.0.0.1:$PG_PRIMARY_PORT  $(role_of "$PG_PRIMARY_PORT")"
    local n
    for n in $(seq 1 "$PG_REPLICAS"); do
        echo "replica$n      127.0.0.1:$(replica_port "$n")  $(role_of "$(replica_port "$n")")"
    done
}

cmd_env() {
    cat <<ENV
export POSTGRES_HOSTNAME=127.0.0.1
export POSTGRES_PORT=$PG_PRIMARY_PORT
export POSTGRES_USER=$PG_USER
export POSTGRES_PASSWORD=$PG_PASSWORD
export POSTGRES_DB=$PG_DATABASE
export POSTGRES_REPLICA_HOSTNAME=127.0.0.1
export POSTGRES_REPLICA_PORT=$PG_REPLICA_PORT
export POSTGRES_REPLICA_PORTS=$(for n in $(seq 1 "$PG_REPLICAS"); do printf '%s ' "$(replica_port "$n")"; done | sed 's/ $//; s/ /,/g')
export PG_CLUSTER_DIR=$PG_CLUSTER_DIR
export DATABASE_URL=postgresql://$PG_USER:$PG_PASSWORD@127.0.0.1:$PG_PRIMARY_PORT$(for n in $(seq 1 "$PG_REPLICAS"); do printf ',127.0.0.1:%s' "$(replica_port "$n")"; done)/$PG_DATABASE?sslmode=disable
ENV
}

main() {
    local command=${1:-}
    local n=${2:-1}
    case "$command" in
        start) cmd_start ;;
        stop) cmd_stop ;;
        status) cmd_status ;;
        env) cmd_env ;;
        promote) ensure_postgres; ensure_os_user; as_user "$BIN/pg_ctl" -D "$(replica_dir "$n")" -w promote >/dev/null; cmd_status ;;
        stop-primary) ensure_postgres; ensure_os_user; stop_server "$PG_CLUSTER_DIR/primary" ;;
        start-primary) ensure_postgres; ensure_os_user; start_server "$PG_CLUSTER_DIR/primary" ;;
        stop-replica) ensure_postgres; ensure_os_user; stop_server "$(replica_dir "$n")" ;;
        start-replica) ensure_postgres; ensure_os_user; start_server "$(replica_dir "$n")" ;;
        pause-replay) ensure_postgres; psql_at "$(replica_port "$n")" "SELECT pg_wal_replay_pause()" >/dev/null ;;
        resume-replay) ensure_postgres; psql_at "$(replica_port "$n")" "SELECT pg_wal_replay_resume()" >/dev/null ;;
        freeze-replica) signal_server "$(replica_dir "$n")" STOP ;;
        thaw-replica) signal_server "$(replica_dir "$n")" CONT ;;
        *) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; [ -z "$command" ] || exit 2 ;;
    esac
}

main "$@"
