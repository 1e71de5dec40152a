#!/usr/bin/env bash
# A throwaway PostgreSQL server for tests and benchmarks.
#   scripts/pg-throwaway.sh start  -> prints the server URL
#   scripts/pg-throwaway.sh stop
# PGPORT and PGBASE choose the port and the directory. initdb refuses to run
# as root, so as root the server runs as the `postgres` user.
# By default durability is off (fsync=off etc.): tests only need speed. Benchmarks
# set PG_DURABLE=1 to keep Postgres's shipped defaults (fsync, synchronous_commit,
# full_page_writes on), so that they measure the durability we ship.
set -euo pipefail

PGBIN=${PGBIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)}
PGBIN=${PGBIN:-$(dirname "$(command -v initdb 2>/dev/null || echo /nonexistent/initdb)")}
PGPORT=${PGPORT:-55432}
PGBASE=${PGBASE:-$(dirname "$(mktemp -u)")/streamkeep-pg-$PGPORT}
PG_DURABLE=${PG_DURABLE:-0}

if [ ! -x "$PGBIN/initdb" ]; then
  echo "PostgreSQL server binaries not found (looked in '$PGBIN')." >&2
  echo "Install them: apt-get update && apt-get install -y postgresql-15" >&2
  exit 3
fi

as_pg() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

case "${1:-}" in
start)
  if [ "$(id -u)" = 0 ] && ! id postgres >/dev/null 2>&1; then
    useradd --system --no-create-home --shell /usr/sbin/nologin postgres
  fi
  rm -rf "$PGBASE"
  mkdir -p "$PGBASE"
  if [ "$(id -u)" = 0 ]; then chown postgres: "$PGBASE"; fi
  as_pg "$PGBIN/initdb" -D "$PGBASE/data" -U postgres --auth=trust -E UTF8 --no-locale \
    >"$PGBASE/initdb.log" 2>&1 || { cat "$PGBASE/initdb.log" >&2; exit 1; }
  options="-p $PGPORT -k $PGBASE -c listen_addresses=127.0.0.1 -c max_connections=300"
  if [ "$PG_DURABLE" != 1 ]; then
    options="$options -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
  fi
  as_pg "$PGBIN/pg_ctl" -D "$PGBASE/data" -l "$PGBASE/server.log" -w -t 30 start -o "$options" \
    >/dev/null || { cat "$PGBASE/server.log" >&2; exit 1; }
  echo "postgresql://postgres@127.0.0.1:$PGPORT/postgres"
  ;;
stop)
  if [ -d "$PGBASE/data" ]; then
    as_pg "$PGBIN/pg_ctl" -D "$PGBASE/data" -m fast -w stop >/dev/null || true
  fi
  rm -rf "$PGBASE"
  ;;
*)
  echo "usage: $0 start|stop" >&2
  exit 2
  ;;
esac
