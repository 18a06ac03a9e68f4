#!/usr/bin/env python3
"""N simulated agents polling a task channel's index, for scripts/bench-channel.sh.

  channel-pollers.py --url http://127.0.0.1:8089/chan/channel.json --agents 1000
      --poll 5 --seconds 30 --publish-after 12 --publish-cmd "somcast task publish ..."

Each poller behaves as an agent does: its first poll at a random point of one
period, then one every period x U(0.9, 1.1), a conditional GET (If-None-Match
with the last ETag). After --publish-after seconds the command is run once
(it adds a task to the channel); every poller notes when an answer first
shows the index changed. Prints one JSON object: requests, answers by
status, bytes read, requests/s and bytes/s over the run, and the seconds
from the publish until 50%, 99% and 100% of pollers saw the change.
"""
import argparse
import asyncio
import json
import random
import subprocess
import time
from urllib.parse import urlparse


async def get(host, port, path, etag):
    reader, writer = await asyncio.open_connection(host, port)
    head = f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n"
    if etag:
        head += f"If-None-Match: {etag}\r\n"
    writer.write((head + "\r\n").encode())
    await writer.drain()
    data = await reader.read()
    writer.close()
    status = int(data[9:12])
    new_etag = None
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == b"etag":
            new_etag = v.strip().decode()
    return status, new_etag, len(data)


async def poller(url, poll, until, stats, seen, publish):
    u = urlparse(url)
    etag = None
    await asyncio.sleep(random.uniform(0, poll))
    while time.monotonic() < until:
        try:
            status, new_etag, n = await get(u.hostname, u.port or 80, u.path, etag)
        except OSError:
            stats["errors"] += 1
        else:
            stats["requests"] += 1
            stats["bytes"] += n
            stats["by_status"][status] = stats["by_status"].get(status, 0) + 1
            stats["bytes_by_status"][status] = stats["bytes_by_status"].get(status, 0) + n
            if status == 200:
                if etag is not None and publish["at"] is not None and new_etag != etag:
                    seen.append(time.monotonic() - publish["at"])
                etag = new_etag
        await asyncio.sleep(poll * random.uniform(0.9, 1.1))


async def main():
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--agents", type=int, default=1000)
    p.add_argument("--poll", type=float, default=5.0)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--publish-after", type=float, default=10.0)
    p.add_argument("--publish-cmd", required=True)
    a = p.parse_args()
    stats = {"requests": 0, "bytes": 0, "errors": 0, "by_status": {}, "bytes_by_status": {}}
    seen = []
    publish = {"at": None}
    t0 = time.monotonic()
    until = t0 + a.seconds

    async def publisher():
        await asyncio.sleep(a.publish_after)
        # From the start of the command: a poller may see the new index
        # before the command has exited.
        publish["at"] = time.monotonic()
        proc = await asyncio.create_subprocess_shell(
            a.publish_cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        await proc.wait()

    await asyncio.gather(publisher(), *(poller(a.url, a.poll, until, stats, seen, publish) for _ in range(a.agents)))
    elapsed = time.monotonic() - t0
    seen.sort()

    def pct(q):
        need = int(q * a.agents + 0.999999)
        return round(seen[need - 1], 2) if len(seen) >= need else None

    print(json.dumps({
        "agents": a.agents, "poll_s": a.poll, "seconds": round(elapsed, 1),
        "requests": stats["requests"], "errors": stats["errors"], "by_status": stats["by_status"],
        "bytes": stats["bytes"], "requests_per_s": round(stats["requests"] / elapsed, 1),
        "bytes_per_s": round(stats["bytes"] / elapsed),
        "bytes_per_request": round(stats["bytes"] / max(stats["requests"], 1)),
        "bytes_per_304": round(stats["bytes_by_status"].get(304, 0) / max(stats["by_status"].get(304, 0), 1)),
        "bytes_per_200": round(stats["bytes_by_status"].get(200, 0) / max(stats["by_status"].get(200, 0), 1)),
        "saw_change": len(seen), "seen_50_s": pct(0.5), "seen_99_s": pct(0.99), "seen_100_s": pct(1.0),
    }))


asyncio.run(main())
