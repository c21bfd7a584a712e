#!/usr/bin/env bash
# Start a throwaway PostgreSQL cluster for the tests, listening on 127.0.0.1 only, and print its URL.
#   eval "$(tests/services/start_postgres.sh)"     # exports PIPELINE_TEST_POSTGRES_URL and PIPELINE_TEST_PGDATA
#   tests/services/stop_postgres.sh                # stops it and deletes the cluster
# Needs Debian's postgresql package (apt-get install -y postgresql). initdb refuses to run as root, so
# as root the cluster is created and run as the `postgres` user. Logs go to $PGDATA/server.log.
set -euo pipefail
bindir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
if [ -z "$bindir" ] || [ ! -x "$bindir/initdb" ]; then
  echo "start_postgres.sh: no PostgreSQL server binaries under /usr/lib/postgresql/*/bin (apt-get install -y postgresql)" >&2
  exit 1
fi
port=${PGPORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')}
pgdata=$(mktemp -d /tmp/pipeline-pg.XXXXXX)
as_owner() { "$@"; }
if [ "$(id -u)" -eq 0 ]; then
  chown postgres:postgres "$pgdata"
  as_owner() { runuser -u postgres -- "$@"; }
fi
password=$(python3 -c 'import secrets; print(secrets.token_hex(12))')
pwfile="$pgdata/.pw"
echo "$password" > "$pwfile"
[ "$(id -u)" -eq 0 ] && chown postgres:postgres "$pwfile"
as_owner "$bindir/initdb" -D "$pgdata/db" -U pipeline --pwfile="$pwfile" -A scram-sha-256 > "$pgdata/initdb.log" 2>&1
rm -f "$pwfile"
as_owner "$bindir/pg_ctl" -D "$pgdata/db" -l "$pgdata/server.log" -w -t 60 \
  -o "-c listen_addresses=127.0.0.1 -p $port -k $pgdata -c max_connections=100" start > /dev/null
PGPASSWORD=$password "$bindir/psql" -h 127.0.0.1 -p "$port" -U pipeline -d postgres -q \
  -c "CREATE DATABASE pipeline_test" > /dev/null
echo "export PIPELINE_TEST_POSTGRES_URL=postgresql://pipeline:$password@127.0.0.1:$port/pipeline_test"
echo "export PIPELINE_TEST_PGDATA=$pgdata"
