#!/usr/bin/env bash
# Peak resident memory of `somcast send` and `somcast recv` moving one large
# file over loopback multicast (no root). Memory must stay bounded by the
# block window, not grow with the file. Exits 1 when the copy differs or
# either side's peak goes over --limit MiB.
#
#   scripts/bench-memory.sh [--size 2G] [--rate 1500M] [--drop-rate 0.05] [--limit 128]
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=2G RATE=1500M DROP=0.05 LIMIT=128
while [ $# -gt 0 ]; do
    case "$1" in
    --size) SIZE=$2; shift 2 ;;
    --rate) RATE=$2; shift 2 ;;
    --drop-rate) DROP=$2; shift 2 ;;
    --limit) LIMIT=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done
command -v /usr/bin/time >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq time >/dev/null
cargo build --release -q
BIN=$PWD/target/release/somcast
WORK=$(mktemp -d "${TMPDIR:-/var/tmp}/somcast-mem.XXXXXX")
# (kill with no jobs left fails; that must not become the exit status)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT
head -c "$(numfmt --from=iec "$SIZE")" /dev/urandom >"$WORK/src"
GROUP=239.255.77.$((RANDOM % 250 + 1)):$((20000 + RANDOM % 20000))
/usr/bin/time -o "$WORK/recv.time" -f "%M %e" "$BIN" recv --iface 127.0.0.1 --group "$GROUP" \
    --out "$WORK/out" --drop-rate "$DROP" --timeout 60s 2>"$WORK/recv.err" &
rpid=$!
sleep 0.5
/usr/bin/time -o "$WORK/send.time" -f "%M %e" "$BIN" send "$WORK/src" --iface 127.0.0.1 --group "$GROUP" \
    --rate "$RATE" --min-receivers 1 2>"$WORK/send.err"
wait "$rpid"
cmp -s "$WORK/src" "$WORK/out" && same=identical || same=DIFFERENT
read -r smem ssec <"$WORK/send.time"
read -r rmem rsec <"$WORK/recv.time"
echo "| file | side | peak RSS MiB | seconds | result |"
echo "|---|---|---|---|---|"
printf '| %s | send | %.1f | %s | |\n' "$SIZE" "$(echo "$smem / 1024" | bc -l)" "$ssec"
printf '| %s | recv (%s drop) | %.1f | %s | %s |\n' "$SIZE" "$DROP" "$(echo "$rmem / 1024" | bc -l)" "$rsec" "$same"
if [ "$same" != identical ] || [ "$smem" -gt $((LIMIT * 1024)) ] || [ "$rmem" -gt $((LIMIT * 1024)) ]; then
    echo "FAILED: copy $same, limit $LIMIT MiB" >&2
    exit 1
fi
