#!/usr/bin/env bash
# Stop the cluster started by start_postgres.sh and delete it.
set -euo pipefail
pgdata=${PIPELINE_TEST_PGDATA:?run eval "\$(tests/services/start_postgres.sh)" first}
bindir=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
if [ "$(id -u)" -eq 0 ]; then
  runuser -u postgres -- "$bindir/pg_ctl" -D "$pgdata/db" -m fast -w stop > /dev/null || true
else
  "$bindir/pg_ctl" -D "$pgdata/db" -m fast -w stop > /dev/null || true
fi
rm -rf "$pgdata"
