#!/usr/bin/env bash
# The gateway against HAProxy (balance leastconn) and nginx (least_conn), all in front of the
# same three demo servers on loopback, driven by wrk with the same connections and threads
# (HTTP keep-alive, small bodies). Also: memory per idle WebSocket relayed by the gateway.
#
#   bash benches/proxy.sh        (installs haproxy, nginx-light and wrk from Debian if missing)
#
# Prints a Markdown table for BENCHMARKS.md. Everything runs on 127.0.0.1 and stops at the end.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
DURATION=${DURATION:-10s}
CONNS=${CONNS:-64}
THREADS=${THREADS:-2}
IDLE_WS=${IDLE_WS:-2000}
ROUNDS=${ROUNDS:-3}

bash scripts/setup.sh >/dev/null
for tool in haproxy nginx wrk; do
  command -v "$tool" >/dev/null 2>&1 || {
    [ "$(id -u)" = 0 ] || { echo "install haproxy, nginx-light and wrk" >&2; exit 1; }
    apt-get install -y -qq --no-install-recommends haproxy nginx-light wrk >/dev/null
  }
done
cargo build --release --quiet --bin rebalancer
bin=$root/target/release/rebalancer

work=$(mktemp -d /tmp/rebalancer-proxy-bench.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT INT TERM
free() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }

cport=$(free); rport=$(free)
target/tools/consul-bin agent -dev -bind 127.0.0.1 -client 127.0.0.1 -http-port "$cport" -dns-port -1 -grpc-port -1 \
  -serf-lan-port "$(free)" -serf-wan-port "$(free)" -server-port "$(free)" -node bench >"$work/consul.log" 2>&1 &
pids+=($!)
redis-server --port "$rport" --bind 127.0.0.1 --save "" --appendonly no >"$work/redis.log" 2>&1 &
pids+=($!)
sleep 3
backends=()
for i in 1 2 3; do
  p=$(free); backends+=("$p")
  RUST_LOG=warn "$bin" demo-server --id "b$i" --listen "127.0.0.1:$p" --max-sessions 100000 \
    --consul "http://127.0.0.1:$cport" --redis "redis://127.0.0.1:$rport/0" >"$work/b$i.log" 2>&1 &
  pids+=($!)
done
gport=$(free); gmetrics=$(free)
cat >"$work/pipeline.toml" <<TOML
service = "ws"
[consul]
address = "http://127.0.0.1:$cport"
[redis]
url = "redis://127.0.0.1:$rport/0"
[gateway]
listen = "127.0.0.1:$gport"
metrics_listen = "127.0.0.1:$gmetrics"
TOML
RUST_LOG=warn "$bin" gateway --pipeline "$work/pipeline.toml" >"$work/gateway.log" 2>&1 &
gpid=$!; pids+=($gpid)

hport=$(free)
{
  echo "global"; echo "  maxconn 8000"
  echo "defaults"; echo "  mode http"; echo "  timeout connect 2s"; echo "  timeout client 60s"; echo "  timeout server 60s"
  echo "frontend f"; echo "  bind 127.0.0.1:$hport"; echo "  default_backend b"
  echo "backend b"; echo "  balance leastconn"
  for i in 0 1 2; do echo "  server b$i 127.0.0.1:${backends[$i]}"; done
} >"$work/haproxy.cfg"
haproxy -f "$work/haproxy.cfg" -db >"$work/haproxy.log" 2>&1 &
hpid=$!; pids+=($hpid)

nport=$(free)
mkdir -p "$work/nginx"
{
  echo "worker_processes 2; pid $work/nginx/pid; error_log $work/nginx/error.log;"
  echo "events { worker_connections 4096; }"
  echo "http { access_log off; client_body_temp_path $work/nginx; proxy_temp_path $work/nginx;"
  echo "  fastcgi_temp_path $work/nginx; uwsgi_temp_path $work/nginx; scgi_temp_path $work/nginx;"
  echo "  upstream b { least_conn; keepalive 64;"
  for i in 0 1 2; do echo "    server 127.0.0.1:${backends[$i]};"; done
  echo "  }"
  echo "  server { listen 127.0.0.1:$nport; location / { proxy_pass http://b; proxy_http_version 1.1; proxy_set_header Connection \"\"; } }"
  echo "}"
} >"$work/nginx.conf"
nginx -c "$work/nginx.conf" -g 'daemon off;' >"$work/nginx.out" 2>&1 &
npid=$!; pids+=($npid)

for _ in $(seq 100); do
  curl -sf "http://127.0.0.1:$gport/hello" >/dev/null 2>&1 && curl -sf "http://127.0.0.1:$hport/hello" >/dev/null 2>&1 \
    && curl -sf "http://127.0.0.1:$nport/hello" >/dev/null 2>&1 && break
  sleep 0.2
done

# CPU time (user + system, in clock ticks) of a process and its children (nginx's workers).
ticks() {
  local total=0 p
  for p in "$1" $(pgrep -P "$1" || true); do
    total=$((total + $(awk '{print $14 + $15}' "/proc/$p/stat")))
  done
  echo "$total"
}
measure() { # name url pid [threads conns] -> "name rps p50 p99 cpu_us_per_request"
  local before after out; before=$(ticks "$3")
  out=$(wrk -t"${4:-$THREADS}" -c"${5:-$CONNS}" -d"$DURATION" --latency "$2")
  after=$(ticks "$3")
  local rps p50 p99 total
  rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
  total=$(awk '/requests in/ {print $1}' <<<"$out")
  p50=$(awk '$1=="50%" {print $2}' <<<"$out")
  p99=$(awk '$1=="99%" {print $2}' <<<"$out")
  cpu=$(awk -v t=$((after - before)) -v n="$total" -v hz="$(getconf CLK_TCK)" 'BEGIN { printf "%.1f", t / hz * 1e6 / n }')
  echo "$1 $rps $p50 $p99 $cpu"
}
to_ms() { awk -v v="$1" 'BEGIN { if (v ~ /us$/) { sub(/us/,"",v); print v/1000 } else if (v ~ /ms$/) { sub(/ms/,"",v); print v } else if (v ~ /s$/) { sub(/s/,"",v); print v*1000 } else print v }'; }

# Each target is measured ROUNDS times, the targets taking turns, and the round with the
# median requests/s is reported: on a shared machine one run can be off by 20 %.
median() { # name -> that target's median row
  grep "^$1 " "$work/rounds" | sort -k2 -n | awk '{ rows[NR] = $0 } END { print rows[int((NR + 1) / 2)] }'
}
bpid=$(pgrep -f -- "--id b1 --listen 127.0.0.1:${backends[0]}" | head -1)
: >"$work/rounds"
for _ in $(seq "$ROUNDS"); do
  measure direct "http://127.0.0.1:${backends[0]}/hello" "$bpid" >>"$work/rounds"
  measure gateway "http://127.0.0.1:$gport/hello" "$gpid" >>"$work/rounds"
  measure haproxy "http://127.0.0.1:$hport/hello" "$hpid" >>"$work/rounds"
  measure nginx "http://127.0.0.1:$nport/hello" "$npid" >>"$work/rounds"
done
results=()
for name in direct gateway haproxy nginx; do results+=("$(median "$name")"); done

echo "wrk -t$THREADS -c$CONNS -d$DURATION --latency, GET /hello, three demo servers (release build), $(nproc) cores; median of $ROUNDS rounds"
echo
echo "every round (requests/s):"
for name in direct gateway haproxy nginx; do
  echo "- $name: $(grep "^$name " "$work/rounds" | awk '{ printf "%s%s", sep, $2; sep = ", " }')"
done
echo
echo "| target | requests/s | p50 | p99 | p99 added over direct | throughput vs HAProxy | CPU per request (proxy or server) |"
echo "|---|---|---|---|---|---|---|"
read -r _ d_rps _ d_p99 _ <<<"${results[0]}"
read -r _ h_rps _ _ _ <<<"${results[2]}"
for r in "${results[@]}"; do
  read -r name rps p50 p99 cpu <<<"$r"
  added=$(awk -v a="$(to_ms "$p99")" -v b="$(to_ms "$d_p99")" 'BEGIN { printf "%.2f ms", a-b }')
  ratio=$(awk -v a="$rps" -v b="$h_rps" 'BEGIN { printf "%.2f", a/b }')
  echo "| $name | $rps | $p50 | $p99 | $added | $ratio | $cpu µs |"
done

# Latency a proxy adds when it is not saturated: one connection, one request at a time, so
# no request waits behind another for a CPU (under the load above, all of them do).
echo
echo "wrk -t1 -c1 -d$DURATION --latency: one request at a time; median of $ROUNDS rounds"
echo
echo "| target | requests/s | p50 | p99 | p50 added | p99 added |"
echo "|---|---|---|---|---|---|"
serial=()
: >"$work/rounds"
for _ in $(seq "$ROUNDS"); do
  measure direct "http://127.0.0.1:${backends[0]}/hello" "$bpid" 1 1 >>"$work/rounds"
  measure gateway "http://127.0.0.1:$gport/hello" "$gpid" 1 1 >>"$work/rounds"
  measure haproxy "http://127.0.0.1:$hport/hello" "$hpid" 1 1 >>"$work/rounds"
  measure nginx "http://127.0.0.1:$nport/hello" "$npid" 1 1 >>"$work/rounds"
done
for name in direct gateway haproxy nginx; do serial+=("$(median "$name")"); done
read -r _ _ d_p50 d_p99 _ <<<"${serial[0]}"
for r in "${serial[@]}"; do
  read -r name rps p50 p99 _ <<<"$r"
  a50=$(awk -v a="$(to_ms "$p50")" -v b="$(to_ms "$d_p50")" 'BEGIN { printf "%.3f ms", a-b }')
  a99=$(awk -v a="$(to_ms "$p99")" -v b="$(to_ms "$d_p99")" 'BEGIN { printf "%.3f ms", a-b }')
  echo "| $name | $rps | $p50 | $p99 | $a50 | $a99 |"
done

# Memory per idle WebSocket through the gateway.
rss() { awk '/VmRSS/ {print $2}' "/proc/$gpid/status"; }
before=$(rss)
RUST_LOG=warn "$bin" loadgen --connections "$IDLE_WS" --duration 30s --ramp 2000 --url "ws://127.0.0.1:$gport/" \
  >"$work/loadgen.json" 2>/dev/null &
lpid=$!; pids+=($lpid)
for _ in $(seq 100); do
  open=$(curl -s "http://127.0.0.1:$gmetrics/metrics" | awk '/^rebalancer_gateway_websockets_open/ {s+=$2} END {print s+0}')
  [ "${open%.*}" -ge "$IDLE_WS" ] && break
  sleep 0.2
done
sleep 2
after=$(rss)
echo
echo "idle WebSockets relayed: $open; gateway RSS ${before} KiB -> ${after} KiB: $(( (after - before) * 1024 / IDLE_WS )) bytes per connection"
