"""The tracker-less path's query (agent/peer_directory.py) against real peer servers on loopback.

No mDNS here: the peer list is set by hand, as discovery would set it.
"""

from __future__ import annotations

import hashlib
import os

import httpx
import pytest

from agent.peer_directory import PeerDirectory
from agent.peer_link import PeerIdentity
from p2preg.digest import Digest
from p2preg.token_bucket import RateLimiter

pytestmark = pytest.mark.timeout(60)

SECRET = b"directory-test-cluster-secret-0123"
MiB = 1024 * 1024


async def test_directory_finds_holders_that_pass_the_handshake(
    origin, image_factory, start_agent, tmp_path
) -> None:
    image = image_factory("team/directory", layer_sizes=(2 * MiB + 3,))
    layer = image.layers[0]
    ours, theirs = tmp_path / "secret", tmp_path / "other-secret"
    ours.write_bytes(SECRET)
    theirs.write_bytes(b"another-cluster-entirely-0123456789")

    def p2p(secret_file: os.PathLike[str]) -> dict[str, object]:
        return {"peer_host": "127.0.0.1", "cluster_secret_file": str(secret_file)}

    holder = await start_agent(origin.url, **p2p(ours))
    empty = await start_agent(origin.url, **p2p(ours))
    stranger = await start_agent(origin.url, **p2p(theirs))  # holds it, but not our cluster
    for agent in (holder, stranger):
        async with httpx.AsyncClient(base_url=agent.registry_url, trust_env=False) as client:
            response = await client.get(f"/v2/team/directory/blobs/{layer.digest}", timeout=30)
        assert hashlib.sha256(response.content).hexdigest() == layer.digest.split(":")[1]

    def address(agent) -> str:
        return f"127.0.0.1:{agent.peer_port}"

    identity = PeerIdentity(os.urandom(16), SECRET, RateLimiter(None), RateLimiter(None))
    directory = PeerDirectory(identity, "127.0.0.1:1")
    directory.set_peers([address(holder), address(empty), address(stranger), "127.0.0.1:1"])
    assert "127.0.0.1:1" not in directory.addresses  # ourselves

    found = await directory.find_holders(Digest.parse(layer.digest))
    assert found.asked == 3
    assert found.addresses == [address(holder)]
    assert found.metainfo is not None and found.metainfo.complete
    assert found.metainfo.size == layer.size

    nobody = await directory.find_holders(Digest.parse("sha256:" + "1" * 64))
    assert (nobody.addresses, nobody.metainfo) == ([], None)
