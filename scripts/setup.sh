#!/usr/bin/env bash
# Installs what rebalancer's tests and demo need, idempotently:
#   redis-server, openssl, prometheus and docker.io (Debian), consul (Debian bullseye's 1.8.7 package),
#   and starts a Docker engine (no bridge, no iptables) when none answers.
# Consul is looked for on PATH, then unpacked from ../shared/vendor/consul_*.deb, then
# downloaded from the bullseye suite of the machine's own Debian mirror. It is unpacked into
# target/tools/consul/ (no root needed for that part); scripts and tests find it there.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
tools="$root/target/tools"
mkdir -p "$tools"

say() { printf 'setup: %s\n' "$*"; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

apt_updated=""
apt_install() {
  if [ -z "$apt_updated" ]; then as_root apt-get update -qq; apt_updated=1; fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# --- redis-server -------------------------------------------------------------------
if command -v redis-server >/dev/null 2>&1; then
  say "redis-server: $(redis-server --version | cut -d' ' -f3)"
else
  say "installing redis-server (Debian)"
  apt_install redis-server redis-tools
  # The package starts a system instance on 6379; the tests and the demo start their own.
  as_root systemctl disable --now redis-server >/dev/null 2>&1 || true
fi

# --- openssl (the TLS tests make their certificates with it) ----------------------------
if command -v openssl >/dev/null 2>&1; then
  say "openssl: $(openssl version | cut -d' ' -f2)"
else
  say "installing openssl (Debian), for the TLS tests' certificates"
  apt_install openssl
fi

# --- fonts-dejavu-core (the simulator's charts) -----------------------------------------
if [ -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ]; then
  say "fonts-dejavu-core: present"
else
  say "installing fonts-dejavu-core (Debian), for the simulator's charts"
  apt_install fonts-dejavu-core
fi

# --- prometheus -----------------------------------------------------------------------
if command -v prometheus >/dev/null 2>&1; then
  say "prometheus: $(prometheus --version 2>&1 | sed -n 1p | cut -d' ' -f3)"
else
  say "installing prometheus (Debian)"
  apt_install prometheus
  as_root systemctl disable --now prometheus >/dev/null 2>&1 || true
fi

# --- docker engine ----------------------------------------------------------------------
docker_ok() { docker version --format '{{.Server.Version}}' >/dev/null 2>&1; }
if ! command -v dockerd >/dev/null 2>&1; then
  say "installing docker.io (Debian)"
  apt_install docker.io
fi
if docker_ok; then
  say "docker engine: $(docker version --format '{{.Server.Version}}')"
else
  say "starting dockerd (--bridge=none --iptables=false --ip6tables=false); log in $tools/dockerd.log"
  as_root sh -c "nohup dockerd --bridge=none --iptables=false --ip6tables=false >'$tools/dockerd.log' 2>&1 &"
  for _ in $(seq 100); do docker_ok && break; sleep 0.2; done
  docker_ok || { say "dockerd did not come up; see $tools/dockerd.log"; exit 1; }
  say "docker engine: $(docker version --format '{{.Server.Version}}')"
fi

# --- consul ---------------------------------------------------------------------------
consul_bin="$tools/consul/usr/bin/consul"
if command -v consul >/dev/null 2>&1; then
  say "consul: on PATH ($(command -v consul))"
  ln -sf "$(command -v consul)" "$tools/consul-bin"
elif [ -x "$consul_bin" ]; then
  say "consul: $consul_bin"
  ln -sf "$consul_bin" "$tools/consul-bin"
else
  deb=$(ls "$root"/../shared/vendor/consul_*.deb 2>/dev/null | sed -n 1p || true)
  if [ -z "$deb" ]; then
    say "consul: downloading Debian bullseye's package from the machine's own mirror"
    mirror=$(grep -rhoE '^(deb|URIs:)\s+\S+' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null \
      | awk '{print $2}' | grep -v security | sed -n 1p)
    [ -z "$mirror" ] && mirror=$(grep -rhoE 'URIs:\s*\S+' /etc/apt/sources.list.d/ | awk '{print $2}' | sed -n 1p)
    lists="$tools/apt-bullseye"
    mkdir -p "$lists/partial"
    echo "deb $mirror bullseye main" > "$lists/sources.list"
    opts=(-o "Dir::Etc::SourceList=$lists/sources.list" -o Dir::Etc::SourceParts=/dev/null
          -o "Dir::State::Lists=$lists" -o Dir::Cache::archives="$lists")
    apt-get "${opts[@]}" update -qq
    (cd "$tools" && apt-get "${opts[@]}" download consul)
    deb=$(ls "$tools"/consul_*.deb | sed -n 1p)
  fi
  say "consul: unpacking $(basename "$deb")"
  rm -rf "$tools/consul" && mkdir -p "$tools/consul"
  dpkg -x "$deb" "$tools/consul"
  ln -sf "$consul_bin" "$tools/consul-bin"
fi
"$tools/consul-bin" version | sed -n 1p | sed 's/^/setup: /'
