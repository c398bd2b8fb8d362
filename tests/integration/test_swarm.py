"""Several agents on loopback pull the same image at once: content comes mostly from each other.

A real origin (docker-registry) sits behind the fault proxy, which counts the bytes the origin
serves; a real tracker coordinates. Every agent runs in this test's process, each with its own
store, peer server and registry endpoint.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import httpx
import pytest
import trio

from p2preg.config import TrackerConfig
from p2preg.mediatypes import DEFAULT_MANIFEST_ACCEPT
from tests.support.fault_proxy import run_fault_proxy
from tests.support.oci_image import TestImage
from tracker.server import run_tracker

MiB = 1024 * 1024
SECRET = b"test-cluster-secret-0123456789"
pytestmark = pytest.mark.timeout(120)


async def start_swarm(nursery, start_agent, tmp_path: Path, upstream: str, count: int, **extra):
    secret_file = tmp_path / "cluster-secret"
    secret_file.write_bytes(SECRET)
    tracker = await nursery.start(
        run_tracker, TrackerConfig(cluster_secret=SECRET, host="127.0.0.1", port=0, lease_ttl=3.0)
    )
    agents = []
    for _ in range(count):
        agents.append(
            await start_agent(
                upstream,
                peer_host="127.0.0.1",
                peer_port=0,
                trackers=(tracker.url,),
                cluster_secret_file=str(secret_file),
                piece_length=1 * MiB,
                swarm_stall_timeout=2.0,
                piece_timeout=5.0,
                **extra,
            )
        )
    return tracker, agents


async def pull_image(agent, repo: str, image: TestImage) -> dict[str, str]:
    """Pull manifest, config and layers through one agent; sha256 of each body by digest."""
    got: dict[str, str] = {}
    async with httpx.AsyncClient(base_url=agent.registry_url, timeout=60) as client:
        response = await client.get(
            f"/v2/{repo}/manifests/v1", headers={"Accept": DEFAULT_MANIFEST_ACCEPT}
        )
        assert response.status_code == 200, response.text
        got[image.manifest.digest] = hashlib.sha256(response.content).hexdigest()
        for blob in (image.config, *image.layers):
            response = await client.get(f"/v2/{repo}/blobs/{blob.digest}")
            assert response.status_code == 200, response.text
            got[blob.digest] = hashlib.sha256(response.content).hexdigest()
    return got


async def test_agents_pull_at_once_and_origin_serves_about_one_copy(
    origin, image_factory, start_agent, nursery, tmp_path
) -> None:
    image = image_factory("team/swarm", layer_sizes=(3 * MiB + 123, 40 * 1024, 21 * MiB + 7))
    proxy = await nursery.start(run_fault_proxy, origin.url)
    _, agents = await start_swarm(nursery, start_agent, tmp_path, proxy.url, 4)
    results: list[dict[str, str]] = []

    async def one(agent) -> None:
        results.append(await pull_image(agent, "team/swarm", image))

    with trio.fail_after(90):
        async with trio.open_nursery() as pulls:
            for agent in agents:
                pulls.start_soon(one, agent)
    expected = {
        blob.digest: hashlib.sha256(blob.path.read_bytes()).hexdigest()
        for blob in (image.manifest, image.config, *image.layers)
    }
    assert results == [expected] * len(agents)
    blob_bytes = sum(blob.size for blob in (image.config, *image.layers))
    served = proxy.body_bytes("/blobs/")
    assert served <= 1.1 * blob_bytes, f"origin served {served} bytes for {blob_bytes}"
    # The rest travelled between the agents.
    from_peers = sum(agent.peer_server.bytes_served for agent in agents)
    assert from_peers >= (len(agents) - 1) * blob_bytes * 0.9, from_peers
    # Manifests too: one GET by digest at the origin, HEADs for the tag.
    assert proxy.count(f"/manifests/{image.manifest.digest}", "GET") <= 1


async def test_embedded_tracker_serves_the_swarm(
    origin, image_factory, start_agent, nursery, tmp_path
) -> None:
    image = image_factory("team/embedded", layer_sizes=(6 * MiB, 1024, 2048))
    proxy = await nursery.start(run_fault_proxy, origin.url)
    secret_file = tmp_path / "secret"
    secret_file.write_bytes(SECRET)
    common = {
        "peer_host": "127.0.0.1",
        "cluster_secret_file": str(secret_file),
        "piece_length": 1 * MiB,
    }
    first = await start_agent(proxy.url, embedded_tracker=True, **common)
    assert first.embedded_tracker_url
    second = await start_agent(proxy.url, trackers=(first.embedded_tracker_url,), **common)
    with trio.fail_after(60):
        got_first = await pull_image(first, "team/embedded", image)
        got_second = await pull_image(second, "team/embedded", image)
    assert got_first == got_second
    layer = image.layers[0]
    assert proxy.count(f"/blobs/{layer.digest}", "GET") == 1, "the second agent used its peer"
