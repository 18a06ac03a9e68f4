#!/usr/bin/env bash
# Peer repair throughput between two hosts in the namespace lab, against
# plain HTTP of the same bytes between the same hosts.
#
#   scripts/bench-repair.sh [--size 256M] [--rate 1gbit]
#
# Host 0 is the origin; agent A (host 1) stages the package (cache-only);
# then agent B (host 2) gets the same task: nobody multicasts it any more,
# so B takes the role and fetches every block from A over TCP repair. The
# status's peer bytes and repair time give the repair throughput. Then B
# downloads the same file over HTTP from a `somcast serve` on host 1.
# Needs root; cleans up.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lab.sh
export LAB_PREFIX=scr

size=256M rate=1gbit
while [ $# -gt 0 ]; do
    case "$1" in
    --size) size=$2; shift 2 ;;
    --rate) rate=$2; shift 2 ;;
    *) echo "usage: $0 [--size 256M] [--rate 1gbit]" >&2; exit 2 ;;
    esac
done
lab_session bench-repair

lab_up 3 "$rate" 0
mkdir -p "$WORK/origin"
bytes=$(numfmt --from=iec "$size")
head -c "$bytes" /dev/urandom >"$WORK/origin/pkg.bin"
lab_exec 0 "$BIN" serve "$WORK/origin" --listen "$LAB_NET.1:8080" 2>/dev/null &
"$BIN" manifest create "$WORK/origin/pkg.bin" --url "http://$LAB_NET.1:8080/pkg.bin" -o "$WORK/pkg.json" --sign "$KEY" 2>/dev/null
for i in 1 2; do
    lab_exec "$i" "$BIN" agent --iface eth0 --cache "$WORK/cache$i" --api "$LAB_NET.$((i + 1)):7480" \
        --token "$TOKEN" --trust "$PUB" >"$WORK/agent$i.log" 2>&1 &
done
sleep 1.5
lab_exec 0 "$BIN" task start --agent "http://$LAB_NET.2:7480" --token "$TOKEN" --manifest "$WORK/pkg.json" --sign "$KEY" \
    --cache-only --delay 0s --wait >/dev/null 2>&1
sleep 6 # presence carries A's HAVE to B
lab_exec 0 "$BIN" task start --agent "http://$LAB_NET.3:7480" --token "$TOKEN" --manifest "$WORK/pkg.json" --sign "$KEY" \
    --cache-only --delay 0s --wait >"$WORK/b.out" 2>&1 || { cat "$WORK/b.out"; exit 1; }
id=$(head -1 "$WORK/b.out")
status=$(lab_exec 0 curl -s -H "Authorization: Bearer $TOKEN" "http://$LAB_NET.3:7480/v1/tasks/$id") || true
echo "$status" >"$WORK/status.json"
read -r peers secs origin < <(python3 -c 'import json,sys; s=json.loads(sys.argv[1]); print(s["bytes"]["peers"], s["repair_seconds"], s["bytes"]["origin"])' "$status")
[ "${origin:-x}" = 0 ] || { cat "$WORK/status.json"; tail -5 "$WORK/agent2.log"; echo "FAIL: B fetched $origin bytes from the origin"; exit 1; }

mkdir -p "$WORK/a-serve"
cp "$WORK/origin/pkg.bin" "$WORK/a-serve/"
lab_exec 1 "$BIN" serve "$WORK/a-serve" --listen "$LAB_NET.2:8081" 2>/dev/null &
sleep 0.5
t0=$(date +%s.%N)
lab_exec 2 curl -s -o "$WORK/http.bin" "http://$LAB_NET.2:8081/pkg.bin"
t1=$(date +%s.%N)
cmp -s "$WORK/http.bin" "$WORK/origin/pkg.bin"
http_s=$(echo "$t1 - $t0" | bc)
python3 - "$peers" "$secs" "$bytes" "$http_s" "$size" "$rate" <<'PY'
import sys
peers, secs, size, http_s = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
r = peers * 8 / secs / 1e6
h = size * 8 / http_s / 1e6
print(f"{sys.argv[5]} between two hosts at {sys.argv[6]}: peer repair {peers} bytes in {secs:.2f} s = {r:.0f} Mbit/s; "
      f"plain HTTP {size} bytes in {http_s:.2f} s = {h:.0f} Mbit/s; repair/HTTP throughput {r / h:.2f}x")
PY
