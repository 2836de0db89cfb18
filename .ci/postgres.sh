#!/usr/bin/env bash
# Install PostgreSQL from Debian (if missing) and start a throw-away cluster on 127.0.0.1:54329.
# Writes .ci/postgres.env with DSE_TEST_POSTGRES_URL. Used by .ci/run; safe to run twice.
set -euo pipefail
cd "$(dirname "$0")"
PORT=54329
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
fi
BIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
DATA=/tmp/dse-ci-pg
if ! su postgres -c "$BIN/pg_ctl -D $DATA status" >/dev/null 2>&1; then
  rm -rf "$DATA" && mkdir -p "$DATA" && chown postgres "$DATA"
  su postgres -c "$BIN/initdb -D $DATA -A trust -U postgres" >/dev/null
  su postgres -c "$BIN/pg_ctl -D $DATA -o '-p $PORT -k /tmp -c listen_addresses=127.0.0.1' -l $DATA/log -w start" >/dev/null
fi
echo "DSE_TEST_POSTGRES_URL=postgresql+psycopg2://postgres@127.0.0.1:$PORT/postgres" > postgres.env
echo "ci: PostgreSQL running on 127.0.0.1:$PORT"
