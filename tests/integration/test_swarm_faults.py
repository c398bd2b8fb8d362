"""Faults in the middle of a rollout: agents, the tracker or the origin fetcher die, a peer serves
rotten bytes, strangers and replayed handshakes knock on the peer port.

Every fault test first proves the fault struck mid-transfer (some but not all of a blob had
moved when it hit), then that every surviving agent still ends with byte-identical content.
Agents that must be SIGKILLed run as processes (the real CLI); the others run in this test's
process. The origin is docker-registry behind the fault proxy, which counts what it served.
"""

from __future__ import annotations

import logging
import secrets
import signal
import struct
from pathlib import Path

import httpx
import msgpack
import pytest
import trio

from p2preg.digest import Digest
from p2preg.wire import (
    NEED_DATA,
    Authenticated,
    BitfieldMsg,
    Hello,
    Interest,
    PeerConnection,
    Role,
    encode,
)
from tests.support.fault_proxy import Fault, run_fault_proxy
from tests.support.origin import OriginRegistry
from tests.support.swarm_harness import (
    SECRET,
    AgentStarter,
    ImageFactory,
    agent_processes,
    coordinator_of,
    expected_digests,
    peer_server_of,
    pull_image,
    start_swarm,
    start_tracker,
)
from tests.support.tools import wait_until
from tracker.client import TrackerClient

MiB = 1024 * 1024
pytestmark = pytest.mark.timeout(90)


# -- agents killed mid-rollout -----------------------------------------------------------------


@pytest.mark.slow
async def test_rollout_survives_agents_killed_mid_download(
    origin: OriginRegistry,
    image_factory: ImageFactory,
    nursery: trio.Nursery,
    tmp_path: Path,
) -> None:
    """Six agent processes pull at once (peer downloads paced to 6 MiB/s, so a 16 MiB layer
    takes seconds); two that download from peers are SIGKILLed while their layer is half there
    (their peers lose pieces mid-frame). The other four finish with byte-identical content."""
    image = image_factory("team/kill", layer_sizes=(16 * MiB + 3, 40 * 1024))
    big = image.layers[0]
    proxy = await nursery.start(run_fault_proxy, origin.url)
    tracker = await start_tracker(nursery, lease_ttl=3.0)
    progress: list[dict[str, int]] = [{} for _ in range(6)]
    results: dict[int, dict[str, str]] = {}
    failed: dict[int, Exception] = {}
    async with agent_processes(
        tmp_path,
        6,
        tracker_url=tracker.url,
        upstream=proxy.url,
        extra_args=["--download-limit=6MiB"],
    ) as agents:

        async def pull(index: int) -> None:
            try:
                results[index] = await pull_image(
                    agents[index].registry_url, "team/kill", image, progress[index]
                )
            except httpx.HTTPError as exc:
                failed[index] = exc  # expected of the agents killed under it, only those

        def fetches_from_origin(index: int) -> bool:
            return f"fetching {big.digest} from the origin" in agents[index].log_text()

        def midway(index: int) -> bool:
            return 2 * MiB <= progress[index].get(big.digest, 0) < big.size

        with trio.fail_after(60):
            async with trio.open_nursery() as pulls:
                for index in range(len(agents)):
                    pulls.start_soon(pull, index)
                # The lease holder fetches the layer from the origin (killing it is another
                # test); the others download it from peers. Kill two of those half way.
                await wait_until(lambda: any(map(fetches_from_origin, range(len(agents)))), 30)
                (holder,) = [i for i in range(len(agents)) if fetches_from_origin(i)]
                downloaders = [i for i in range(len(agents)) if i != holder]
                await wait_until(lambda: sum(map(midway, downloaders)) >= 2, 30)
                victims = [i for i in downloaders if midway(i)][:2]
                for index in victims:
                    agents[index].sigkill()
                received = {i: progress[i][big.digest] for i in victims}
                for index in victims:
                    assert await agents[index].wait_exit(5)
                    assert agents[index].process.returncode == -signal.SIGKILL
                assert all(2 * MiB <= n < big.size for n in received.values()), received
            # The pulls through the dead agents failed at once; the others ran to the end.
    survivors = [i for i in range(len(agents)) if i not in victims]
    expected = expected_digests(image)
    assert set(failed) <= set(victims), failed
    for index in survivors:
        assert results[index] == expected, agents[index].log_text()[-3000:]
    # Peers did the work, the dead ones' share too: one copy from the origin, by the holder.
    assert proxy.count(f"/blobs/{big.digest}$", "GET") == 1


# -- the tracker killed mid-rollout ------------------------------------------------------------


async def test_pulls_finish_when_the_tracker_dies_mid_rollout(
    origin: OriginRegistry,
    image_factory: ImageFactory,
    start_agent: AgentStarter,
    nursery: trio.Nursery,
    tmp_path: Path,
) -> None:
    """Four agents are part way through a layer when the tracker goes away: they finish from the
    peers they already know; an agent that starts afterwards falls back to the origin."""
    image = image_factory("team/notracker", layer_sizes=(16 * MiB + 9, 40 * 1024))
    big = image.layers[0]
    proxy = await nursery.start(run_fault_proxy, origin.url)
    tracker, agents = await start_swarm(
        nursery, start_agent, tmp_path, proxy.url, 5, download_limit=6 * MiB
    )
    swarm = agents[:4]
    progress: list[dict[str, int]] = [{} for _ in agents]
    results: dict[int, dict[str, str]] = {}

    async def pull(index: int) -> None:
        results[index] = await pull_image(
            agents[index].registry_url, "team/notracker", image, progress[index]
        )

    def midway(index: int) -> bool:
        return MiB <= progress[index].get(big.digest, 0) < big.size

    with trio.fail_after(60):
        async with trio.open_nursery() as pulls:
            for index in range(len(swarm)):
                pulls.start_soon(pull, index)
            # The lease holder races ahead from the origin; the other three are mid-layer.
            await wait_until(lambda: sum(map(midway, range(len(swarm)))) >= 3, 20)
            await tracker.stop()
            at_stop = [progress[i].get(big.digest, 0) for i in range(len(swarm))]
            assert sum(MiB <= n < big.size for n in at_stop) >= 3, at_stop
            with pytest.raises(OSError):
                await trio.open_tcp_stream("127.0.0.1", tracker.running.port)
            pulls.start_soon(pull, 4)
    expected = expected_digests(image)
    assert results == dict.fromkeys(range(len(agents)), expected)
    # The four finished from each other (one origin copy); only the late agent, which never
    # saw the tracker, went to the origin for its own.
    assert proxy.count(f"/blobs/{big.digest}$", "GET") == 2


# -- the origin fetcher killed -----------------------------------------------------------------


@pytest.mark.slow
async def test_lease_holder_killed_mid_origin_fetch_another_agent_takes_over(
    origin: OriginRegistry,
    image_factory: ImageFactory,
    nursery: trio.Nursery,
    tmp_path: Path,
) -> None:
    """The origin stalls the lease holder 4 MiB into a 12 MiB layer; three agents have those
    pieces from it when it is SIGKILLed. Once its lease expires one of them fetches the rest
    from the origin (a Range request past what the swarm had), and all three finish."""
    image = image_factory("team/takeover", layer_sizes=(12 * MiB + 11, 40 * 1024))
    big = image.layers[0]
    stall_at = 4 * MiB
    proxy = await nursery.start(run_fault_proxy, origin.url)
    proxy.add_fault(
        Fault("stall", f"/blobs/{big.digest}$", "GET", after_bytes=stall_at, stall_seconds=60)
    )
    tracker = await start_tracker(nursery, lease_ttl=2.0)
    progress: list[dict[str, int]] = [{} for _ in range(4)]
    results: dict[int, dict[str, str]] = {}
    failed: dict[int, Exception] = {}
    async with agent_processes(tmp_path, 4, tracker_url=tracker.url, upstream=proxy.url) as agents:
        holder, others = agents[0], range(1, 4)

        async def pull(index: int) -> None:
            try:
                results[index] = await pull_image(
                    agents[index].registry_url, "team/takeover", image, progress[index]
                )
            except httpx.HTTPError as exc:
                failed[index] = exc  # expected of the holder's own client, only of that

        with trio.fail_after(60):
            async with trio.open_nursery() as pulls:
                pulls.start_soon(pull, 0)
                await wait_until(lambda: proxy.body_bytes(f"/blobs/{big.digest}$") >= stall_at, 20)
                for index in others:
                    pulls.start_soon(pull, index)
                await wait_until(
                    lambda: all(progress[i].get(big.digest, 0) >= MiB for i in others), 20
                )
                # The holder is mid-fetch: the origin has sent it stall_at bytes, no more.
                (first,) = proxy.records(f"/blobs/{big.digest}$", "GET")
                assert first.body_bytes_sent == stall_at and not first.complete
                holder.sigkill()
                assert await holder.wait_exit(5)
            # The pull through the holder failed at once; the others ran to the end.
    assert set(failed) <= {0}, failed
    expected = expected_digests(image)
    for index in others:
        assert results[index] == expected, agents[index].log_text()[-3000:]
    fetches = proxy.records(f"/blobs/{big.digest}$", "GET")
    assert len(fetches) == 2, [(r.headers.get("range"), r.body_bytes_sent) for r in fetches]
    second = fetches[1]
    assert second.complete
    start = int(second.headers["range"].removeprefix("bytes=").rstrip("-"))
    assert MiB <= start <= stall_at and start % MiB == 0, second.headers
    assert second.body_bytes_sent == big.size - start
    # About one copy in all: the stalled part plus the rest.
    assert proxy.body_bytes(f"/blobs/{big.digest}$") <= big.size + stall_at


# -- a peer with rotten bytes ------------------------------------------------------------------


def _flip_bytes(path: Path, offset: int, count: int) -> None:
    with open(path, "r+b") as file:
        file.seek(offset)
        good = file.read(count)
        file.seek(offset)
        file.write(bytes(b ^ 0xFF for b in good))


async def test_peer_with_a_corrupted_blob_is_banned_and_the_pull_succeeds(
    origin: OriginRegistry,
    image_factory: ImageFactory,
    start_agent: AgentStarter,
    nursery: trio.Nursery,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A seeds a layer; its stored file is damaged behind its back in piece 3. B downloads from
    A (the only peer), gets good pieces, rejects piece 3, bans A, and fetches the rest from the
    origin once the lease is free. Nothing A sent wrong ends up in B's content."""
    caplog.set_level(logging.WARNING, "agent.swarm")
    image = image_factory("team/rotten", layer_sizes=(10 * MiB + 1, 40 * 1024))
    big = image.layers[0]
    digest = Digest.parse(big.digest)
    proxy = await nursery.start(run_fault_proxy, origin.url)
    tracker, (seeder, puller) = await start_swarm(
        nursery, start_agent, tmp_path, proxy.url, 2, lease_ttl=2.0
    )
    with trio.fail_after(60):
        assert await pull_image(seeder.registry_url, "team/rotten", image) == expected_digests(
            image
        )
        # The pull returns once the bytes are streamed; the agent commits the blob to its
        # store just after (verify, then rename), so damage it only once it is there.
        await wait_until(lambda: seeder.store.has(digest))
        _flip_bytes(seeder.store.blob_path(digest), 3 * MiB + 1000, 16)  # inside piece 3
        # Someone else is fetching this blob from the origin (a lease B cannot get for now),
        # so B must go to its peers, of which A is the only one.
        async with TrackerClient([tracker.url], secrets.token_bytes(16), SECRET) as other:
            lease = await other.acquire_lease(digest)
        assert lease.granted or lease.holder == seeder.peer_id
        fetches_before = proxy.count(f"/blobs/{big.digest}$", "GET")
        result = await pull_image(puller.registry_url, "team/rotten", image)
    assert result == expected_digests(image)
    assert seeder.peer_id in coordinator_of(puller).banned
    assert any("sent a bad piece 3" in r.getMessage() for r in caplog.records)
    # Good pieces came from A before the bad one (piece 0 first: the one-piece streaming window),
    # and the origin sent only the rest, from the first byte B lacked, at a piece boundary.
    assert peer_server_of(seeder).pieces_served >= 2
    fetches = proxy.records(f"/blobs/{big.digest}$", "GET")[fetches_before:]
    assert len(fetches) == 1, fetches
    requested = fetches[0].headers.get("range", "")
    assert requested.startswith("bytes=") and requested.endswith("-"), requested
    start = int(requested[len("bytes=") : -1])
    assert start % MiB == 0 and MiB <= start <= 3 * MiB, requested
    # Pieces past the bad one that B already had from A can end the origin stream early.
    assert 0 < fetches[0].body_bytes_sent <= big.size - start


# -- strangers on the peer port ----------------------------------------------------------------

_FRAME_LENGTH = struct.Struct(">I")
_REFUSED = ("hello", "auth", "error")  # the most a refused dialer may ever see


def _frame_types(data: bytes) -> list[str]:
    types = []
    while data:
        (length,) = _FRAME_LENGTH.unpack_from(data)
        types.append(msgpack.unpackb(data[4 : 4 + length], raw=False)["t"])
        data = data[4 + length :]
    return types


async def _read_until_hangup(stream: trio.SocketStream, received: bytearray) -> None:
    with trio.fail_after(10):
        while True:
            try:
                data = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                return  # a reset: the agent closed with our bytes unread
            if not data:
                return
            received += data


async def _replay(port: int, opening: bytes) -> list[str]:
    """Send ``opening`` at once, read until the agent hangs up; the frame types it sent."""
    received = bytearray()
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all(opening)
        await _read_until_hangup(stream, received)
    return _frame_types(bytes(received))


async def _stranger(port: int, secret: bytes, then: bytes) -> list[str]:
    """Hello, then an auth made with ``secret`` for the agent's nonce, then ``then``; the frame
    types the agent sent before it hung up."""
    conn = PeerConnection(Role.DIALER, secrets.token_bytes(16), secret, secrets.token_bytes(32))
    received = bytearray()
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all(conn.initiate())
        with trio.fail_after(10):
            while (event := conn.next_event()) is NEED_DATA:
                data = await stream.receive_some(65536)
                received += data
                conn.receive_data(data)
        assert isinstance(event, Hello)
        auth = conn.data_to_send()  # the agent's hello made the codec answer with our MAC
        assert auth
        await stream.send_all(auth + then)
        await _read_until_hangup(stream, received)
    return _frame_types(bytes(received))


async def _legit_handshake(port: int, digest: Digest) -> tuple[bytes, list[object]]:
    """A dialer with the cluster secret says Interest; the bytes it sent, the events it got."""
    conn = PeerConnection(Role.DIALER, secrets.token_bytes(16), SECRET, secrets.token_bytes(32))
    sent = bytearray()
    events: list[object] = []
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        sent += conn.initiate()
        await stream.send_all(bytes(sent))
        with trio.fail_after(10):
            while not events or not isinstance(events[-1], BitfieldMsg):
                event = conn.next_event()
                if out := conn.data_to_send():
                    sent += out
                    await stream.send_all(out)
                if event is NEED_DATA:
                    conn.receive_data(await stream.receive_some(65536))
                    continue
                events.append(event)
                if isinstance(event, Authenticated):
                    await stream.send_all(conn.send(Interest(digest)))
    return bytes(sent), events


async def test_peer_port_refuses_a_wrong_secret_and_a_replayed_handshake(
    origin: OriginRegistry,
    image_factory: ImageFactory,
    start_agent: AgentStarter,
    nursery: trio.Nursery,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Only hello and auth ever come back to a dialer that cannot prove the cluster secret on
    this connection's fresh nonce; an Interest sent right after is never answered."""
    caplog.set_level(logging.WARNING, "agent.peer_server")
    image = image_factory("team/guarded", layer_sizes=(2 * MiB + 5,))
    digest = Digest.parse(image.layers[0].digest)
    _, (agent,) = await start_swarm(nursery, start_agent, tmp_path, origin.url, 1)
    interest = encode(Interest(digest))
    with trio.fail_after(30):
        await pull_image(agent.registry_url, "team/guarded", image)

        # The control: the cluster secret gets in, and an Interest gets the stored blob's bitfield.
        legit, events = await _legit_handshake(agent.peer_port, digest)
        assert any(isinstance(e, Authenticated) for e in events), events
        assert isinstance(events[-1], BitfieldMsg) and events[-1].digest == digest, events
        assert "refused" not in caplog.text

        # The wrong secret.
        types = await _stranger(agent.peer_port, b"not-the-cluster-secret", interest)
        assert types[:2] == ["hello", "auth"] and set(types) <= set(_REFUSED), types
        await wait_until(lambda: "refused peer connection" in caplog.text, 5)
        assert "failed authentication" in caplog.text
        caplog.clear()

        # The legitimate dialer's hello and auth, replayed on a new connection: the agent's
        # fresh nonce makes the recorded MAC worthless.
        types = await _replay(agent.peer_port, legit + interest)
        assert types[:2] == ["hello", "auth"] and set(types) <= set(_REFUSED), types
        await wait_until(lambda: "refused peer connection" in caplog.text, 5)
        assert "failed authentication" in caplog.text


@pytest.mark.timeout(90)
async def test_blob_failing_its_digest_is_reported_and_fetched_again(
    origin: OriginRegistry,
    image_factory: ImageFactory,
    start_agent: AgentStarter,
    nursery: trio.Nursery,
    tmp_path: Path,
) -> None:
    """The origin fetcher got corrupt bytes and published piece hashes of them. Its blob fails
    the sha256: it reports, the tracker drops that metainfo (and quarantines the publisher), and
    the next pulls fetch clean bytes; no node ever caches or serves the corrupt blob."""
    from p2preg.digest import Digest
    from tests.support.fault_proxy import Fault, run_fault_proxy
    from tests.support.swarm_harness import start_swarm

    image = image_factory("team/badpublish", layer_sizes=(6 * MiB + 3,))
    layer = image.layers[0]
    good = layer.path.read_bytes()
    proxy = await nursery.start(run_fault_proxy, origin.url)
    tracker, (publisher, downloader) = await start_swarm(
        nursery, start_agent, tmp_path, proxy.url, 2
    )
    proxy.add_fault(Fault("corrupt", f"/blobs/{layer.digest}", after_bytes=2 * MiB + 17))
    url = f"/v2/team/badpublish/blobs/{layer.digest}"
    digest = Digest.parse(layer.digest)
    async with httpx.AsyncClient(timeout=30) as client:
        with trio.fail_after(30):
            await _expect_truncated(client, publisher.registry_url + url)
        # The publisher named itself: the metainfo it published is gone from the tracker.
        with trio.fail_after(10):
            while await tracker.running.store.get_metainfo(digest) is not None:  # noqa: ASYNC110
                await trio.sleep(0.05)
        assert not publisher.store.has(digest)
        # The fault was used up: the downloader (the publisher is quarantined for this blob)
        # takes the lease and gets the real bytes from the origin.
        with trio.fail_after(30):
            response = await client.get(downloader.registry_url + url)
        assert response.status_code == 200 and response.content == good
        with trio.fail_after(30):
            response = await client.get(publisher.registry_url + url)
        assert response.status_code == 200 and response.content == good
    assert proxy.count(f"/blobs/{layer.digest}", "GET") == 2


async def _expect_truncated(client: httpx.AsyncClient, url: str) -> None:
    with pytest.raises(httpx.HTTPError):
        response = await client.get(url)
        response.raise_for_status()
