#!/usr/bin/env bash
# The local demo, all on loopback: Consul, Redis, three connection servers and the
# controller, with a live per-server table, until Ctrl-C. Nothing is left running after.
#
# The three servers are made of nothing but curl and redis-cli (protocol v1, see
# docs/protocol.md): they register in Consul, pass their TTL checks, report their session
# counts, and obey shed commands. Their "clients" reconnect to the least-utilized server,
# as they would through the gateway. They start piled up 90 / 50 / 10.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

CONSUL_PORT=${CONSUL_PORT:-18500}
REDIS_PORT=${REDIS_PORT:-16379}
METRICS_PORT=${METRICS_PORT:-19464}
svc=ws

bash scripts/setup.sh
echo "demo: building rebalancer"
cargo build --quiet --bin rebalancer

work=$(mktemp -d /tmp/rebalancer-demo.XXXXXX)
pids=()
cleanup() {
  trap - EXIT INT TERM
  echo; echo "demo: stopping"
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT INT TERM

for port in "$CONSUL_PORT" "$REDIS_PORT" "$METRICS_PORT"; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "demo: port $port is taken; set CONSUL_PORT, REDIS_PORT or METRICS_PORT" >&2; exit 1
  fi
done

free() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])' 2>/dev/null || echo $((20000 + RANDOM % 20000)); }
.tools/consul-bin agent -dev -bind 127.0.0.1 -client 127.0.0.1 -http-port "$CONSUL_PORT" \
  -dns-port -1 -grpc-port -1 -serf-lan-port "$(free)" -serf-wan-port "$(free)" -server-port "$(free)" \
  -node demo >"$work/consul.log" 2>&1 &
pids+=($!)
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no >"$work/redis.log" 2>&1 &
pids+=($!)

consul="http://127.0.0.1:$CONSUL_PORT"
rcli() { redis-cli -p "$REDIS_PORT" "$@"; }
for _ in $(seq 100); do
  [ "$(curl -s "$consul/v1/status/leader" 2>/dev/null)" != "" ] && [ "$(curl -s "$consul/v1/status/leader")" != '""' ] \
    && rcli ping >/dev/null 2>&1 && break
  sleep 0.1
done

declare -A sessions=([ws-1]=90 [ws-2]=50 [ws-3]=10)
for id in ws-1 ws-2 ws-3; do
  curl -sf -X PUT "$consul/v1/agent/service/register" -d "{\"ID\":\"$id\",\"Name\":\"$svc\",\"Address\":\"127.0.0.1\",
    \"Port\":9000,\"Meta\":{\"max_sessions\":\"100\"},\"Check\":{\"CheckID\":\"service:$id\",\"TTL\":\"15s\"}}"
  curl -sf -X PUT "$consul/v1/agent/check/pass/service:$id" >/dev/null
  rcli set "rebalancer:$svc:sessions:$id" "${sessions[$id]}" EX 3 >/dev/null
done

# The servers: heartbeat (count with TTL, check pass) and obey shed commands.
(
  while true; do
    for id in ws-1 ws-2 ws-3; do
      n=$(rcli get "rebalancer:$svc:sessions:$id"); n=${n:-0}
      rcli set "rebalancer:$svc:sessions:$id" "$n" EX 3 >/dev/null
      curl -sf -X PUT "$consul/v1/agent/check/pass/service:$id" >/dev/null || true
    done
    sleep 1
  done
) & pids+=($!)
(
  rcli --csv subscribe "rebalancer:$svc:commands" | while IFS= read -r line; do
    server=$(grep -o '\\"server\\":\\"[^\\]*' <<<"$line" | sed 's/.*:\\"//') || continue
    count=$(grep -o '\\"count\\":[0-9]*' <<<"$line" | sed 's/.*://') || continue
    [ -n "$server" ] && [ -n "$count" ] || continue
    n=$(rcli get "rebalancer:$svc:sessions:$server"); n=${n:-0}
    (( count > n )) && count=$n
    rcli set "rebalancer:$svc:sessions:$server" $((n - count)) EX 3 >/dev/null
    # The shed clients reconnect, one by one, to the least-utilized other server.
    for _ in $(seq "$count"); do
      best=""; low=999999
      for id in ws-1 ws-2 ws-3; do
        [ "$id" = "$server" ] && continue
        m=$(rcli get "rebalancer:$svc:sessions:$id"); m=${m:-0}
        (( m < low )) && { low=$m; best=$id; }
      done
      rcli incr "rebalancer:$svc:sessions:$best" >/dev/null
      rcli expire "rebalancer:$svc:sessions:$best" 3 >/dev/null
    done
    echo "$(date +%T) $server shed $count" >>"$work/sheds.log"
  done
) & pids+=($!)

cat >"$work/pipeline.toml" <<TOML
name = "demo"
service = "$svc"
[consul]
address = "$consul"
[redis]
url = "redis://127.0.0.1:$REDIS_PORT/0"
[rebalance]
round_interval = "5s"
[scale]
enabled = false
[metrics]
listen = "127.0.0.1:$METRICS_PORT"
TOML
./target/debug/rebalancer run --pipeline "$work/pipeline.toml" >"$work/controller.log" 2>&1 &
pids+=($!)

echo "demo: Consul $consul  Redis 127.0.0.1:$REDIS_PORT  metrics http://127.0.0.1:$METRICS_PORT/metrics"
echo "demo: controller log $work/controller.log — Ctrl-C to stop"
while true; do
  row=""
  for id in ws-1 ws-2 ws-3; do
    n=$(rcli get "rebalancer:$svc:sessions:$id"); row+=$(printf '%s %3s/100  ' "$id" "${n:-?}")
  done
  u=$(curl -s "127.0.0.1:$METRICS_PORT/metrics" | awk '/^rebalancer_utilization_ratio/{print $2}')
  last=$(tail -n1 "$work/sheds.log" 2>/dev/null || true)
  printf '\r%s U=%s  last: %-30s' "$row" "${u:-?}" "${last:-none yet}"
  sleep 1
done
