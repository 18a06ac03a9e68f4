#!/usr/bin/env bash
# Fleet control in network namespaces: three subnets of PER agents behind a
# router, each subnet's link from the router limited to WAN; on a fourth
# subnet the origin host runs nginx (the packages and the task channel),
# `somcast serve --reports` (the report collector) and Prometheus (scraping
# every agent's metrics). Agents run from the Debian package's config
# (scripts/deb/agent.toml with trusted_keys, channel, tags, metrics set),
# polling every 2 s.
#
# 1. One `task publish` of a SIZE package for tag "fleet": every agent
#    completes; the origin sends <= 1.05x the size into each subnet (the
#    router's counters); `task status --reports` counts every agent done in
#    3 subnets; Prometheus answers sum(somcast_tasks{state="done"}).
# 2. A task for a tag nobody has: no agent takes it, nobody fetches it.
# 3. A task withdrawn while agents wait out its delay: they cancel it; an
#    agent that was down and polls only after the withdrawal never starts it.
# 4. A task whose document was changed on the server: refused by all.
#
#   scripts/ns-channel.sh [--per-subnet 4] [--size 48M] [--wan 200mbit]
#
# Needs root; installs nginx and prometheus (Debian packages) if missing;
# always cleans up. Namespaces: nc-rt, nc-o, nc-sw{a,b,c}, nc-{a,b,c}1...
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lab.sh

per=4 size=48M wan=200mbit
while [ $# -gt 0 ]; do
    case "$1" in
    --per-subnet) per=$2; shift 2 ;;
    --size) size=$2; shift 2 ;;
    --wan) wan=$2; shift 2 ;;
    *) echo "usage: $0 [--per-subnet N] [--size 48M] [--wan 200mbit]" >&2; exit 2 ;;
    esac
done

lab_need
need=()
command -v nginx >/dev/null || need+=(nginx-light)
command -v prometheus >/dev/null || need+=(prometheus)
command -v curl >/dev/null || need+=(curl)
if [ ${#need[@]} -gt 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null ||
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null; }
fi
cargo build --release -q
BIN=$PWD/target/release/somcast
WORK=$(mktemp -d)
chmod 0755 "$WORK"
trap 'disown -a 2>/dev/null; lab_down_matching "^nc-"; rm -rf "$WORK"' EXIT
lab_down_matching "^nc-"
"$BIN" key generate "$WORK/publisher" 2>/dev/null
KEY=$WORK/publisher.key PUB=$WORK/publisher.pub
TOKEN=ns-channel-$$
O=10.82.9.10

lab_routed nc 10.82 "$wan" "$per" a b c
hosts=("${LAB_ROUTED[@]}")
agents=${#hosts[@]}

# The origin: nginx serves the packages and the channel.
www=$WORK/www
mkdir -p "$www" "$WORK/reports"
lab_nginx_conf "$WORK/nginx.conf" "$WORK/nginx" "$O:8080" "$www"
ip netns exec nc-o nginx -p "$WORK/nginx" -c "$WORK/nginx.conf" &
ip netns exec nc-o "$BIN" serve "$WORK/nginx" --listen $O:8081 --reports "$WORK/reports" 2>"$WORK/reports.log" &

# Prometheus scrapes every agent's --metrics address.
targets=$(for hv in "${hosts[@]}"; do printf '"%s:9480",' "${hv##*:}"; done)
cat >"$WORK/prometheus.yml" <<EOF
global: { scrape_interval: 1s, scrape_timeout: 1s }
scrape_configs:
  - job_name: somcast
    static_configs: [ { targets: [${targets%,}] } ]
EOF
ip netns exec nc-o prometheus --config.file="$WORK/prometheus.yml" --storage.tsdb.path="$WORK/prom" \
    --web.listen-address=$O:9090 >"$WORK/prometheus.log" 2>&1 &

package() { # NAME SIZE: www/NAME.bin and its signed manifest WORK/NAME.json
    head -c "$(numfmt --from=iec "$2")" /dev/urandom >"$www/$1.bin"
    "$BIN" manifest create "$www/$1.bin" --url "http://$O:8080/$1.bin" -o "$WORK/$1.json" --sign "$KEY" 2>/dev/null
}
package pkg "$size"
package nobody 1M
package late 4M

start_agent() { # HOST ADDR
    local h=$1 addr=$2 conf=$WORK/etc-$1/agent.toml
    mkdir -p "$WORK/etc-$h"
    { cat scripts/deb/agent.toml; cat <<EOF
trusted_keys = ["$PUB"]
channel = "http://$O:8080/chan"
poll = "2s"
tags = ["fleet", "${h:3:1}"]
metrics = "$addr:9480"
iface = "eth0"
api = "$addr:7480"
token = "$TOKEN"
cache = "$WORK/cache-$h"
EOF
    } >"$conf"
    ip netns exec "$h" "$BIN" agent --config "$conf" >>"$WORK/agent-$h.log" 2>&1 &
}
for hv in "${hosts[@]}"; do start_agent "${hv%%:*}" "${hv##*:}"; done
sleep 2

api() { # HOST PATH
    local addr
    for hv in "${hosts[@]}"; do [ "${hv%%:*}" = "$1" ] && addr=${hv##*:}; done
    ip netns exec "$1" curl -s -m 5 -H "Authorization: Bearer $TOKEN" "http://$addr:7480$2"
}
task_state() { api "$1" "/v1/tasks/$2" | python3 -c 'import json,sys; print(json.load(sys.stdin).get("state","none"))' 2>/dev/null || echo none; }
channel_count() { api "$1" /v1/status | python3 -c "import json,sys; print(json.load(sys.stdin)['channel']['$2'])"; }
wan_tx() { ip netns exec nc-rt cat "/sys/class/net/eth-$1/statistics/tx_bytes"; }
publish() { "$BIN" task publish --channel "$www/chan" --sign "$KEY" --report-url "http://$O:8081/reports" "$@" 2>/dev/null; }

# 1. One task for the fleet.
declare -A tx0
for s in a b c; do tx0[$s]=$(wan_tx $s); done
t0=$(date +%s)
id=$(publish --manifest "$WORK/pkg.json" --target-tag fleet --run true --delay 5s)
for _ in $(seq 600); do
    [ "$(ls "$WORK/reports/$id" 2>/dev/null | wc -l)" = "$agents" ] && break
    sleep 0.5
done
"$BIN" task status "$id" --reports "$WORK/reports" >"$WORK/status.txt" || { cat "$WORK/status.txt"; echo "FAIL: not every agent reported done"; exit 1; }
# The collector's URL too, from the origin's subnet.
ip netns exec nc-o "$BIN" task status "$id" --reports "http://$O:8081/reports" --json >"$WORK/status.json"
python3 - "$WORK/status.json" "$agents" <<'PY' || { cat "$WORK/status.txt"; exit 1; }
import json, sys
s = json.load(open(sys.argv[1])); n = int(sys.argv[2])
assert s["by_state"] == {"done": n}, s["by_state"]
assert len(s["by_subnet"]) == 3, s["by_subnet"]
for subnet, o in s["origin_by_subnet"].items():
    assert o["per_package"] <= 1.05, (subnet, o)
PY
bytes=$(stat -c %s "$www/pkg.bin")
for s in a b c; do
    sent=$(($(wan_tx $s) - ${tx0[$s]}))
    python3 -c "import sys; r=$sent/$bytes; print(f'subnet {sys.argv[1]}: {r:.3f}x the package from the router'); sys.exit(r > 1.05)" "$s" ||
        { echo "FAIL: subnet $s took more than 1.05x the package over its link"; exit 1; }
done
for hv in "${hosts[@]}"; do
    h=${hv%%:*}
    content=$(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(json.loads(d["document"])["content_id"])' "$WORK/pkg.json")
    cmp -s "$www/pkg.bin" "$WORK/cache-$h/objects/$content" || { echo "FAIL: $h has other bytes"; exit 1; }
done
done_at=$(($(date +%s) - t0))
prom=0
for _ in $(seq 60); do
    prom=$(ip netns exec nc-o curl -s -m 2 "http://$O:9090/api/v1/query" --data-urlencode 'query=sum(somcast_tasks{state="done"})' |
        python3 -c 'import json,sys; r=json.load(sys.stdin)["data"]["result"]; print(int(float(r[0]["value"][1])) if r else 0)' 2>/dev/null || echo 0)
    [ "$prom" = "$agents" ] && break
    sleep 1
done
[ "$prom" = "$agents" ] || { echo "FAIL: Prometheus counts $prom tasks done, not $agents"; exit 1; }
echo "ok: 1 publish, $agents agents in 3 subnets done in ${done_at}s; reports: $agents done; Prometheus: sum(somcast_tasks{state=\"done\"}) = $prom"
sed 's/^/   /' "$WORK/status.txt"

# 2. For a tag nobody has.
id2=$(publish --manifest "$WORK/nobody.json" --target-tag nobody --run true --delay 1s)
sleep 6
for hv in "${hosts[@]}"; do
    h=${hv%%:*}
    [ "$(task_state "$h" "$id2")" = none ] || { echo "FAIL: $h took a task not for it"; exit 1; }
    [ "$(channel_count "$h" not_targeted)" -ge 1 ] || { echo "FAIL: $h did not judge the untargeted task"; exit 1; }
done
! grep -q "GET /nobody.bin" "$WORK/nginx/access.log" || { echo "FAIL: the untargeted package was fetched"; exit 1; }
echo "ok: a task for tag 'nobody': taken by no agent, its package never fetched"

# 3. Withdrawn while the agents wait; one agent is down meanwhile.
off=${hosts[$((agents - 1))]}
off_h=${off%%:*}
ip netns pids "$off_h" | xargs -r kill
id3=$(publish --manifest "$WORK/late.json" --target-tag fleet --run true --delay 120s)
for hv in "${hosts[@]:0:$((agents - 1))}"; do
    for _ in $(seq 40); do [ "$(task_state "${hv%%:*}" "$id3")" != none ] && break; sleep 0.5; done
done
"$BIN" task withdraw "$id3" --channel "$www/chan" --sign "$KEY" 2>/dev/null
for hv in "${hosts[@]:0:$((agents - 1))}"; do
    h=${hv%%:*}
    for _ in $(seq 40); do [ "$(task_state "$h" "$id3")" = cancelled ] && break; sleep 0.5; done
    [ "$(task_state "$h" "$id3")" = cancelled ] || { echo "FAIL: $h did not cancel the withdrawn task"; exit 1; }
done
start_agent "$off_h" "${off##*:}"
for _ in $(seq 40); do [ "$(channel_count "$off_h" withdrawn 2>/dev/null || echo 0)" -ge 1 ] && break; sleep 0.5; done
[ "$(channel_count "$off_h" withdrawn)" -ge 1 ] || { echo "FAIL: $off_h did not see the withdrawal"; exit 1; }
[ "$(task_state "$off_h" "$id3")" = none ] || { echo "FAIL: $off_h started a withdrawn task"; exit 1; }
echo "ok: withdrawn: $((agents - 1)) waiting agents cancelled it; $off_h, back after the withdrawal, never started it"

# 4. A task changed on the server.
python3 - "$www/chan" "$id" <<'PY'
import json, sys, os
chan, real = sys.argv[1], sys.argv[2]
b = json.load(open(os.path.join(chan, "tasks", real + ".json")))
b["task"]["document"] = b["task"]["document"].replace(real, "forged-task").replace('"delay_ms": 5000', '"delay_ms": 1000')
json.dump(b, open(os.path.join(chan, "tasks", "forged-task.json"), "w"))
i = json.load(open(os.path.join(chan, "channel.json")))
i["tasks"].append("forged-task")
json.dump(i, open(os.path.join(chan, "channel.json.tmp"), "w"))
os.replace(os.path.join(chan, "channel.json.tmp"), os.path.join(chan, "channel.json"))
PY
sleep 6
for hv in "${hosts[@]}"; do
    h=${hv%%:*}
    [ "$(task_state "$h" forged-task)" = none ] || { echo "FAIL: $h took the forged task"; exit 1; }
    [ "$(channel_count "$h" refused)" -ge 1 ] || { echo "FAIL: $h did not refuse the forged task"; exit 1; }
done
echo "ok: a task changed on the server: refused by all $agents agents"
polls=$(grep -c "GET /chan/channel.json" "$WORK/nginx/access.log" || true)
not_mod=$(grep "GET /chan/channel.json" "$WORK/nginx/access.log" | grep -c '" 304 ' || true)
echo "ok: channel index requests: $polls, of which 304 Not Modified: $not_mod"
