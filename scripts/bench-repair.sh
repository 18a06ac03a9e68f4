#!/usr/bin/env bash
# Peer repair throughput in the namespace lab, against plain HTTP of the
# same bytes from one of the same peers.
#
#   scripts/bench-repair.sh [--size 256M] [--rate 1gbit] [--peers 1] [--peer-rate RATE] [--mode background] [--runs 1] [--fleet-key]
#
# Host 0 is the origin; agents on hosts 1..N (the peers) stage the package
# (cache-only), one after another; then agent B (host N+1) gets the same
# task: nobody multicasts it any more, so B takes the role and fetches
# every block from the peers over TCP repair. The status's peer bytes and
# repair time give the repair throughput. Then B downloads the same file
# over HTTP from a `somcast serve` on host 1. With --runs N, both are
# measured N times, alternating, each time by a fresh agent B (empty
# cache; its task cancelled once it holds every block), and the median
# ratio is the result. Every link runs at RATE both
# ways; with --peer-rate the peers' uplinks run at that instead (peers on
# slower links than B: the case where several peers beat one). Needs root;
# cleans up.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lab.sh
export LAB_PREFIX=scr

size=256M rate=1gbit peers=1 peer_rate= mode=background runs=1 fleet=
while [ $# -gt 0 ]; do
    case "$1" in
    --size) size=$2; shift 2 ;;
    --rate) rate=$2; shift 2 ;;
    --peers) peers=$2; shift 2 ;;
    --peer-rate) peer_rate=$2; shift 2 ;;
    --mode) mode=$2; shift 2 ;;
    --runs) runs=$2; shift 2 ;;
    --fleet-key) fleet=1; shift ;;
    *) echo "usage: $0 [--size 256M] [--rate 1gbit] [--peers 1] [--peer-rate RATE] [--mode background|foreground] [--runs N] [--fleet-key]" >&2; exit 2 ;;
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
# With --fleet-key every agent holds one fleet key: repair connections
# open with its handshake and every byte on them is enciphered, as on a
# fleet that seals its LAN traffic.
fleet_args=()
if [ -n "$fleet" ]; then
    "$BIN" key generate --fleet "$WORK/lan" 2>/dev/null
    fleet_args=(--fleet-key "$WORK/lan.fleet")
fi
agent() { # agent I CACHE LOG
    lab_exec "$1" "$BIN" agent --iface eth0 --cache "$2" --api "$LAB_NET.$(($1 + 1)):7480" \
        --token "$TOKEN" --trust "$PUB" --rate-mode "$mode" --presence-interval 1s "${fleet_args[@]}" >"$3" 2>&1 &
}
for ((i = 1; i <= peers; i++)); do
    agent "$i" "$WORK/cache$i" "$WORK/agent$i.log"
done
sleep 1.5
for ((i = 1; i <= peers; i++)); do
    lab_exec 0 "$BIN" task start --agent "http://$LAB_NET.$((i + 1)):7480" --token "$TOKEN" --manifest "$WORK/pkg.json" \
        --sign "$KEY" --cache-only --delay 0s --wait >/dev/null 2>&1
done
mkdir -p "$WORK/a-serve"
cp "$WORK/origin/pkg.bin" "$WORK/a-serve/"
lab_exec 1 "$BIN" serve "$WORK/a-serve" --listen "$LAB_NET.2:8081" 2>/dev/null &
b_api="http://$LAB_NET.$((b + 1)):7480"

# repair_run K: a fresh agent B (empty cache) gets the task, is elected and
# takes every block from the peers; once it holds them all the task is
# cancelled (its multicast to nobody is not measured) and B stopped.
# Prints "peer_bytes repair_seconds origin_bytes peers_used".
repair_run() {
    local k=$1 id status
    agent "$b" "$WORK/cache-b$k" "$WORK/agent-b$k.log"
    local pid=$!
    sleep 4 # presence carries the peers' HAVE to B (confirmed by a second announcement)
    grep -q "control API on" "$WORK/agent-b$k.log" || { cat "$WORK/agent-b$k.log" >&2; echo "FAIL: agent B of run $k did not start" >&2; return 1; }
    id=$(lab_exec 0 "$BIN" task start --agent "$b_api" --token "$TOKEN" --manifest "$WORK/pkg.json" --sign "$KEY" \
        --cache-only --delay 0s 2>"$WORK/b$k.err") || { cat "$WORK/b$k.err" >&2; return 1; }
    # One poller for the whole wait: a shell, curl and python3 started
    # every 0.2 s took a third of one of this machine's two cores from the
    # transfer it measured (perf), and the HTTP run has no such load.
    status=$(lab_exec 0 python3 - "$b_api/v1/tasks/$id" "$TOKEN" <<'PY'
import json, sys, time, urllib.request
url, token = sys.argv[1], sys.argv[2]
ask = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
s = {}
for _ in range(600):
    try:
        s = json.load(opener.open(ask, timeout=5))
        if s["blocks_done"] == s["block_count"] and s["repair_seconds"] > 0 or s["state"] in ("failed", "cancelled"):
            break
    except (OSError, ValueError, KeyError):
        pass
    time.sleep(0.2)
print(json.dumps(s))
PY
)
    echo "$status" >"$WORK/status$k.json"
    lab_exec 0 "$BIN" task cancel --agent "$b_api" --token "$TOKEN" --sign "$KEY" "$id" >/dev/null 2>&1 || true
    # The agent is a child of the shell that ran `agent`, so killing $pid
    # alone would leave it running, and the next run's agent B would fail
    # to bind and leave its task to this one: stop whatever runs in B's
    # namespace, and wait until it has gone.
    ip netns pids "${LAB_PREFIX}-h$b" | xargs -r kill 2>/dev/null || true
    for _ in $(seq 50); do
        [ -z "$(ip netns pids "${LAB_PREFIX}-h$b")" ] && break
        sleep 0.1
    done
    wait "$pid" 2>/dev/null || true
    python3 -c 'import json,sys; s=json.loads(sys.argv[1]); b=s["bytes"]; print(b["peers"], s["repair_seconds"], b["origin"], len(b["by_peer"]))' "$status"
}

# http_run K: B downloads the same file over HTTP from the first peer's
# host with curl. Prints the seconds curl took from its connection to the
# last byte (its own time_total): like repair_seconds, which runs from the
# repair's first connection to its last block, it leaves out starting the
# process.
http_run() {
    local secs
    secs=$(lab_exec "$b" curl -s -o "$WORK/http.bin" -w '%{time_total}' "http://$LAB_NET.2:8081/pkg.bin")
    cmp -s "$WORK/http.bin" "$WORK/origin/pkg.bin" || { echo "FAIL: the HTTP download differs" >&2; return 1; }
    rm -f "$WORK/http.bin"
    echo "$secs"
}

: >"$WORK/runs"
for ((k = 1; k <= runs; k++)); do
    read -r got secs origin sources < <(repair_run "$k")
    [ "${origin:-x}" = 0 ] || { cat "$WORK/status$k.json"; tail -5 "$WORK/agent-b$k.log"; echo "FAIL: B fetched $origin bytes from the origin"; exit 1; }
    [ "$sources" = "$peers" ] || { cat "$WORK/status$k.json"; echo "FAIL: B fetched from $sources peers, not $peers"; exit 1; }
    [ "$got" -ge "$bytes" ] || { cat "$WORK/status$k.json"; echo "FAIL: B got $got bytes from peers, not $bytes"; exit 1; }
    http_s=$(http_run "$k")
    echo "$got $secs $http_s" >>"$WORK/runs"
done
python3 - "$WORK/runs" "$bytes" "$size" "$rate" "$peers" "${peer_rate:-$rate}" "$mode" "${fleet:+, fleet key}" <<'PY'
import statistics, sys
runs = [tuple(map(float, l.split())) for l in open(sys.argv[1])]
size = int(sys.argv[2])
ratios = []
for i, (got, secs, http_s) in enumerate(runs, 1):
    r = got * 8 / secs / 1e6
    h = size * 8 / http_s / 1e6
    ratios.append(r / h)
    print(f"run {i}: peer repair {int(got)} bytes in {secs:.2f} s = {r:.0f} Mbit/s; "
          f"plain HTTP from one peer {size} bytes in {http_s:.2f} s = {h:.0f} Mbit/s; {r / h:.3f}x")
print(f"{sys.argv[3]}, links {sys.argv[4]}, {sys.argv[5]} peer(s) uploading at {sys.argv[6]}, {sys.argv[7]} mode{sys.argv[8]}: "
      f"repair/HTTP throughput median {statistics.median(ratios):.3f}x over {len(ratios)} run(s) "
      f"(min {min(ratios):.3f}x, max {max(ratios):.3f}x)")
PY
