#!/usr/bin/env bash
# One subnet of agents in network namespaces: the origin (`somcast serve`)
# on host 0 behind a 100 Mbit/s link, N agents on hosts 1..N with 1% loss on
# the UDP they receive. `somcast task start ... --delay 3s --wait` must exit
# 0, every agent's cache must hold the verified package, and the origin must
# have sent at most 1.05x its size.
#
#   scripts/ns-fleet.sh [--agents 12] [--size 64M] [--loss 0.01]
#
# Needs root; installs what it needs; always cleans up.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lab.sh
export LAB_PREFIX=scf

agents=12 size=64M loss=0.01
while [ $# -gt 0 ]; do
    case "$1" in
    --agents) agents=$2; shift 2 ;;
    --size) size=$2; shift 2 ;;
    --loss) loss=$2; shift 2 ;;
    *) echo "usage: $0 [--agents N] [--size 64M] [--loss 0.01]" >&2; exit 2 ;;
    esac
done

lab_session fleet

lab_up $((agents + 1)) 1gbit "$loss"
lab_origin_link 100mbit

mkdir -p "$WORK/origin"
bytes=$(numfmt --from=iec "$size")
head -c "$bytes" /dev/urandom >"$WORK/origin/pkg.bin"
lab_exec 0 "$BIN" serve "$WORK/origin" --listen "$LAB_NET.1:8080" 2>"$WORK/serve.log" &
"$BIN" manifest create "$WORK/origin/pkg.bin" --url "http://$LAB_NET.1:8080/pkg.bin" -o "$WORK/pkg.json" --sign "$KEY" 2>/dev/null
content=$(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); d=json.loads(d["document"]) if "document" in d else d; print(d["content_id"])' "$WORK/pkg.json")

targets=()
for ((i = 1; i <= agents; i++)); do
    lab_exec "$i" "$BIN" agent --iface eth0 --cache "$WORK/cache$i" --api "$LAB_NET.$((i + 1)):7480" \
        --token "$TOKEN" --trust "$PUB" --rate 100M >"$WORK/agent$i.log" 2>&1 &
    targets+=(--agent "http://$LAB_NET.$((i + 1)):7480")
done
sleep 1.5

start=$(date +%s.%N)
if ! lab_exec 0 "$BIN" task start "${targets[@]}" --token "$TOKEN" --manifest "$WORK/pkg.json" --sign "$KEY" \
    --delay 3s --wait --timeout 300s >"$WORK/task.out" 2>"$WORK/task.err"; then
    echo "FAIL: task start --wait did not exit 0"; cat "$WORK/task.out" "$WORK/task.err"
    tail -5 "$WORK"/agent*.log; exit 1
fi
end=$(date +%s.%N)
cat "$WORK/task.out"
for ((i = 1; i <= agents; i++)); do
    cmp -s "$WORK/origin/pkg.bin" "$WORK/cache$i/objects/$content" ||
        { echo "FAIL: agent $i's cache does not hold the package"; exit 1; }
done
served=$(lab_exec 0 curl -s "http://$LAB_NET.1:8080/stats" | python3 -c 'import json,sys; print(json.load(sys.stdin)["bytes_served"])')
ratio=$(python3 -c "print(round($served / $bytes, 4))")
python3 -c "import sys; sys.exit(0 if $served <= 1.05 * $bytes else 1)" ||
    { echo "FAIL: the origin sent $served bytes for $bytes ($ratio x)"; exit 1; }
printf 'ok: %d agents, %s package, %s%% loss: all verified in %.1f s; origin sent %s bytes (%sx the size)\n' \
    "$agents" "$size" "$(python3 -c "print($loss * 100)")" "$(echo "$end - $start" | bc)" "$served" "$ratio"
