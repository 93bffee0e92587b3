#!/usr/bin/env bash
# make demo: one sample report, from request to the approved PDF and its emails. It uses the pipeline
# that `make run` keeps going if there is one; otherwise it starts the Procfile's processes for itself,
# waits until every stage consumes, runs the demo and stops what it started.
#   infra/demo.sh [BIN]   BIN: the folder of the installed reportflow command (.venv/bin)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-.venv/bin}
log=${REPORTFLOW_DEMO_LOG:-var/demo-pipeline.log}

if "$BIN/reportflow" status --consuming; then
  exec "$BIN/reportflow" demo
fi

mkdir -p "$(dirname "$log")"
echo "no pipeline is consuming: starting one for the demo (its log: $log)"
"$BIN/reportflow" db upgrade
"$BIN/reportflow" topology declare >/dev/null
PATH="$(cd "$BIN" && pwd):$PATH" "$BIN/honcho" start -f Procfile >"$log" 2>&1 &
pipeline=$!
stop_pipeline() {
  kill -TERM "$pipeline" 2>/dev/null || true
  wait "$pipeline" 2>/dev/null || true
  echo "stopped the pipeline the demo started"
}
trap stop_pipeline EXIT

for _ in $(seq 1 120); do
  if "$BIN/reportflow" status --consuming; then break; fi
  if ! kill -0 "$pipeline" 2>/dev/null; then
    echo "the pipeline exited before it consumed; see $log" >&2
    exit 1
  fi
  sleep 0.5
done
"$BIN/reportflow" demo
