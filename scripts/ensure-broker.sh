#!/usr/bin/env bash
# Make sure a RabbitMQ broker answers on 127.0.0.1:5672: start it, or install it
# with apt-get (as root) when it is missing. Never stops a running broker.
set -euo pipefail

port_open() { (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; }

if port_open; then
    echo "RabbitMQ is running on 127.0.0.1:5672"
    exit 0
fi
if ! command -v rabbitmq-server >/dev/null 2>&1 && [ ! -x /usr/sbin/rabbitmq-server ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "RabbitMQ is not installed and this user is not root: install rabbitmq-server, then retry." >&2
        exit 1
    fi
    echo "Installing rabbitmq-server with apt-get..."
    DEBIAN_FRONTEND=noninteractive apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q rabbitmq-server
fi
if ! port_open; then
    echo "Starting RabbitMQ..."
    PATH="$PATH:/usr/sbin" rabbitmq-server -detached || true
fi
for _ in $(seq 1 90); do
    if port_open; then
        echo "RabbitMQ is up on 127.0.0.1:5672"
        exit 0
    fi
    sleep 1
done
echo "RabbitMQ did not come up on 127.0.0.1:5672 within 90 s" >&2
exit 1
