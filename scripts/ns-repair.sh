#!/usr/bin/env bash
# Peer repair and failover across network namespaces, one subnet: the
# origin on host 0 behind a 100 Mbit/s link, agents on hosts 1..N with 1%
# UDP loss.
#   1. Late joiner: N-1 agents get a task; the last agent gets it once the
#      others hold half the package. Everyone completes; the origin sent at
#      most 1.05x the size.
#   2. Failover: a second package to all N agents; the representative is
#      SIGKILLed at half of its pass. Every other agent completes; the
#      origin sent at most 2x the size.
#   3. No multicast data: the switch drops every data group (239.193/16)
#      and passes the control group, as a switch pruning unregistered
#      groups or Wi-Fi isolation would. A third package to the survivors:
#      all but the one that fetches complete from peers alone; the origin
#      sent at most 1.05x the size, no agent received a multicast byte.
#
#   scripts/ns-repair.sh [--agents 6] [--size 48M]
#
# Needs root; installs what it needs; always cleans up.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lab.sh
export LAB_PREFIX=scp

agents=6 size=48M
while [ $# -gt 0 ]; do
    case "$1" in
    --agents) agents=$2; shift 2 ;;
    --size) size=$2; shift 2 ;;
    *) echo "usage: $0 [--agents N] [--size 48M]" >&2; exit 2 ;;
    esac
done
lab_session repair

lab_up $((agents + 1)) 1gbit 0.01
lab_origin_link 100mbit
bytes=$(numfmt --from=iec "$size")
mkdir -p "$WORK/origin"
head -c "$bytes" /dev/urandom >"$WORK/origin/late.bin"
head -c "$bytes" /dev/urandom >"$WORK/origin/failover.bin"
head -c "$bytes" /dev/urandom >"$WORK/origin/deaf.bin"
lab_exec 0 "$BIN" serve "$WORK/origin" --listen "$LAB_NET.1:8080" 2>/dev/null &
for f in late failover deaf; do
    "$BIN" manifest create "$WORK/origin/$f.bin" --url "http://$LAB_NET.1:8080/$f.bin" -o "$WORK/$f.json" --sign "$KEY" 2>/dev/null
done
for ((i = 1; i <= agents; i++)); do
    lab_exec "$i" "$BIN" agent --iface eth0 --cache "$WORK/cache$i" --api "$LAB_NET.$((i + 1)):7480" \
        --token "$TOKEN" --trust "$PUB" --rate 100M >"$WORK/agent$i.log" 2>&1 &
done
sleep 1.5

api() { lab_exec 0 curl -s -H "Authorization: Bearer $TOKEN" "http://$LAB_NET.$(($1 + 1)):7480$2"; }
field() { python3 -c 'import json,sys; s=json.loads(sys.argv[1]); print(eval(sys.argv[2], {"s": s}))' "$1" "$2"; }
served() { lab_exec 0 curl -s "http://$LAB_NET.1:8080/stats" | python3 -c 'import json,sys; print(json.load(sys.stdin)["bytes_served"])'; }
# Waits until agent $1's task $2 satisfies the python expression $3 on s.
wait_until() {
    local t0=$SECONDS s
    while true; do
        s=$(api "$1" "/v1/tasks/$2" || true)
        [ -n "$s" ] && [ "$(field "$s" "$3" 2>/dev/null || echo False)" = True ] && return 0
        [ $((SECONDS - t0)) -gt 180 ] && { echo "FAIL: agent $1 task $2: $s"; exit 1; }
        sleep 0.3
    done
}
# Prints which of the agents given after the task id is that task's
# representative, once one says so (elections go by random node ids).
representative() {
    local id=$1 t0=$SECONDS i s
    shift
    while [ $((SECONDS - t0)) -le 180 ]; do
        for i in "$@"; do
            s=$(api "$i" "/v1/tasks/$id" || true)
            [ -n "$s" ] && [ "$(field "$s" 's["role"]' 2>/dev/null)" = representative ] && { echo "$i"; return 0; }
        done
        sleep 0.3
    done
    echo "FAIL: no representative for task $id among agents $*" >&2
    return 1
}
start_task() { # manifest, agents...
    local m=$1 i targets=()
    shift
    for i in "$@"; do targets+=(--agent "http://$LAB_NET.$((i + 1)):7480"); done
    lab_exec 0 "$BIN" task start "${targets[@]}" --token "$TOKEN" --manifest "$m" --sign "$KEY" --delay 2s >"$WORK/id.out"
    head -1 "$WORK/id.out"
}
all_but_last=$(seq 1 $((agents - 1)))

# 1. Late joiner.
before=$(served)
id=$(start_task "$WORK/late.json" $all_but_last)
rep=$(representative "$id" $all_but_last) || exit 1
wait_until "$((rep == 1 ? 2 : 1))" "$id" 's["blocks_done"] * 2 >= s["block_count"]'
lab_exec 0 "$BIN" task start --agent "http://$LAB_NET.$((agents + 1)):7480" --token "$TOKEN" \
    --manifest "$WORK/late.json" --sign "$KEY" --delay 2s >/dev/null
# The console made a new id for the late agent; find it.
late_id=$(api "$agents" /v1/tasks | python3 -c 'import json,sys; print(json.load(sys.stdin)["tasks"][0]["id"])')
for i in $all_but_last; do wait_until "$i" "$id" 's["state"] == "done"'; done
wait_until "$agents" "$late_id" 's["state"] == "done"'
late=$(api "$agents" "/v1/tasks/$late_id")
used=$(( $(served) - before ))
python3 -c "import sys; sys.exit(0 if $used <= 1.05 * $bytes else 1)" ||
    { echo "FAIL: late joiner: origin sent $used for $bytes"; exit 1; }
echo "ok: late joiner: bytes $(field "$late" 's["bytes"]'); origin sent $used for $bytes ($(python3 -c "print(round($used / $bytes, 3))")x)"

# 2. Failover.
before=$(served)
id=$(start_task "$WORK/failover.json" $(seq 1 "$agents"))
rep=$(representative "$id" $(seq 1 "$agents")) || exit 1
other=$((rep == 1 ? 2 : 1))
wait_until "$other" "$id" 's["blocks_done"] * 2 >= s["block_count"]'
ip netns pids "${LAB_PREFIX}-h$rep" | xargs -r kill -9
echo "killed the representative (agent $rep) at half of its pass"
for ((i = 1; i <= agents; i++)); do
    [ "$i" = "$rep" ] && continue
    wait_until "$i" "$id" 's["state"] == "done"'
done
used=$(( $(served) - before ))
python3 -c "import sys; sys.exit(0 if $used <= 2 * $bytes else 1)" ||
    { echo "FAIL: failover: origin sent $used for $bytes"; exit 1; }
echo "ok: failover: $((agents - 1)) agents completed; origin sent $used for $bytes ($(python3 -c "print(round($used / $bytes, 3))")x)"

# 3. No multicast data on the subnet.
ip netns exec "${LAB_PREFIX}-sw" nft -f - <<NFT
table bridge nodata {
    chain forward {
        type filter hook forward priority 0; policy accept;
        ip daddr 239.193.0.0/16 drop
    }
}
NFT
survivors=()
for ((i = 1; i <= agents; i++)); do [ "$i" = "$rep" ] || survivors+=("$i"); done
before=$(served)
id=$(start_task "$WORK/deaf.json" "${survivors[@]}")
for i in "${survivors[@]}"; do wait_until "$i" "$id" 's["state"] == "done"'; done
used=$(( $(served) - before ))
unicast=0 from_origin=0
for i in "${survivors[@]}"; do
    s=$(api "$i" "/v1/tasks/$id")
    [ "$(field "$s" 's["bytes"]["multicast"]')" = 0 ] || { echo "FAIL: agent $i heard multicast through the filter: $s"; exit 1; }
    [ "$(field "$s" '"over unicast" in str(s["history"])')" = True ] && unicast=$((unicast + 1))
    if [ "$(field "$s" 's["bytes"]["origin"] > 0')" = True ]; then
        from_origin=$((from_origin + 1))
    else
        [ "$(field "$s" "s[\"bytes\"][\"peers\"] >= $bytes")" = True ] || { echo "FAIL: agent $i: $s"; exit 1; }
    fi
done
# The control group dropped too: `somcast scan --probe` from one survivor
# finds the others by unicast only (its neighbour cache knows them from the
# repair) and names the likely cause.
ip netns exec "${LAB_PREFIX}-sw" nft add rule bridge nodata forward ip daddr 239.192.0.0/16 drop
scan=$(lab_exec "${survivors[0]}" "$BIN" scan --probe --json --iface eth0 --wait 2s || true)
ip netns exec "${LAB_PREFIX}-sw" nft delete table bridge nodata
read -r only hint < <(python3 -c '
import json, sys
v = json.loads(sys.argv[1])
only = sum(a["reached_by"] == "unicast only" for a in v["probe"]["agents"])
print(only, any("IGMP snooping" in x for x in v["advice"]))' "$scan")
[ "$only" -ge 1 ] && [ "$hint" = True ] || { echo "FAIL: scan without multicast: $scan"; exit 1; }
echo "ok: scan without multicast: $only agent(s) reached by unicast only, the cause named"
python3 -c "import sys; sys.exit(0 if $used <= 1.05 * $bytes else 1)" ||
    { echo "FAIL: no multicast data: origin sent $used for $bytes"; exit 1; }
[ "$from_origin" -le 1 ] || { echo "FAIL: no multicast data: $from_origin agents fetched from the origin"; exit 1; }
echo "ok: no multicast data: ${#survivors[@]} agents completed, all but $from_origin from peers alone ($unicast switched to unicast on their own); origin sent $used for $bytes ($(python3 -c "print(round($used / $bytes, 3))")x)"
