#!/usr/bin/env bash
# Make sure PostgreSQL and NATS (with JetStream) run on 127.0.0.1, installing them from
# Debian's packages when missing. For development machines and CI; production runs its
# own servers (see README "Durability").
set -euo pipefail

log() { echo "services: $*" >&2; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
command -v pg_ctlcluster >/dev/null 2>&1 || missing+=(postgresql)
[ -x /usr/sbin/nats-server ] || command -v nats-server >/dev/null 2>&1 || missing+=(nats-server)
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# PostgreSQL
if ! port_open 5432; then
  ver=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n 1)
  if [ -z "$ver" ]; then
    log "no PostgreSQL cluster; creating one"
    ver=$(ls /usr/lib/postgresql | sort -V | tail -n 1)
    as_root pg_createcluster "$ver" main >/dev/null
  fi
  log "starting PostgreSQL $ver"
  as_root pg_ctlcluster --skip-systemctl-redirect "$ver" main start
fi
for _ in $(seq 1 50); do port_open 5432 && break; sleep 0.2; done
# local development uses trust auth on loopback (never do this on a shared host)
if ! psql -h 127.0.0.1 -U postgres -d postgres -Atqc 'select 1' >/dev/null 2>&1; then
  ver=$(ls /etc/postgresql | sort -V | tail -n 1)
  hba=/etc/postgresql/$ver/main/pg_hba.conf
  log "enabling trust auth on loopback in $hba"
  as_root sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$hba"
  as_root pg_ctlcluster --skip-systemctl-redirect "$ver" main reload
  sleep 1
fi
psql -h 127.0.0.1 -U postgres -d postgres -Atqc 'select 1' >/dev/null

# NATS with JetStream
if ! port_open 4222; then
  log "starting nats-server with JetStream"
  as_root mkdir -p /var/lib/nats-server
  nats_bin=$(command -v nats-server || echo /usr/sbin/nats-server)
  as_root start-stop-daemon --start --oknodo --background --exec "$nats_bin" -- \
    -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server
fi
for _ in $(seq 1 50); do port_open 4222 && break; sleep 0.2; done
port_open 4222 || { log "NATS did not start"; exit 1; }
log "PostgreSQL and NATS are up"
