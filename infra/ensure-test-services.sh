#!/usr/bin/env bash
# What the tests need beside a broker: their own RabbitMQ vhost and their own PostgreSQL database,
# so that a `make test` runs beside a `make run` without touching it.
set -euo pipefail
VHOST=${REPORTFLOW_TEST_VHOST:-reportflow-test}
PGDB=${REPORTFLOW_TEST_PGDATABASE:-reportflow_test}

"$(dirname "$0")/ensure-rabbitmq.sh"
if command -v rabbitmqctl >/dev/null 2>&1; then
  rabbitmqctl -q add_vhost "$VHOST" 2>/dev/null || true
  rabbitmqctl -q set_permissions -p "$VHOST" guest '.*' '.*' '.*' >/dev/null
fi

pg_answers() { (exec 3<>/dev/tcp/127.0.0.1/5432) 2>/dev/null; }
if ! pg_answers && command -v pg_ctlcluster >/dev/null 2>&1; then
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
  sleep 2
fi
if pg_answers && command -v psql >/dev/null 2>&1; then
  if ! psql -h 127.0.0.1 -U postgres -tAc "select 1 from pg_database where datname='$PGDB'" | grep -q 1; then
    psql -h 127.0.0.1 -U postgres -qc "create database \"$PGDB\""
  fi
else
  echo "PostgreSQL is not on 127.0.0.1:5432: the PostgreSQL tests will be skipped" >&2
fi
