#!/usr/bin/env bash
# Trust in network namespaces: N agents that trust one publisher key and
# share one fleet key, an origin behind 100 Mbit/s, and a host without the
# fleet key (the attacker).
#
# 1. A signed task whose command appends a line to a marker file completes
#    on every agent, origin <= 1.05x; the attacker records all multicast
#    traffic of it (control group and data group).
# 2. The same task with one byte changed, one signed by an unknown key, an
#    expired one, an unsigned one and the completed one started again: each
#    refused by every agent with its reason; every marker keeps one line.
# 3. During a second task (encrypted on the LAN) the attacker replays and
#    mutates the recording,
#    sends the plain frames inside it without their seal and sprays forged
#    sealed datagrams: every agent completes with the right bytes, origin
#    <= 1.1x, and the agents' counters show what they dropped.
#
#   scripts/ns-trust.sh [--agents 6] [--size 16M]
#
# Needs root; installs what it needs; always cleans up.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lab.sh
export LAB_PREFIX=sct

agents=6 size=16M
while [ $# -gt 0 ]; do
    case "$1" in
    --agents) agents=$2; shift 2 ;;
    --size) size=$2; shift 2 ;;
    *) echo "usage: $0 [--agents N] [--size 16M]" >&2; exit 2 ;;
    esac
done

lab_session trust
lab_up $((agents + 2)) 1gbit 0.01
lab_origin_link 100mbit
attacker=$((agents + 1))
attacker_addr=$LAB_NET.$((attacker + 1))

"$BIN" key generate --fleet "$WORK/lan" 2>/dev/null
"$BIN" key generate "$WORK/stranger" 2>/dev/null
bytes=$(numfmt --from=iec "$size")
mkdir -p "$WORK/origin"
for p in pkg1 pkg2; do
    head -c "$bytes" /dev/urandom >"$WORK/origin/$p.bin"
    "$BIN" manifest create "$WORK/origin/$p.bin" --url "http://$LAB_NET.1:8080/$p.bin" \
        -o "$WORK/$p.json" --sign "$KEY" 2>/dev/null
done
lab_exec 0 "$BIN" serve "$WORK/origin" --listen "$LAB_NET.1:8080" 2>/dev/null &

manifest_field() { python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); d=json.loads(d["document"]) if "document" in d else d; print(d[sys.argv[2]])' "$1" "$2"; }
# The data group of a content id: 239.193.<byte 0>.<max(byte 1, 1)>.
data_group() { python3 -c 'import sys; c=bytes.fromhex(sys.argv[1]); print(f"239.193.{c[0]}.{max(c[1], 1)}:7400")' "$1"; }
served() { lab_exec 0 curl -s "http://$LAB_NET.1:8080/stats" | python3 -c 'import json,sys; print(json.load(sys.stdin)["bytes_served"])'; }
markers() { local i n=0; for ((i = 1; i <= agents; i++)); do [ "$(wc -l <"$WORK/cache$i/marker" 2>/dev/null || echo 0)" = 1 ] && n=$((n + 1)); done; echo "$n"; }

targets=()
for ((i = 1; i <= agents; i++)); do
    lab_exec "$i" "$BIN" agent --iface eth0 --cache "$WORK/cache$i" --api "$LAB_NET.$((i + 1)):7480" \
        --token "$TOKEN" --trust "$PUB" --fleet-key "$WORK/lan.fleet" --rate 100M >"$WORK/agent$i.log" 2>&1 &
    targets+=(--agent "http://$LAB_NET.$((i + 1)):7480")
done
sleep 1.5

# 1. The signed task, recorded by the attacker.
content1=$(manifest_field "$WORK/pkg1.json" content_id)
ip netns exec "${LAB_PREFIX}-h$attacker" python3 scripts/lan-attacker.py record --iface-addr "$attacker_addr" \
    --out "$WORK/recording" 239.192.0.2:7479 "$(data_group "$content1")" >"$WORK/record.out" &
recorder=$!
sleep 0.5
# The command runs with the package's path in <cache>/objects as $1.
run='echo ran >> "$(dirname "$(dirname "$1")")/marker"'
"$BIN" task sign --manifest "$WORK/pkg1.json" --sign "$KEY" --run "$run" --delay 2s -o "$WORK/task1.json" >/dev/null 2>&1
before=$(served)
if ! lab_exec 0 "$BIN" task start --task "$WORK/task1.json" "${targets[@]}" --token "$TOKEN" \
    --wait --timeout 180s >"$WORK/task1.out" 2>"$WORK/task1.err"; then
    echo "FAIL: the signed task did not complete everywhere"; cat "$WORK/task1.out" "$WORK/task1.err"; exit 1
fi
kill -TERM "$recorder"; wait "$recorder" 2>/dev/null || true
grep -q "recorded [1-9]" "$WORK/record.out" || { echo "FAIL: the attacker recorded nothing"; exit 1; }
used=$(( $(served) - before ))
[ "$(markers)" = "$agents" ] || { echo "FAIL: $(markers) of $agents markers hold one line"; exit 1; }
python3 -c "import sys; sys.exit(0 if $used <= 1.05 * $bytes else 1)" ||
    { echo "FAIL: task 1: origin sent $used for $bytes"; exit 1; }
echo "ok: signed task ran once on each of $agents agents; origin $used for $bytes; attacker $(cat "$WORK/record.out")"

# 2. Orders that must be refused, each by every agent, with its reason.
refused() { # what, reason, command...
    local what=$1 reason=$2 n
    shift 2
    if lab_exec 0 "$@" "${targets[@]}" --token "$TOKEN" >/dev/null 2>"$WORK/refused.err"; then
        echo "FAIL: $what was accepted"; exit 1
    fi
    n=$(grep -c "refused (4[0-9][0-9]): .*$reason" "$WORK/refused.err" || true)
    [ "$n" = "$agents" ] || { echo "FAIL: $what: $n of $agents agents refused it with \"$reason\""; cat "$WORK/refused.err"; exit 1; }
    echo "ok: $what: refused by all $agents agents ($reason)"
}
python3 - "$WORK/task1.json" "$WORK/tampered.json" <<'PY'
import json, sys
b = json.load(open(sys.argv[1]))
doc = b["task"]["document"]
i = doc.index('"delay_ms": ') + len('"delay_ms": ')
b["task"]["document"] = doc[:i] + ("1" if doc[i] != "1" else "2") + doc[i + 1:]
json.dump(b, open(sys.argv[2], "w"))
PY
refused "one byte changed" "bad signature" "$BIN" task start --task "$WORK/tampered.json"
"$BIN" task sign --manifest "$WORK/pkg1.json" --sign "$WORK/stranger.key" --run "$run" -o "$WORK/stranger.json" >/dev/null 2>&1
refused "signed by an unknown key" "does not trust" "$BIN" task start --task "$WORK/stranger.json"
"$BIN" task sign --manifest "$WORK/pkg1.json" --sign "$KEY" --run "$run" --expires 1s -o "$WORK/expired.json" >/dev/null 2>&1
sleep 2
refused "expired" "expired" "$BIN" task start --task "$WORK/expired.json"
refused "unsigned" "unsigned" "$BIN" task start --manifest "$WORK/pkg1.json" --run "$run"
refused "the completed task again" "accepted before" "$BIN" task start --task "$WORK/task1.json"
[ "$(markers)" = "$agents" ] || { echo "FAIL: a refused order ran: $(markers) of $agents markers hold one line"; exit 1; }
echo "ok: every marker still holds one line"

# 3. A second task under attack.
content2=$(manifest_field "$WORK/pkg2.json" content_id)
ip netns exec "${LAB_PREFIX}-h$attacker" python3 scripts/lan-attacker.py attack --iface-addr "$attacker_addr" --in "$WORK/recording" \
    --seconds 25 239.192.0.2:7479 "$(data_group "$content1")" "$(data_group "$content2")" >"$WORK/attack.out" &
attack=$!
sleep 1
before=$(served)
if ! lab_exec 0 "$BIN" task start --manifest "$WORK/pkg2.json" --sign "$KEY" --cache-only --encrypt --delay 2s \
    "${targets[@]}" --token "$TOKEN" --wait --timeout 180s >"$WORK/task2.out" 2>"$WORK/task2.err"; then
    echo "FAIL: task 2 under attack did not complete everywhere"; cat "$WORK/task2.out" "$WORK/task2.err"
    tail -5 "$WORK"/agent*.log; exit 1
fi
used=$(( $(served) - before ))
wait "$attack" || true
for ((i = 1; i <= agents; i++)); do
    cmp -s "$WORK/origin/pkg2.bin" "$WORK/cache$i/objects/$content2" ||
        { echo "FAIL: agent $i's cache does not hold package 2"; exit 1; }
done
python3 -c "import sys; sys.exit(0 if $used <= 1.1 * $bytes else 1)" ||
    { echo "FAIL: task 2 under attack: origin sent $used for $bytes"; exit 1; }
totals=$(for ((i = 1; i <= agents; i++)); do
    lab_exec 0 curl -s -H "Authorization: Bearer $TOKEN" "http://$LAB_NET.$((i + 1)):7480/v1/status"
    echo
done | python3 -c '
import json, sys
t = {}
for line in sys.stdin:
    if line.strip():
        for k, v in json.loads(line)["lan"]["datagrams"].items():
            t[k] = t.get(k, 0) + v
print(" ".join(f"{k} {v}" for k, v in sorted(t.items())))
')
echo "ok: task 2, encrypted, under attack ($(cat "$WORK/attack.out")): all $agents agents verified it; origin $used for $bytes ($(python3 -c "print(round($used / $bytes, 3))")x)"
echo "    agents' datagram counters, summed: $totals"
for k in bad_tag replayed unsealed; do
    echo "$totals" | grep -Eq "$k [1-9]" || { echo "FAIL: no datagram was dropped as $k"; exit 1; }
done
