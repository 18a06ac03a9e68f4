#!/usr/bin/env python3
"""A host on the LAN without the fleet key, for scripts/ns-trust.sh.

  lan-attacker.py record --iface-addr A --out FILE GROUP:PORT...
      joins every group on the interface with address A and appends each
      datagram it hears to FILE (length-prefixed) until SIGTERM.
  lan-attacker.py attack --iface-addr A --in FILE --seconds N GROUP:PORT...
      for N seconds, sends to every GROUP:PORT given: each recorded datagram
      as it was (replay), a copy with one byte flipped (mutation), the plain
      frame inside it without its seal (a real claim, offer, presence or
      data frame, unauthenticated), and random "SK" datagrams (forgeries).
      Prints how many it sent.

It only ever sends to the groups it is given, from inside the namespace it
runs in.
"""
import random
import select
import signal
import socket
import struct
import sys
import time


def parse_groups(args):
    out = []
    for g in args:
        host, port = g.rsplit(":", 1)
        out.append((host, int(port)))
    return out


def record(addr, path, groups):
    socks = {}
    for host, port in groups:
        if port not in socks:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("0.0.0.0", port))
            socks[port] = s
        mreq = socket.inet_aton(host) + socket.inet_aton(addr)
        socks[port].setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    n = 0
    with open(path, "ab") as f:
        while not stop:
            try:
                ready, _, _ = select.select(list(socks.values()), [], [], 0.2)
            except InterruptedError:
                continue
            for s in ready:
                data = s.recv(65535)
                f.write(struct.pack("<I", len(data)) + data)
                n += 1
    print(f"recorded {n} datagrams", flush=True)


def load(path):
    out = []
    with open(path, "rb") as f:
        blob = f.read()
    i = 0
    while i + 4 <= len(blob):
        (n,) = struct.unpack_from("<I", blob, i)
        out.append(blob[i + 4 : i + 4 + n])
        i += 4 + n
    return out


def attack(addr, path, seconds, groups):
    recorded = load(path)
    if not recorded:
        sys.exit("nothing recorded")
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(addr))
    s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
    rng = random.Random(7)
    sent = 0
    end = time.time() + seconds
    i = 0
    while time.time() < end:
        d = recorded[i % len(recorded)]
        i += 1
        flipped = bytearray(d)
        flipped[rng.randrange(len(d))] ^= 1 << rng.randrange(8)
        plain = d[24:-16] if d[:2] == b"SK" and len(d) > 40 else d
        forged = b"SK\x01\x00" + bytes(rng.randrange(256) for _ in range(60))
        for dest in groups:
            for b in (d, bytes(flipped), plain, forged):
                try:
                    s.sendto(b, dest)
                    sent += 1
                except OSError:
                    pass
        # About 4 x groups x 500 datagrams a second: enough to matter,
        # not enough to be a flood that any rate limit would stop.
        time.sleep(0.002)
    print(f"sent {sent} datagrams ({len(recorded)} recorded)")


def main():
    a = sys.argv[1:]
    if not a or a[0] not in ("record", "attack"):
        sys.exit(__doc__)
    cmd, rest = a[0], a[1:]
    opts, groups = {}, []
    while rest:
        if rest[0].startswith("--"):
            opts[rest[0]] = rest[1]
            rest = rest[2:]
        else:
            groups.append(rest[0])
            rest = rest[1:]
    if cmd == "record":
        record(opts["--iface-addr"], opts["--out"], parse_groups(groups))
    else:
        attack(opts["--iface-addr"], opts["--in"], float(opts["--seconds"]), parse_groups(groups))


if __name__ == "__main__":
    main()
