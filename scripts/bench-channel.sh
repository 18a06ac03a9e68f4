#!/usr/bin/env bash
# The task channel's load on its web server: N simulated agents
# (scripts/channel-pollers.py) poll an nginx-served channel as agents do
# (one conditional GET per period, 10% jitter); halfway through, one
# `somcast task publish` adds a task. Reports the server's requests/s and
# bytes/s, the share answered 304, and the seconds until 50%, 99% and 100%
# of the agents saw the new task. docs/SCALE.md projects the figures.
#
#   scripts/bench-channel.sh [--agents 1000] [--poll 5] [--seconds 40]
#
# Loopback only; installs nginx if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lab.sh
agents=1000 poll=5 seconds=40
while [ $# -gt 0 ]; do
    case "$1" in
    --agents) agents=$2; shift 2 ;;
    --poll) poll=$2; shift 2 ;;
    --seconds) seconds=$2; shift 2 ;;
    *) echo "usage: $0 [--agents N] [--poll S] [--seconds S]" >&2; exit 2 ;;
    esac
done
command -v nginx >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx-light >/dev/null
cargo build --release -q
BIN=$PWD/target/release/somcast
WORK=$(mktemp -d)
chmod 0755 "$WORK"
nginx_pid=
trap '[ -n "$nginx_pid" ] && kill "$nginx_pid" 2>/dev/null; rm -rf "$WORK"' EXIT
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
mkdir -p "$WORK/www"
lab_nginx_conf "$WORK/nginx.conf" "$WORK/nginx" "127.0.0.1:$port" "$WORK/www"
nginx -p "$WORK/nginx" -c "$WORK/nginx.conf" &
nginx_pid=$!
"$BIN" key generate "$WORK/publisher" 2>/dev/null
head -c 1048576 /dev/urandom >"$WORK/www/pkg.bin"
"$BIN" manifest create "$WORK/www/pkg.bin" --url "http://127.0.0.1:$port/pkg.bin" -o "$WORK/pkg.json" \
    --sign "$WORK/publisher.key" 2>/dev/null
publish="$BIN task publish --channel $WORK/www/chan --manifest $WORK/pkg.json --sign $WORK/publisher.key --cache-only"
$publish >/dev/null 2>&1   # the channel as agents find it before the new task
ulimit -n 65536 2>/dev/null || true
python3 scripts/channel-pollers.py --url "http://127.0.0.1:$port/chan/channel.json" --agents "$agents" \
    --poll "$poll" --seconds "$seconds" --publish-after "$(python3 -c "print($seconds / 2)")" \
    --publish-cmd "$publish"
