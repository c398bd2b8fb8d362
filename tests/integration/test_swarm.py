"""Several agents on loopback pull the same image at once: content comes mostly from each other.

A real origin (docker-registry) sits behind the fault proxy, which counts the bytes the origin
serves; a real tracker coordinates. Every agent runs in this test's process, each with its own
store, peer server and registry endpoint.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from agent.service import RunningAgent
from p2preg.digest import Digest
from tests.support.fault_proxy import Fault, run_fault_proxy
from tests.support.origin import OriginRegistry
from tests.support.swarm_harness import (
    AgentStarter,
    ImageFactory,
    expected_digests,
    peer_server_of,
    pull_image,
    start_swarm,
)
from tests.support.tools import wait_until

MiB = 1024 * 1024
pytestmark = pytest.mark.timeout(120)


async def test_agents_pull_at_once_and_origin_serves_about_one_copy(
    origin: OriginRegistry,
    image_factory: ImageFactory,
    start_agent: AgentStarter,
    nursery: trio.Nursery,
    tmp_path: Path,
) -> None:
    image = image_factory("team/swarm", layer_sizes=(3 * MiB + 123, 40 * 1024, 21 * MiB + 7))
    proxy = await nursery.start(run_fault_proxy, origin.url)
    _, agents = await start_swarm(nursery, start_agent, tmp_path, proxy.url, 4)
    results: list[dict[str, str]] = []

    async def one(agent: RunningAgent) -> None:
        results.append(await pull_image(agent.registry_url, "team/swarm", image))

    with trio.fail_after(90):
        async with trio.open_nursery() as pulls:
            for agent in agents:
                pulls.start_soon(one, agent)
    assert results == [expected_digests(image)] * len(agents)
    blob_bytes = sum(blob.size for blob in (image.config, *image.layers))
    served = proxy.body_bytes("/blobs/")
    assert served <= 1.1 * blob_bytes, f"origin served {served} bytes for {blob_bytes}"
    # The rest travelled between the agents.
    from_peers = sum(peer_server_of(agent).bytes_served for agent in agents)
    assert from_peers >= (len(agents) - 1) * blob_bytes * 0.9, from_peers
    # Manifests too: one GET by digest at the origin, HEADs for the tag.
    assert proxy.count(f"/manifests/{image.manifest.digest}", "GET") <= 1


async def test_eight_agents_pulling_at_the_same_instant_cost_the_origin_one_copy(
    origin: OriginRegistry,
    image_factory: ImageFactory,
    start_agent: AgentStarter,
    nursery: trio.Nursery,
    tmp_path: Path,
) -> None:
    """Eight agents released by one event: byte-identical content, <= 1.1 copies from the origin."""
    # Three layers, one of them 22 pieces of 1 MiB.
    image = image_factory("team/swarm8", layer_sizes=(2 * MiB + 123, 40 * 1024, 21 * MiB + 7))
    proxy = await nursery.start(run_fault_proxy, origin.url)
    _, agents = await start_swarm(nursery, start_agent, tmp_path, proxy.url, 8)
    go = trio.Event()
    waiting = 0
    results: dict[int, dict[str, str]] = {}

    async def one(index: int, agent: RunningAgent) -> None:
        nonlocal waiting
        waiting += 1
        await go.wait()
        results[index] = await pull_image(agent.registry_url, "team/swarm8", image)

    with trio.fail_after(90):
        async with trio.open_nursery() as pulls:
            for index, agent in enumerate(agents):
                pulls.start_soon(one, index, agent)
            await wait_until(lambda: waiting == len(agents), 5)
            go.set()
    expected = expected_digests(image)
    assert [results[i] for i in range(len(agents))] == [expected] * len(agents)
    blob_bytes = sum(blob.size for blob in (image.config, *image.layers))
    served = proxy.body_bytes("/blobs/")
    assert served <= 1.1 * blob_bytes, f"origin served {served} bytes for {blob_bytes}"
    from_peers = sum(peer_server_of(agent).bytes_served for agent in agents)
    assert from_peers >= (len(agents) - 1) * blob_bytes * 0.9, from_peers
    assert proxy.count(f"/manifests/{image.manifest.digest}", "GET") <= 1
    # Downloaders told the peers they requested from how far they were (p2preg.upload_order).
    assert sum(peer_server_of(agent).progress_reports for agent in agents) > 0


async def test_agent_serves_pieces_of_a_blob_it_is_still_downloading(
    origin: OriginRegistry,
    image_factory: ImageFactory,
    start_agent: AgentStarter,
    nursery: trio.Nursery,
    tmp_path: Path,
) -> None:
    """The origin stalls the lease holder halfway through a blob; meanwhile a second agent
    already receives that blob's first pieces from it."""
    image = image_factory("team/partial", layer_sizes=(12 * MiB + 5, 40 * 1024))
    big = image.layers[0]
    digest = Digest.parse(big.digest)
    stall_at = 5 * MiB
    proxy = await nursery.start(run_fault_proxy, origin.url)
    proxy.add_fault(
        Fault("stall", f"/blobs/{big.digest}$", "GET", after_bytes=stall_at, stall_seconds=4.0)
    )
    _, (holder, second) = await start_swarm(nursery, start_agent, tmp_path, proxy.url, 2)
    progress: dict[str, int] = {}
    results: dict[str, dict[str, str]] = {}

    async def pull(name: str, agent: RunningAgent, progress: dict[str, int] | None = None) -> None:
        results[name] = await pull_image(agent.registry_url, "team/partial", image, progress)

    with trio.fail_after(60):
        async with trio.open_nursery() as pulls:
            pulls.start_soon(pull, "holder", holder)
            # The holder's origin fetch of the big layer is stalled at stall_at bytes.
            await wait_until(lambda: proxy.body_bytes(f"/blobs/{big.digest}$") >= stall_at, 20)
            pulls.start_soon(pull, "second", second, progress)
            await wait_until(lambda: progress.get(big.digest, 0) >= 2 * MiB, 10)
            # At this instant the holder has not finished the blob...
            (origin_fetch,) = proxy.records(f"/blobs/{big.digest}$", "GET")
            assert origin_fetch.body_bytes_sent == stall_at and not origin_fetch.complete
            assert not holder.store.has(digest)
            download = holder.downloads.active(digest)
            assert download is not None and download.available <= stall_at
            # ...and yet the second agent has pieces of it, which only the holder could give.
            assert peer_server_of(holder).pieces_served >= 2
            assert 2 * MiB <= progress[big.digest] <= stall_at
    assert results == {"holder": expected_digests(image), "second": expected_digests(image)}
    # The origin was asked for the big layer once: the second agent got all of it from the holder.
    assert proxy.count(f"/blobs/{big.digest}$", "GET") == 1


async def test_agent_arriving_after_the_lease_expired_gets_a_seeded_blob_from_peers(
    origin: OriginRegistry,
    image_factory: ImageFactory,
    start_agent: AgentStarter,
    nursery: trio.Nursery,
    tmp_path: Path,
) -> None:
    image = image_factory("team/late", layer_sizes=(4 * MiB + 5,))
    big = image.layers[0]
    proxy = await nursery.start(run_fault_proxy, origin.url)
    _, (first, late) = await start_swarm(
        nursery, start_agent, tmp_path, proxy.url, 2, lease_ttl=1.0
    )
    with trio.fail_after(30):
        assert await pull_image(first.registry_url, "team/late", image) == expected_digests(image)
        await trio.sleep(1.5)  # the first agent's origin lease has expired; it seeds the blob
        assert await pull_image(late.registry_url, "team/late", image) == expected_digests(image)
    assert proxy.count(f"/blobs/{big.digest}$", "GET") == 1
    assert peer_server_of(first).bytes_served >= big.size
