"""Small client commands that discovery tests run *inside* a network namespace.

A namespace cannot reach the root namespace's addresses (nor the other way round), so whatever
talks to a registry, an agent or the LAN's multicast group in a test namespace runs there, as
``ip netns exec NS python tests/support/netns_client.py COMMAND ...``. Every command is bounded
by a deadline and prints one line for the test to read.

    wait-http URL SECONDS              exit 0 once GET URL answers (any status)
    push-blob REGISTRY REPO FILE       upload FILE as a blob of REPO; prints its digest
    get-blob URL                       GET URL (a blob); prints "<sha256 hex> <size>"
    watch-mdns IP SECONDS              count mDNS packets (224.0.0.251:5353) arriving on the
                                       interface with address IP; stops at the first one
"""

from __future__ import annotations

import hashlib
import socket
import struct
import sys
import time
from pathlib import Path

import httpx

MDNS_GROUP = "224.0.0.251"
MDNS_PORT = 5353


def wait_http(url: str, seconds: float) -> int:
    deadline = time.monotonic() + seconds
    with httpx.Client(trust_env=False, timeout=1.0) as client:
        while time.monotonic() < deadline:
            try:
                client.get(url)
                return 0
            except httpx.TransportError:
                time.sleep(0.05)
    print(f"no answer from {url} within {seconds}s", file=sys.stderr)
    return 1


def push_blob(registry: str, repo: str, path: str) -> int:
    data = Path(path).read_bytes()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    with httpx.Client(base_url=registry, trust_env=False, timeout=10.0) as client:
        started = client.post(f"/v2/{repo}/blobs/uploads/")
        if started.status_code != 202:
            print(f"upload start: {started.status_code} {started.text}", file=sys.stderr)
            return 1
        location = httpx.URL(registry).join(started.headers["location"])
        done = client.put(
            location.copy_merge_params({"digest": digest}),
            content=data,
            headers={"Content-Type": "application/octet-stream"},
        )
        if done.status_code != 201:
            print(f"upload: {done.status_code} {done.text}", file=sys.stderr)
            return 1
    print(digest)
    return 0


def get_blob(url: str) -> int:
    sha, size = hashlib.sha256(), 0
    with (
        httpx.Client(trust_env=False, timeout=30.0) as client,
        client.stream("GET", url) as response,
    ):
        if response.status_code != 200:
            print(f"GET {url}: {response.status_code} {response.read()[:300]!r}", file=sys.stderr)
            return 1
        for chunk in response.iter_bytes():
            sha.update(chunk)
            size += len(chunk)
    print(sha.hexdigest(), size)
    return 0


def watch_mdns(interface_ip: str, seconds: float) -> int:
    """Join the mDNS group on one interface and count what arrives (0 or 1: stops at the first)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((MDNS_GROUP, MDNS_PORT))
    membership = struct.pack("4s4s", socket.inet_aton(MDNS_GROUP), socket.inet_aton(interface_ip))
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, membership)
    sock.settimeout(seconds)
    try:
        _, sender = sock.recvfrom(9000)
    except TimeoutError:
        print("packets 0")
        return 0
    finally:
        sock.close()
    print(f"packets 1 from {sender[0]}")
    return 0


def main(argv: list[str]) -> int:
    command, args = argv[0], argv[1:]
    if command == "wait-http":
        return wait_http(args[0], float(args[1]))
    if command == "push-blob":
        return push_blob(*args)
    if command == "get-blob":
        return get_blob(args[0])
    if command == "watch-mdns":
        return watch_mdns(args[0], float(args[1]))
    print(f"unknown command {command}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
