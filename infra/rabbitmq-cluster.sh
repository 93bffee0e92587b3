#!/usr/bin/env bash
# A three-node RabbitMQ cluster on this machine, from Debian's rabbitmq-server: nodes rf-a, rf-b and rf-c
# @localhost, each with its own AMQP port (5681-5683), distribution port (25681-25683), management API
# (15681-15683, for `reportflow status`), data and log folders. Loopback only.
#
#   infra/rabbitmq-cluster.sh up [FOLDER]      start the three nodes and join them (prints the AMQP URLs)
#   infra/rabbitmq-cluster.sh down [FOLDER]    stop them, by node name, and remove their folders
#   infra/rabbitmq-cluster.sh status           the cluster's status as node rf-a sees it
#
# Then: REPORTFLOW_AMQP_URL="$(infra/rabbitmq-cluster.sh urls)" REPORTFLOW_QUEUE_TYPE=quorum make run
set -euo pipefail

NODES=(a b c)
FOLDER=${2:-${REPORTFLOW_CLUSTER_DIR:-${TMPDIR:-/tmp}/reportflow-rabbitmq-cluster}}
VHOST=${REPORTFLOW_CLUSTER_VHOST:-reportflow}

port() { echo $((5681 + $1)); }
dist_port() { echo $((25681 + $1)); }
api_port() { echo $((15681 + $1)); }
node() { echo "rf-$1@localhost"; }
ctl() { rabbitmqctl -q -n "$(node "$1")" "${@:2}"; }

start_node() {
  local name=$1 index=$2 home="$FOLDER/$1"
  mkdir -p "$home/mnesia" "$home/log"
  cat > "$home/rabbitmq.conf" <<EOF
listeners.tcp.local = 127.0.0.1:$(port "$index")
management.tcp.ip = 127.0.0.1
management.tcp.port = $(api_port "$index")
loopback_users = none
EOF
  echo "[rabbitmq_management]." > "$home/enabled_plugins"
  # The broker runs as the rabbitmq user (Debian's wrapper switches to it), so it must own its folders.
  if id rabbitmq >/dev/null 2>&1 && [ "$(id -u)" -eq 0 ]; then chown -R rabbitmq:rabbitmq "$FOLDER"; fi
  RABBITMQ_NODENAME=$(node "$name") RABBITMQ_NODE_PORT=$(port "$index") RABBITMQ_DIST_PORT=$(dist_port "$index") \
  RABBITMQ_CONFIG_FILE="$home/rabbitmq.conf" RABBITMQ_ENABLED_PLUGINS_FILE="$home/enabled_plugins" \
  RABBITMQ_MNESIA_BASE="$home/mnesia" RABBITMQ_LOG_BASE="$home/log" RABBITMQ_PID_FILE="$home/pid" \
    rabbitmq-server -detached >/dev/null 2>&1
  for _ in $(seq 1 90); do
    if ctl "$name" await_startup >/dev/null 2>&1; then return 0; fi
    sleep 1
  done
  echo "node $(node "$name") did not start; see $home/log" >&2
  return 1
}

urls() {
  local user=${REPORTFLOW_CLUSTER_USER:-guest} password=${REPORTFLOW_CLUSTER_PASSWORD:-guest} urls=()
  for index in "${!NODES[@]}"; do urls+=("amqp://$user:$password@127.0.0.1:$(port "$index")/$VHOST"); done
  (IFS=,; echo "${urls[*]}")
}

case "${1:-}" in
  up)
    mkdir -p "$FOLDER"
    for index in "${!NODES[@]}"; do start_node "${NODES[$index]}" "$index"; done
    for name in "${NODES[@]:1}"; do
      ctl "$name" stop_app
      ctl "$name" join_cluster "$(node a)"
      ctl "$name" start_app
    done
    ctl a add_vhost "$VHOST" 2>/dev/null || true
    ctl a set_permissions -p "$VHOST" "${REPORTFLOW_CLUSTER_USER:-guest}" '.*' '.*' '.*'
    urls
    ;;
  down)
    for name in "${NODES[@]}"; do ctl "$name" stop >/dev/null 2>&1 || true; done
    rm -rf "$FOLDER"
    ;;
  status) ctl a cluster_status ;;
  urls) urls ;;
  *) echo "usage: $0 up|down|status|urls [FOLDER]" >&2; exit 2 ;;
esac
