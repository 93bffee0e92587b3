#!/usr/bin/env bash
# Make sure a RabbitMQ broker answers on 127.0.0.1:5672: use the running one, else start an installed
# rabbitmq-server, else (as root) install it from Debian's packages and start it.
set -euo pipefail

answers() { (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; }

if answers; then exit 0; fi
if ! command -v rabbitmq-server >/dev/null 2>&1; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "RabbitMQ is not running on 127.0.0.1:5672 and not installed; install rabbitmq-server or set REPORTFLOW_AMQP_URL." >&2
    exit 1
  fi
  echo "installing rabbitmq-server from Debian's packages" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq rabbitmq-server >/dev/null
fi
echo "starting rabbitmq-server" >&2
rabbitmq-server -detached 2>/dev/null || true
for _ in $(seq 1 60); do
  if answers; then
    rabbitmqctl await_startup >/dev/null 2>&1 || true
    exit 0
  fi
  sleep 1
done
echo "RabbitMQ did not come up on 127.0.0.1:5672 within 60 s" >&2
exit 1
