#!/usr/bin/env bash
# The local demo, all on loopback: Consul, Redis, three demo servers (capacity 100 each),
# the gateway, the load generator piling 150 clients on the first server (reconnecting
# through the gateway), then the controller. The load generator's live line shows the
# fleet converge. Ctrl-C stops everything; nothing is left.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

CONSUL_PORT=${CONSUL_PORT:-18500}
REDIS_PORT=${REDIS_PORT:-16379}
METRICS_PORT=${METRICS_PORT:-19464}
GATEWAY_PORT=${GATEWAY_PORT:-18080}
GATEWAY_METRICS_PORT=${GATEWAY_METRICS_PORT:-19466}
SERVER_PORTS=(${SERVER_PORTS:-19001 19002 19003})
CLIENTS=${CLIENTS:-150}

bash scripts/setup.sh
echo "demo: building rebalancer"
cargo build --quiet --bin rebalancer
bin=$root/target/debug/rebalancer

work=$(mktemp -d /tmp/rebalancer-demo.XXXXXX)
pids=()
cleanup() {
  trap - EXIT INT TERM
  echo; echo "demo: stopping"
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT INT TERM

for port in "$CONSUL_PORT" "$REDIS_PORT" "$METRICS_PORT" "$GATEWAY_PORT" "$GATEWAY_METRICS_PORT" "${SERVER_PORTS[@]}"; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "demo: port $port is taken; set CONSUL_PORT, REDIS_PORT, METRICS_PORT or SERVER_PORTS" >&2; exit 1
  fi
done
free() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }

target/tools/consul-bin agent -dev -bind 127.0.0.1 -client 127.0.0.1 -http-port "$CONSUL_PORT" \
  -dns-port -1 -grpc-port -1 -serf-lan-port "$(free)" -serf-wan-port "$(free)" -server-port "$(free)" \
  -node demo >"$work/consul.log" 2>&1 &
pids+=($!)
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no >"$work/redis.log" 2>&1 &
pids+=($!)
consul="http://127.0.0.1:$CONSUL_PORT"
redis="redis://127.0.0.1:$REDIS_PORT/0"
for _ in $(seq 100); do
  leader=$(curl -s "$consul/v1/status/leader" 2>/dev/null || true)
  [ -n "$leader" ] && [ "$leader" != '""' ] && redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break
  sleep 0.1
done

# Signed commands: one fresh key for the controller and every server.
REBALANCER_COMMAND_KEYS="demo:$(head -c 32 /dev/urandom | od -An -tx1 | tr -d " \n")"
export REBALANCER_COMMAND_KEYS

i=0
for port in "${SERVER_PORTS[@]}"; do
  i=$((i + 1))
  "$bin" demo-server --service ws --id "ws-$i" --listen "127.0.0.1:$port" --max-sessions 100 \
    --consul "$consul" --redis "$redis" >"$work/server-$i.log" 2>&1 &
  pids+=($!)
done

cat >"$work/pipeline.toml" <<TOML
name = "demo"
service = "ws"
[consul]
address = "$consul"
[redis]
url = "$redis"
[rebalance]
tolerance = 0.05                # tighter than the default, so the table ends visibly even
round_interval = "5s"
[metrics]
listen = "127.0.0.1:$METRICS_PORT"
[gateway]
listen = "127.0.0.1:$GATEWAY_PORT"
metrics_listen = "127.0.0.1:$GATEWAY_METRICS_PORT"
TOML
"$bin" gateway --pipeline "$work/pipeline.toml" >"$work/gateway.log" 2>&1 &
pids+=($!)

echo "demo: Consul $consul  Redis $redis  servers ws-1..ws-3 on ${SERVER_PORTS[*]}"
echo "demo: gateway ws://127.0.0.1:$GATEWAY_PORT/ (metrics http://127.0.0.1:$GATEWAY_METRICS_PORT/metrics)"
echo "demo: $CLIENTS clients pile onto ws-1 (it holds 100 at most; the rest go through the gateway)."
echo "demo: the controller starts in 8 s, then sheds ws-1; shed clients reconnect through the gateway."
echo "demo: logs in $work — Ctrl-C to stop"
"$bin" loadgen --connections "$CLIENTS" --duration 1h --pile-on "ws://127.0.0.1:${SERVER_PORTS[0]}/" \
  --url "ws://127.0.0.1:$GATEWAY_PORT/" >"$work/loadgen.json" &
pids+=($!)
loadgen=$!
sleep 8
"$bin" run --pipeline "$work/pipeline.toml" >"$work/controller.log" 2>&1 &
pids+=($!)
echo "demo: controller started (metrics http://127.0.0.1:$METRICS_PORT/metrics, topology http://127.0.0.1:$METRICS_PORT/v1/topology)"
wait "$loadgen"
