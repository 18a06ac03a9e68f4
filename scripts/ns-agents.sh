#!/usr/bin/env bash
# Agents find each other across network namespaces: six hosts on one
# bridge, five run `somcast agent`, the sixth runs `somcast scan --probe
# --json` and must list all five addresses as valid JSON. Then one agent is
# killed and the others must drop it from their peer tables.
#
#   scripts/ns-agents.sh [--loss 0.05]
#
# Needs root; installs what it needs; always cleans up.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lab.sh
export LAB_PREFIX=sca

loss=0
[ "${1:-}" = "--loss" ] && loss=${2:?--loss P}

cargo build --release -q
BIN=$PWD/target/release/somcast
WORK=$(mktemp -d)
trap 'lab_down; rm -rf "$WORK"' EXIT
TOKEN=lab-token-$$

lab_up 6 100mbit "$loss"
for i in 1 2 3 4 5; do
    lab_exec "$i" "$BIN" agent --iface eth0 --cache "$WORK/cache$i" --api "$LAB_NET.$((i + 1)):7480" \
        --token "$TOKEN" --presence-interval 1s >"$WORK/agent$i.log" 2>&1 &
done
sleep 2

lab_exec 0 "$BIN" scan --iface eth0 --probe --json >"$WORK/scan.json" || true
python3 - "$WORK/scan.json" "$LAB_NET" <<'PY'
import json, sys
scan = json.load(open(sys.argv[1]))
net = sys.argv[2]
got = sorted(a["address"] for a in scan["probe"]["agents"])
want = sorted(f"{net}.{i + 1}" for i in range(1, 6))
assert all(isinstance(a, str) for a in got), got
if got != want:
    sys.exit(f"FAIL: scan --probe listed {got}, want {want}")
print("ok: scan --probe lists", " ".join(got),
      "rtt ms", [round(a["rtt_ms"], 2) for a in scan["probe"]["agents"]])
PY

peers_of() { # host i: number of peers its API reports
    lab_exec "$1" curl -s -H "Authorization: Bearer $TOKEN" "http://$LAB_NET.$(($1 + 1)):7480/v1/status" |
        python3 -c 'import json,sys; print(len(json.load(sys.stdin)["peers"]))'
}
command -v curl >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq curl >/dev/null
for i in 1 2 3 4 5; do
    n=$(peers_of "$i")
    [ "$n" = 4 ] || { echo "FAIL: agent $i has $n peers, want 4"; cat "$WORK/agent$i.log"; exit 1; }
done
echo "ok: every agent lists the other four"

# SIGKILL host 5's agent: no goodbye, so the others must notice the silence.
ip netns pids "${LAB_PREFIX}-h5" | xargs -r kill -9
sleep 4.5
for i in 1 2 3 4; do
    n=$(peers_of "$i")
    [ "$n" = 3 ] || { echo "FAIL: agent $i has $n peers 4.5 s after a kill, want 3"; exit 1; }
done
echo "ok: the killed agent left every table within 4.5 s (interval 1 s)"
