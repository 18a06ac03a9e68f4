#!/usr/bin/env bash
# Peer repair throughput in the namespace lab, against plain HTTP of the
# same bytes from one of the same peers.
#
#   scripts/bench-repair.sh [--size 256M] [--rate 1gbit] [--peers 1] [--peer-rate RATE] [--mode background]
#
# Host 0 is the origin; agents on hosts 1..N (the peers) stage the package
# (cache-only), one after another; then agent B (host N+1) gets the same
# task: nobody multicasts it any more, so B takes the role and fetches
# every block from the peers over TCP repair. The status's peer bytes and
# repair time give the repair throughput. Then B downloads the same file
# over HTTP from a `somcast serve` on host 1. Every link runs at RATE both
# ways; with --peer-rate the peers' uplinks run at that instead (peers on
# slower links than B: the case where several peers beat one). Needs root;
# cleans up.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lab.sh
export LAB_PREFIX=scr

size=256M rate=1gbit peers=1 peer_rate= mode=background
while [ $# -gt 0 ]; do
    case "$1" in
    --size) size=$2; shift 2 ;;
    --rate) rate=$2; shift 2 ;;
    --peers) peers=$2; shift 2 ;;
    --peer-rate) peer_rate=$2; shift 2 ;;
    --mode) mode=$2; shift 2 ;;
    *) echo "usage: $0 [--size 256M] [--rate 1gbit] [--peers 1] [--peer-rate RATE] [--mode background|foreground]" >&2; exit 2 ;;
    esac
done
lab_session bench-repair

b=$((peers + 1))
lab_up $((peers + 2)) "$rate" 0
if [ -n "$peer_rate" ]; then
    for ((i = 1; i <= peers; i++)); do
        ip netns exec "${LAB_PREFIX}-h$i" tc qdisc replace dev eth0 root tbf rate "$peer_rate" burst 64kb latency 50ms
    done
fi
mkdir -p "$WORK/origin"
bytes=$(numfmt --from=iec "$size")
head -c "$bytes" /dev/urandom >"$WORK/origin/pkg.bin"
lab_exec 0 "$BIN" serve "$WORK/origin" --listen "$LAB_NET.1:8080" 2>/dev/null &
"$BIN" manifest create "$WORK/origin/pkg.bin" --url "http://$LAB_NET.1:8080/pkg.bin" -o "$WORK/pkg.json" --sign "$KEY" 2>/dev/null
for ((i = 1; i <= b; i++)); do
    lab_exec "$i" "$BIN" agent --iface eth0 --cache "$WORK/cache$i" --api "$LAB_NET.$((i + 1)):7480" \
        --token "$TOKEN" --trust "$PUB" --rate-mode "$mode" >"$WORK/agent$i.log" 2>&1 &
done
sleep 1.5
for ((i = 1; i <= peers; i++)); do
    lab_exec 0 "$BIN" task start --agent "http://$LAB_NET.$((i + 1)):7480" --token "$TOKEN" --manifest "$WORK/pkg.json" \
        --sign "$KEY" --cache-only --delay 0s --wait >/dev/null 2>&1
done
sleep 6 # presence carries the peers' HAVE to B
lab_exec 0 "$BIN" task start --agent "http://$LAB_NET.$((b + 1)):7480" --token "$TOKEN" --manifest "$WORK/pkg.json" --sign "$KEY" \
    --cache-only --delay 0s --wait >"$WORK/b.out" 2>&1 || { cat "$WORK/b.out"; exit 1; }
id=$(head -1 "$WORK/b.out")
status=$(lab_exec 0 curl -s -H "Authorization: Bearer $TOKEN" "http://$LAB_NET.$((b + 1)):7480/v1/tasks/$id") || true
echo "$status" >"$WORK/status.json"
read -r got secs origin sources < <(python3 -c 'import json,sys; s=json.loads(sys.argv[1]); b=s["bytes"]; print(b["peers"], s["repair_seconds"], b["origin"], len(b["by_peer"]))' "$status")
[ "${origin:-x}" = 0 ] || { cat "$WORK/status.json"; tail -5 "$WORK/agent$b.log"; echo "FAIL: B fetched $origin bytes from the origin"; exit 1; }
[ "$sources" = "$peers" ] || { cat "$WORK/status.json"; echo "FAIL: B fetched from $sources peers, not $peers"; exit 1; }

mkdir -p "$WORK/a-serve"
cp "$WORK/origin/pkg.bin" "$WORK/a-serve/"
lab_exec 1 "$BIN" serve "$WORK/a-serve" --listen "$LAB_NET.2:8081" 2>/dev/null &
sleep 0.5
t0=$(date +%s.%N)
lab_exec "$b" curl -s -o "$WORK/http.bin" "http://$LAB_NET.2:8081/pkg.bin"
t1=$(date +%s.%N)
cmp -s "$WORK/http.bin" "$WORK/origin/pkg.bin"
http_s=$(echo "$t1 - $t0" | bc)
python3 - "$got" "$secs" "$bytes" "$http_s" "$size" "$rate" "$peers" "${peer_rate:-$rate}" "$mode" <<'PY'
import sys
got, secs, size, http_s = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
r = got * 8 / secs / 1e6
h = size * 8 / http_s / 1e6
print(f"{sys.argv[5]}, links {sys.argv[6]}, {sys.argv[7]} peer(s) uploading at {sys.argv[8]}, {sys.argv[9]} mode: "
      f"peer repair {got} bytes in {secs:.2f} s = {r:.0f} Mbit/s; plain HTTP from one peer {size} bytes "
      f"in {http_s:.2f} s = {h:.0f} Mbit/s; repair/HTTP throughput {r / h:.2f}x")
PY
