#!/usr/bin/env bash
# The Debian package of the agent: target/deb/somcast_<version>_<arch>.deb
# with /usr/bin/somcast, the hardened systemd unit somcast-agent.service,
# a documented /etc/somcast/agent.toml (a conffile) and the docs; the unit
# keeps its state in /var/cache/somcast. Installing it enables and starts
# the agent; purging removes the cache and the config.
#
#   scripts/deb.sh            build it
#   scripts/deb.sh --check    build it, then check its contents, its maintainer
#                             scripts (sh -n) and the unit (systemd-analyze verify)
#
# Needs dpkg-deb (every Debian has it); plain dpkg-deb rather than cargo-deb,
# so nothing more is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
check=false
[ "${1:-}" = --check ] && check=true

cargo build --release --bin somcast -q
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
arch=$(dpkg --print-architecture)
out=target/deb/somcast_${version}_${arch}.deb
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT

install -D -m 0755 target/release/somcast "$root/usr/bin/somcast"
command -v strip >/dev/null && strip --strip-debug "$root/usr/bin/somcast"
install -D -m 0644 scripts/deb/somcast-agent.service "$root/lib/systemd/system/somcast-agent.service"
install -D -m 0640 scripts/deb/agent.toml "$root/etc/somcast/agent.toml"
for f in README.md docs/ARCHITECTURE.md docs/PROTOCOL.md; do
    install -D -m 0644 "$f" "$root/usr/share/doc/somcast/$(basename "$f")"
done
mkdir -p "$root/DEBIAN"
size=$(du -sk "$root" | cut -f1)
cat >"$root/DEBIAN/control" <<CONTROL
Package: somcast
Version: $version
Architecture: $arch
Maintainer: somcast developers <somcast@localhost>
Installed-Size: $size
Depends: libc6
Section: admin
Priority: optional
Homepage: https://github.com/somcast/somcast
Description: self-organizing subnet multicast distribution of software packages
 The somcast agent elects one representative per subnet, which fetches a
 package once and multicasts it with RaptorQ fountain coding; late agents
 repair from peers. Tasks are signed; a task channel on any web server
 reaches agents without knowing their addresses.
CONTROL
echo /etc/somcast/agent.toml >"$root/DEBIAN/conffiles"
cat >"$root/DEBIAN/postinst" <<'SH'
#!/bin/sh
set -e
if [ "$1" = configure ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || true
    systemctl enable somcast-agent.service >/dev/null 2>&1 || true
    systemctl restart somcast-agent.service >/dev/null 2>&1 || true
fi
SH
cat >"$root/DEBIAN/prerm" <<'SH'
#!/bin/sh
set -e
if [ -d /run/systemd/system ] && [ "$1" = remove ]; then
    systemctl stop somcast-agent.service >/dev/null 2>&1 || true
    systemctl disable somcast-agent.service >/dev/null 2>&1 || true
fi
SH
cat >"$root/DEBIAN/postrm" <<'SH'
#!/bin/sh
set -e
if [ "$1" = purge ]; then
    rm -rf /var/cache/somcast /etc/somcast
fi
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || true
fi
SH
chmod 0755 "$root/DEBIAN/postinst" "$root/DEBIAN/prerm" "$root/DEBIAN/postrm"
mkdir -p target/deb
dpkg-deb --root-owner-group -Zxz --build "$root" "$out" >/dev/null
echo "built $out ($(du -h "$out" | cut -f1))"

$check || exit 0
contents=$(dpkg-deb -c "$out")
for f in ./usr/bin/somcast ./lib/systemd/system/somcast-agent.service ./etc/somcast/agent.toml \
    ./usr/share/doc/somcast/README.md; do
    grep -q " $f\$" <<<"$contents" || { echo "FAIL: $f is not in the package"; exit 1; }
done
[ "$(dpkg-deb -f "$out" Package)" = somcast ] || { echo "FAIL: control"; exit 1; }
for s in postinst prerm postrm; do sh -n "$root/DEBIAN/$s"; done
# The unit against the packaged binary, in a root of its own.
verify=$(mktemp -d)
trap 'rm -rf "$root" "$verify"' EXIT
dpkg-deb -x "$out" "$verify"
if command -v systemd-analyze >/dev/null; then
    # The packaged unit, pointed at the extracted binary (the host has no
    # /usr/bin/somcast), checked against the host's own units.
    unit=$verify/somcast-agent.service
    sed "s|/usr/bin/somcast|$verify/usr/bin/somcast|" \
        "$verify/lib/systemd/system/somcast-agent.service" >"$unit"
    # It warns of a bad line and goes on ("ignoring"), exit 0: any word
    # about our unit fails the check; the host's own units are not ours.
    systemd-analyze verify "$unit" 2>"$verify.err" || true
    if grep -q "somcast" "$verify.err"; then
        cat "$verify.err"; rm -f "$verify.err"; echo "FAIL: systemd-analyze verify"; exit 1
    fi
    rm -f "$verify.err"
fi
"$verify/usr/bin/somcast" --version >/dev/null
echo "ok: package contents, maintainer scripts and unit checked"
