#!/usr/bin/env bash
# The gateway against HAProxy (balance leastconn, http-reuse) and nginx (least_conn,
# upstream keep-alive), all in front of the same three demo servers on loopback:
# - plain HTTP keep-alive requests/s, driven by wrk with the same connections and threads,
#   and one request at a time (the latency a proxy adds);
# - new WebSocket sessions/s (connect, upgrade, first message, close), driven by
#   benches/wsbench.c, a small epoll client built here with cc;
# - memory per idle relayed WebSocket (WS_HELD held at once), and RSS a minute after they
#   close.
#
#   bash benches/proxy.sh        (installs haproxy, nginx-light and wrk from Debian if missing)
#   SKIP_HTTP=1 SKIP_MEMORY=1 ROUNDS=3 bash benches/proxy.sh   (WebSocket sessions only)
#
# Prints a Markdown table for BENCHMARKS.md. Everything runs on 127.0.0.1 and stops at the end.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
DURATION=${DURATION:-10s}
CONNS=${CONNS:-64}
THREADS=${THREADS:-2}
ROUNDS=${ROUNDS:-3}
WS_CONC=${WS_CONC:-64}
WS_SECONDS=${WS_SECONDS:-5}
WS_HELD=${WS_HELD:-5000}
AFTER_CLOSE=${AFTER_CLOSE:-60}
ulimit -n "$(ulimit -Hn)"

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
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; if [ -n "${KEEP:-}" ]; then echo "logs kept in $work" >&2; else rm -rf "$work"; fi; }
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
  [ "$i" = 1 ] && bpid=$!
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
RUST_LOG=warn "$bin" gateway --threads "${GW_THREADS:-0}" --pipeline "$work/pipeline.toml" >"$work/gateway.log" 2>&1 &
gpid=$!; pids+=($gpid)

hport=$(free)
{
  echo "global"; echo "  maxconn 9000"
  echo "defaults"; echo "  mode http"; echo "  timeout connect 2s"; echo "  timeout client 60s"; echo "  timeout server 60s"
  echo "  timeout tunnel 1h"
  echo "frontend f"; echo "  bind 127.0.0.1:$hport"; echo "  default_backend b"
  echo "backend b"; echo "  balance leastconn"; echo "  http-reuse safe"
  for i in 0 1 2; do echo "  server b$i 127.0.0.1:${backends[$i]}"; done
} >"$work/haproxy.cfg"
haproxy -f "$work/haproxy.cfg" -db >"$work/haproxy.log" 2>&1 &
hpid=$!; pids+=($hpid)

nport=$(free)
mkdir -p "$work/nginx"
{
  echo "worker_processes 2; pid $work/nginx/pid; error_log $work/nginx/error.log;"
  echo "events { worker_connections 16384; }"
  echo "http { access_log off; client_body_temp_path $work/nginx; proxy_temp_path $work/nginx;"
  echo "  map \$http_upgrade \$connection_upgrade { default upgrade; '' ''; }"
  echo "  fastcgi_temp_path $work/nginx; uwsgi_temp_path $work/nginx; scgi_temp_path $work/nginx;"
  echo "  upstream b { least_conn; keepalive 64;"
  for i in 0 1 2; do echo "    server 127.0.0.1:${backends[$i]};"; done
  echo "  }"
  echo "  server { listen 127.0.0.1:$nport; location / { proxy_pass http://b; proxy_http_version 1.1; proxy_set_header Upgrade \$http_upgrade; proxy_set_header Connection \$connection_upgrade; proxy_read_timeout 1h; } }"
  echo "}"
} >"$work/nginx.conf"
nginx -c "$work/nginx.conf" -g 'daemon off;' >"$work/nginx.out" 2>&1 &
npid=$!; pids+=($npid)

:
for _ in $(seq 100); do
  curl -sf "http://127.0.0.1:$gport/hello" >/dev/null 2>&1 && curl -sf "http://127.0.0.1:$hport/hello" >/dev/null 2>&1 \
    && curl -sf "http://127.0.0.1:$nport/hello" >/dev/null 2>&1 && break
  sleep 0.2
done

# CPU time (user + system, in clock ticks) of a process and its children (nginx's workers).
ticks() {
  local total=0 p
  for p in "$1" $(pgrep -P "$1" || true); do
    [ -r "/proc/$p/stat" ] || { [ "$p" = "$1" ] && { echo "process $1 is gone" >&2; exit 1; }; continue; }
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
if [ -z "${SKIP_HTTP:-}" ]; then
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

fi

# New WebSocket sessions per second, the targets taking turns, median round.
cc -O2 -o "$work/wsbench" benches/wsbench.c
wsmeasure() { # name port pid -> "name sessions/s p50_us p99_us cpu_us_per_session errors"
  local before after out
  before=$(ticks "$3")
  out=$("$work/wsbench" sessions 127.0.0.1 "$2" /ws "$WS_CONC" "$WS_SECONDS")
  after=$(ticks "$3")
  awk -v name="$1" -v t=$((after - before)) -v hz="$(getconf CLK_TCK)" \
    '{ printf "%s %s %s %s %.1f %s\n", name, $4, $6, $8, ($2 ? t / hz * 1e6 / $2 : 0), $10 }' <<<"$out"
}
: >"$work/rounds"
for _ in $(seq "$ROUNDS"); do
  wsmeasure direct "${backends[0]}" "$bpid" >>"$work/rounds"
  wsmeasure gateway "$gport" "$gpid" >>"$work/rounds"
  wsmeasure haproxy "$hport" "$hpid" >>"$work/rounds"
  wsmeasure nginx "$nport" "$npid" >>"$work/rounds"
done
echo
echo "wsbench sessions, $WS_CONC at a time, ${WS_SECONDS}s a round: connect, upgrade, the server's first message, close; median of $ROUNDS rounds"
echo
echo "every round (sessions/s):"
for name in direct gateway haproxy nginx; do
  echo "- $name: $(grep "^$name " "$work/rounds" | awk '{ printf "%s%s", sep, $2; sep = ", " }')"
done
echo
echo "| target | sessions/s | vs HAProxy | first message p50 | p99 | CPU per session (proxy or server) | errors |"
echo "|---|---|---|---|---|---|---|"
h_ws=$(median haproxy | awk '{print $2}')
for name in direct gateway haproxy nginx; do
  read -r _ rate p50 p99 cpu errs <<<"$(median "$name")"
  ratio=$(awk -v a="$rate" -v b="$h_ws" 'BEGIN { printf "%.2f", a/b }')
  echo "| $name | $rate | $ratio | $(awk -v v="$p50" 'BEGIN { printf "%.2f ms", v/1000 }') | $(awk -v v="$p99" 'BEGIN { printf "%.2f ms", v/1000 }') | $cpu µs | $errs |"
done

[ -n "${SKIP_MEMORY:-}" ] && exit 0
# Memory per idle relayed WebSocket: WS_HELD held through each proxy at once, then closed;
# RSS (nginx: its master and workers) before, while held, and AFTER_CLOSE seconds after.
rss() {
  local total=0 p
  for p in "$1" $(pgrep -P "$1" || true); do
    total=$((total + $(awk '/VmRSS/ {print $2}' "/proc/$p/status")))
  done
  echo "$total"
}
echo
echo "$WS_HELD idle WebSockets held through each proxy at once, then closed"
echo
echo "| target | RSS before | while held | per session | ${AFTER_CLOSE} s after they close |"
echo "|---|---|---|---|---|"
for t in "gateway $gport $gpid" "haproxy $hport $hpid" "nginx $nport $npid"; do
  read -r name port pid <<<"$t"
  before=$(rss "$pid")
  fifo="$work/hold-$name"; mkfifo "$fifo"
  "$work/wsbench" hold 127.0.0.1 "$port" /ws "$WS_HELD" <"$fifo" >"$work/held-$name" &
  holder=$!
  exec 9>"$fifo"
  for _ in $(seq 600); do grep -q '^held' "$work/held-$name" 2>/dev/null && break; sleep 0.1; done
  sleep 2
  held=$(rss "$pid")
  count=$(awk '/^held/ {print $2}' "$work/held-$name")
  echo >&9; exec 9>&-
  wait "$holder" || true
  sleep "$AFTER_CLOSE"
  after=$(rss "$pid")
  per=$(awk -v a="$held" -v b="$before" -v n="$count" 'BEGIN { printf "%.1f KB", (a - b) * 1.024 / n }')
  echo "| $name ($count held) | $(awk -v v="$before" 'BEGIN { printf "%.1f MiB", v/1024 }') | $(awk -v v="$held" 'BEGIN { printf "%.1f MiB", v/1024 }') | $per | $(awk -v v="$after" 'BEGIN { printf "%.1f MiB", v/1024 }') |"
done
