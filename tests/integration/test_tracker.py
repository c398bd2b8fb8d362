"""The tracker over real HTTP on loopback, driven by TrackerClient (and raw requests for abuse).

Every tracker runs in the test's nursery (``nursery.start(run_tracker, ...)``) inside its own
cancel scope, so a test can stop one; everything stops when the test ends.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import msgpack
import pytest
import trio
import trio.testing

from p2preg.cluster_auth import authorization_header, client_mac, tracker_mac
from p2preg.config import TrackerConfig
from p2preg.digest import Digest
from p2preg.errors import TrackerAuthError, TrackerConflict, TrackerUnavailable
from p2preg.handout import LEECHER_LOAD_GRAIN
from p2preg.http_server import Request, Response, bound_port, serve_http
from p2preg.metainfo import MetaInfo
from tracker.client import TrackerClient
from tracker.server import RunningTracker, run_tracker

pytestmark = pytest.mark.timeout(60)

SECRET = b"cluster-secret-0123456789abcdef"
BLOB = Digest.of_bytes(b"layer")
OTHER_BLOB = Digest.of_bytes(b"other layer")
H1, H2 = b"\x01" * 16, b"\x02" * 16
MSGPACK = {"Content-Type": "application/msgpack"}


@dataclasses.dataclass
class Tracker:
    running: RunningTracker
    scope: trio.CancelScope

    @property
    def url(self) -> str:
        return self.running.url

    async def stop(self) -> None:
        self.scope.cancel()
        await trio.testing.wait_all_tasks_blocked()


TrackerStarter = Callable[..., Awaitable[Tracker]]


@pytest.fixture
async def start_tracker(nursery: trio.Nursery) -> AsyncIterator[TrackerStarter]:
    async def start(port: int = 0, **overrides: Any) -> Tracker:
        config = TrackerConfig(cluster_secret=SECRET, host="127.0.0.1", port=port, **overrides)
        scope = trio.CancelScope()

        async def run(*, task_status: trio.TaskStatus[RunningTracker]) -> None:
            with scope:
                await run_tracker(config, task_status=task_status)

        running: RunningTracker = await nursery.start(run)
        return Tracker(running, scope)

    yield start


@pytest.fixture
async def clients() -> AsyncIterator[Callable[..., TrackerClient]]:
    made: list[TrackerClient] = []

    def make(*urls: str, secret: bytes = SECRET, **kwargs: Any) -> TrackerClient:
        client = TrackerClient(list(urls), os.urandom(16), secret, **kwargs)
        made.append(client)
        return client

    try:
        yield make
    finally:
        for client in made:
            await client.aclose()


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(trust_env=False, timeout=5) as client:
        yield client


async def send(
    http: httpx.AsyncClient,
    url: str,
    method: str,
    path: str,
    body: object = None,
    token: bytes | None = None,
) -> tuple[int, Any]:
    """One request by hand: msgpack ``body`` (or raw bytes), msgpack answer."""
    headers = dict(MSGPACK)
    if token is not None:
        headers["Authorization"] = authorization_header(token)
    content = body if isinstance(body, bytes) else msgpack.packb(body)
    with trio.fail_after(10):
        response = await http.request(method, url + path, content=content, headers=headers)
    payload = None
    if response.headers.get("content-type") == "application/msgpack" and response.content:
        payload = msgpack.unpackb(response.content)
    return response.status_code, payload


async def raw_session(
    http: httpx.AsyncClient, url: str, peer_id: bytes
) -> tuple[bytes, dict[str, Any]]:
    """A handshake by hand; returns the token and the session request (to replay)."""
    status, answer = await send(http, url, "POST", "/v1/auth/challenge", {"peer_id": peer_id})
    assert status == 200
    nonce_t, nonce_c = answer["nonce_t"], os.urandom(32)
    request = {
        "peer_id": peer_id,
        "nonce_t": nonce_t,
        "nonce_c": nonce_c,
        "mac_c": client_mac(SECRET, peer_id, nonce_t, nonce_c),
    }
    status, answer = await send(http, url, "POST", "/v1/auth/session", request)
    assert status == 200, answer
    return answer["token"], request


# -- auth --------------------------------------------------------------------------------------


async def test_announce_returns_other_peers_not_self(start_tracker, clients) -> None:
    tracker = await start_tracker()
    a, b, c = clients(tracker.url), clients(tracker.url), clients(tracker.url)
    first = await a.announce(BLOB, addr="10.0.0.1:7000", zone="z1", complete=True, pieces=8)
    assert first.peers == [] and first.interval == 10.0 and first.tracker == tracker.url
    assert first.swarm == 1  # the announcer itself
    await b.announce(BLOB, addr="10.0.0.2:7000", zone="z1", complete=False, pieces=2)
    seen = await c.announce(BLOB, addr=":7000", zone="z2", complete=False, pieces=0)
    assert [(p.peer_id, p.addr, p.complete) for p in seen.peers] == [
        (a.peer_id, "10.0.0.1:7000", True),
        (b.peer_id, "10.0.0.2:7000", False),
    ]
    again = await a.announce(BLOB, addr="10.0.0.1:7000", zone="z1", complete=True, pieces=8)
    ids = {p.peer_id for p in again.peers}
    assert ids == {b.peer_id, c.peer_id}
    assert seen.swarm == again.swarm == 3
    # An empty host is filled in with the address the tracker sees.
    assert {p.addr for p in again.peers if p.peer_id == c.peer_id} == {"127.0.0.1:7000"}


async def test_wrong_secret_refused_with_a_clear_error(start_tracker, clients, http) -> None:
    tracker = await start_tracker()
    intruder = clients(tracker.url, secret=b"not-the-cluster-secret-at-all!!")
    with pytest.raises(TrackerAuthError, match="refused our cluster credentials"):
        await intruder.announce(BLOB, addr="10.0.0.9:7000", complete=False, pieces=0)
    # On the wire: the session request is a 401.
    peer_id = os.urandom(16)
    _, answer = await send(http, tracker.url, "POST", "/v1/auth/challenge", {"peer_id": peer_id})
    nonce_c = os.urandom(32)
    status, answer = await send(
        http,
        tracker.url,
        "POST",
        "/v1/auth/session",
        {
            "peer_id": peer_id,
            "nonce_t": answer["nonce_t"],
            "nonce_c": nonce_c,
            "mac_c": client_mac(b"w" * 32, peer_id, answer["nonce_t"], nonce_c),
        },
    )
    assert status == 401 and "cluster secret" in answer["error"]


async def test_replayed_session_request_refused(start_tracker, http) -> None:
    tracker = await start_tracker()
    peer_id = os.urandom(16)
    token, request = await raw_session(http, tracker.url, peer_id)
    status, answer = await send(http, tracker.url, "POST", "/v1/auth/session", request)
    assert status == 401 and "used or expired" in answer["error"]
    # The first session still works.
    body = {"digest": str(BLOB), "peer_id": peer_id, "addr": "h:1", "zone": "", "complete": True}
    status, _ = await send(http, tracker.url, "POST", "/v1/announce", {**body, "pieces": 1}, token)
    assert status == 200


async def test_every_endpoint_but_health_and_auth_needs_a_token(start_tracker, http) -> None:
    tracker = await start_tracker()
    status, health = await send(http, tracker.url, "GET", "/healthz")
    assert status == 200 and health["status"] == "ok"
    body = {"digest": str(BLOB), "peer_id": b"p" * 16}
    for method, path in [
        ("POST", "/v1/announce"),
        ("POST", "/v1/start"),
        ("GET", f"/v1/metainfo/{BLOB}"),
        ("PUT", f"/v1/metainfo/{BLOB}"),
        ("POST", "/v1/lease"),
        ("POST", "/v1/lease/release"),
        ("POST", "/v1/report-bad"),
    ]:
        for token in (None, b"\0" * 32):
            status, answer = await send(http, tracker.url, method, path, body, token)
            assert status == 401, (method, path)
            assert "token" in answer["error"]
    # A token is for its own peer id only.
    token, _ = await raw_session(http, tracker.url, b"m" * 16)
    announce = {**body, "addr": "h:1", "zone": "", "complete": True, "pieces": 1}
    status, answer = await send(http, tracker.url, "POST", "/v1/announce", announce, token)
    assert status == 403 and "peer_id" in answer["error"]


async def test_client_reauthenticates_after_a_tracker_restart(start_tracker, clients) -> None:
    tracker = await start_tracker()
    client = clients(tracker.url)
    await client.announce(BLOB, addr="10.0.0.1:7000", complete=True, pieces=1)
    old_token = client._tokens[tracker.url][0]
    await tracker.stop()
    # Same port, fresh state: the cached token is unknown there -> 401 -> new session.
    restarted = await start_tracker(port=tracker.running.port)
    result = await client.announce(BLOB, addr="10.0.0.1:7000", complete=True, pieces=1)
    assert result.tracker == restarted.url
    assert client._tokens[tracker.url][0] != old_token


async def test_the_swarm_count_goes_beyond_the_handout_limit(start_tracker, clients) -> None:
    """Agents size their limits by the whole swarm (p2preg.swarm_limits); a handout lists at
    most max_peers of it."""
    tracker = await start_tracker(max_peers=2)
    peers = [clients(tracker.url) for _ in range(5)]
    for i, client in enumerate(peers):
        answer = await client.announce(BLOB, addr=f"10.0.0.{i + 1}:7000", complete=False, pieces=0)
    assert len(answer.peers) == 2 and answer.swarm == 5
    other = await peers[0].announce(OTHER_BLOB, addr="10.0.0.1:7000", complete=False, pieces=0)
    assert other.swarm == 1  # counted per blob


async def test_the_tracker_paces_downloaders_and_seeders_by_the_records_it_tracks(
    start_tracker, clients, mock_clock: trio.testing.MockClock
) -> None:
    """p2preg/announce_pacing.py: each downloader is told the next free announce slot (all
    blobs), slots 1 / budget apart, a second away at least and a third of the peer TTL at
    most; seeders from that third up, within a quarter of the budget. The clock stands
    still, so the announces below all come at the same moment: a burst."""
    tracker = await start_tracker(announce_budget=2, peer_ttl=12.0)  # ceiling 4 s
    first = clients(tracker.url)
    answer = await first.announce(BLOB, addr="10.0.0.1:7000", complete=False, pieces=0)
    assert answer.pace == 1.0  # the calendar is empty: a second
    paces = []
    for i in range(2):
        other = clients(tracker.url)
        answer = await other.announce(
            OTHER_BLOB, addr=f"10.0.0.{i + 2}:7000", complete=False, pieces=0
        )
        paces.append(answer.pace)
    answer = await first.announce(BLOB, addr="10.0.0.1:7000", complete=False, pieces=1)
    paces.append(answer.pace)
    assert paces == [1.5, 2.0, 2.5]  # the next free slots, half a second apart, both blobs
    for i in range(10):
        other = clients(tracker.url)
        answer = await other.announce(BLOB, addr=f"10.0.1.{i + 1}:7000", complete=False, pieces=0)
        paces.append(answer.pace)
    # ... up to a third of the TTL; the rest of the burst comes back at it
    assert paces[3:6] == [3.0, 3.5, 4.0] and paces[6:] == [4.0] * 7
    assert answer.interval == 4.0
    # Seeders are paced too, to a quarter of the budget (0.5 a second here), from a third of
    # the TTL up, and book no slot of the downloaders'.
    for i in range(4):
        seeder = clients(tracker.url)
        answer = await seeder.announce(
            OTHER_BLOB, addr=f"10.0.2.{i + 1}:7000", complete=True, pieces=1
        )
    assert answer.interval == 6.0  # the 3 complete records before it / 0.5 a second
    mock_clock.jump(60.0)  # the calendar has room again
    answer = await first.announce(BLOB, addr="10.0.0.1:7000", complete=False, pieces=2)
    assert answer.pace == 1.0


async def test_a_small_swarms_often_handed_out_leecher_gives_way(start_tracker, clients) -> None:
    """In a swarm of at most LARGE_SWARM_PEERS others (p2preg.swarm_limits), the tracker
    ranks leechers by how often it handed them out before their pieces: the node that
    started first holds the most pieces, and listed first to everyone it would get every
    downloader (p2preg.handout). The tracker must pass its swarm count for that."""
    tracker = await start_tracker(max_peers=2)
    first = clients(tracker.url)
    await first.announce(BLOB, addr="10.0.0.1:7000", complete=False, pieces=100)
    for i in range(3):
        later = clients(tracker.url)
        await later.announce(BLOB, addr=f"10.0.0.{i + 2}:7000", complete=False, pieces=1)
    asker = clients(tracker.url)
    answers = []
    for _ in range(2 * LEECHER_LOAD_GRAIN):
        answer = await asker.announce(BLOB, addr="10.0.0.9:7000", complete=False, pieces=0)
        answers.append([peer.peer_id for peer in answer.peers])
    assert answers[0][0] == first.peer_id  # most pieces, and nobody was handed out yet
    assert any(first.peer_id not in peers for peers in answers)  # (pieces first: never)


async def test_client_refuses_a_tracker_that_does_not_know_the_secret(
    clients, nursery: trio.Nursery
) -> None:
    async def impostor(request: Request) -> Response:
        answers = {
            "/v1/auth/challenge": {"nonce_t": os.urandom(32), "expires_in": 30},
            "/v1/auth/session": {"token": os.urandom(32), "expires_in": 600, "mac_t": b"x" * 32},
        }
        body = answers.get(request.target, {"peers": [], "interval": 10})
        return Response(200, [("Content-Type", "application/msgpack")], msgpack.packb(body))

    listeners = await nursery.start(serve_http, "127.0.0.1", 0, impostor)
    client = clients(f"http://127.0.0.1:{bound_port(listeners)}")
    with pytest.raises(TrackerAuthError, match="could not prove it knows the cluster secret"):
        await client.announce(BLOB, addr="h:1", complete=False, pieces=0)


def _tracker_answering(
    announce_answer: dict[str, Any], delay: float = 0.0
) -> Callable[[Request], Awaitable[Response]]:
    """A stand-in tracker that knows the secret and answers every announce with
    ``announce_answer`` (an older tracker, or a broken one), each call ``delay`` late."""
    nonces: dict[bytes, bytes] = {}

    async def handle(request: Request) -> Response:
        await trio.sleep(delay)
        body = msgpack.unpackb(request.body) if request.body else {}
        if request.target == "/v1/auth/challenge":
            nonces[body["peer_id"]] = nonce_t = os.urandom(32)
            answer: dict[str, Any] = {"nonce_t": nonce_t, "expires_in": 30}
        elif request.target == "/v1/auth/session":
            token = os.urandom(32)
            peer_id = body["peer_id"]
            mac_t = tracker_mac(SECRET, peer_id, body["nonce_c"], nonces[peer_id], token)
            answer = {"token": token, "expires_in": 600, "mac_t": mac_t}
        else:
            answer = announce_answer
        return Response(200, [("Content-Type", "application/msgpack")], msgpack.packb(answer))

    return handle


async def test_an_older_tracker_that_does_not_pace_leaves_the_pace_unset(
    clients, nursery: trio.Nursery
) -> None:
    """The agent then announces every second, as before pacing (agent/swarm_coordinator.py)."""
    older = _tracker_answering({"peers": [], "interval": 10, "swarm": 3})
    listeners = await nursery.start(
        functools.partial(serve_http, max_body=4096), "127.0.0.1", 0, older
    )
    client = clients(f"http://127.0.0.1:{bound_port(listeners)}")
    answer = await client.announce(BLOB, addr="h:1", complete=False, pieces=0)
    assert answer.pace is None and answer.swarm == 3


@pytest.mark.parametrize("pace", [0, -1.0, float("nan"), "1", True])
async def test_a_bad_pace_is_refused_not_obeyed(clients, nursery: trio.Nursery, pace: Any) -> None:
    broken = _tracker_answering({"peers": [], "interval": 10, "pace": pace})
    listeners = await nursery.start(
        functools.partial(serve_http, max_body=4096), "127.0.0.1", 0, broken
    )
    client = clients(f"http://127.0.0.1:{bound_port(listeners)}")
    with pytest.raises(TrackerUnavailable, match="bad pace"):
        await client.announce(BLOB, addr="h:1", complete=False, pieces=0)


async def test_a_slow_answer_is_waited_for_not_failed_over(clients, nursery: trio.Nursery) -> None:
    """A tracker that took the request is busy, not down: with a 0.2 s connect deadline the
    answer that takes 0.6 s still counts. Failing over (and then pulling from the origin) is
    what turned 10,000 agents starting at once into a stampede (bench_tracker --storm)."""
    busy = _tracker_answering({"peers": [], "interval": 10, "swarm": 7}, delay=0.6)
    listeners = await nursery.start(
        functools.partial(serve_http, max_body=4096), "127.0.0.1", 0, busy
    )
    client = clients(f"http://127.0.0.1:{bound_port(listeners)}", timeout=0.2)
    assert client.answer_timeout == 30.0
    with trio.fail_after(10):
        answer = await client.announce(BLOB, addr="h:1", complete=False, pieces=0)
    assert answer.swarm == 7


async def test_a_pace_beyond_an_hour_is_taken_as_an_hour(clients, nursery: trio.Nursery) -> None:
    slow = _tracker_answering({"peers": [], "interval": 10, "pace": 1e9})
    listeners = await nursery.start(
        functools.partial(serve_http, max_body=4096), "127.0.0.1", 0, slow
    )
    client = clients(f"http://127.0.0.1:{bound_port(listeners)}")
    answer = await client.announce(BLOB, addr="h:1", complete=False, pieces=0)
    assert answer.pace == 3600.0


# -- metainfo ----------------------------------------------------------------------------------


async def test_metainfo_put_get_merge_and_conflict(start_tracker, clients, http) -> None:
    tracker = await start_tracker()
    a, b = clients(tracker.url), clients(tracker.url)
    assert await a.get_metainfo(BLOB) is None
    empty = MetaInfo.empty(BLOB, 3 * 65536, 65536)
    merged = await a.put_metainfo(empty.with_hashes([(0, H1)]))
    assert merged.piece_hashes == (H1, None, None)
    merged = await b.put_metainfo(empty.with_hashes([(2, H2)]))
    assert merged.piece_hashes == (H1, None, H2)
    assert await a.get_metainfo(BLOB) == merged
    with pytest.raises(TrackerConflict, match="conflicting hash for piece 0"):
        await b.put_metainfo(empty.with_hashes([(0, H2)]))
    assert await b.get_metainfo(BLOB) == merged
    # The path's digest must match the body's.
    token, _ = await raw_session(http, tracker.url, b"q" * 16)
    other = Digest.of_bytes(b"other")
    status, answer = await send(
        http, tracker.url, "PUT", f"/v1/metainfo/{other}", empty.to_wire(), token
    )
    assert status == 400 and "not" in answer["error"]


async def test_report_bad_drops_metainfo_and_quarantines(start_tracker, clients) -> None:
    tracker = await start_tracker()
    publisher, reporter = clients(tracker.url), clients(tracker.url)
    await publisher.put_metainfo(MetaInfo.empty(BLOB, 65536, 65536).with_hashes([(0, H1)]))
    assert (await publisher.acquire_lease(BLOB)).granted
    assert await reporter.report_bad(BLOB, publisher.peer_id) is True
    assert await reporter.get_metainfo(BLOB) is None
    assert (await reporter.acquire_lease(BLOB)).granted  # the publisher's lease is gone
    with pytest.raises(TrackerConflict, match="quarantined"):
        await publisher.put_metainfo(MetaInfo.empty(BLOB, 65536, 65536))


# -- leases ------------------------------------------------------------------------------------


async def test_leases_over_http(start_tracker, clients) -> None:
    tracker = await start_tracker(lease_ttl=10.0)
    a, b, c = clients(tracker.url), clients(tracker.url), clients(tracker.url)
    first = await a.acquire_lease(BLOB, (0, 8))
    assert first.granted and first.holder == a.peer_id and (first.start, first.end) == (0, 8)
    assert 9.0 < first.expires_in <= 10.0
    blocked = await b.acquire_lease(BLOB)
    assert not blocked.granted and blocked.holder == a.peer_id and blocked.end == 8
    second = await b.acquire_lease(BLOB, (8, None))
    assert second.granted and (second.start, second.end) == (8, None)
    third = await c.acquire_lease(BLOB, (3, 4))
    assert not third.granted and third.holder == a.peer_id
    assert (await a.acquire_lease(BLOB, (0, 8))).granted  # renewal
    assert await a.release_lease(BLOB) == 1
    assert (await c.acquire_lease(BLOB, (0, 8))).granted


# -- a pull's start ----------------------------------------------------------------------------


async def test_a_pull_starts_with_one_call_metainfo_lease_and_announce(
    start_tracker, clients
) -> None:
    """POST /v1/start answers what a pull asked in three calls: the metainfo, the lease
    unless the swarm holds the whole blob, and an announce with no pieces."""
    tracker = await start_tracker()
    a, b, c = clients(tracker.url), clients(tracker.url), clients(tracker.url)
    refused = clients(tracker.url)
    with pytest.raises(TrackerUnavailable, match="400"):  # a bad field: a start that holds
        await refused.start_pull(BLOB, addr="no-port")  # nothing, the lease included
    first = await a.start_pull(BLOB, addr="10.0.0.1:7000", zone="z1")
    assert first.metainfo is None  # nobody published yet
    assert first.lease is not None and first.lease.granted and first.lease.holder == a.peer_id
    assert first.announce.peers == [] and first.announce.swarm == 1
    assert first.announce.pace == 1.0
    second = await b.start_pull(BLOB, addr="10.0.0.2:7000", zone="z1")
    assert second.lease is not None and not second.lease.granted
    assert second.lease.holder == a.peer_id  # ask the fetcher
    [peer] = second.announce.peers  # the first starter was announced, with no pieces
    assert (peer.peer_id, peer.addr, peer.complete, peer.pieces) == (
        a.peer_id,
        "10.0.0.1:7000",
        False,
        0,
    )
    # Once the swarm holds the whole blob, a latecomer gets the metainfo and no lease.
    whole = MetaInfo.empty(BLOB, 65536, 65536).with_hashes([(0, H1)])
    await a.put_metainfo(whole)
    await a.announce(BLOB, addr="10.0.0.1:7000", zone="z1", complete=True, pieces=1)
    late = await c.start_pull(BLOB, addr="10.0.0.3:7000")
    assert late.metainfo == whole and late.lease is None
    assert {p.peer_id for p in late.announce.peers} == {a.peer_id, b.peer_id}
    assert late.announce.swarm == 3


async def test_a_tracker_before_the_start_call_gets_the_three_calls(
    clients, nursery: trio.Nursery
) -> None:
    """An older tracker answers 404 to /v1/start: the client asks the metainfo, the lease
    and an announce instead, and the pull starts the same."""
    asked: list[str] = []
    nonces: dict[bytes, bytes] = {}
    holder = b"h" * 16

    async def older(request: Request) -> Response:
        asked.append(request.target)
        body = msgpack.unpackb(request.body) if request.body else {}
        answer: dict[str, Any]
        if request.target == "/v1/auth/challenge":
            nonces[body["peer_id"]] = nonce_t = os.urandom(32)
            answer = {"nonce_t": nonce_t, "expires_in": 30}
        elif request.target == "/v1/auth/session":
            token, peer_id = os.urandom(32), body["peer_id"]
            mac_t = tracker_mac(SECRET, peer_id, body["nonce_c"], nonces[peer_id], token)
            answer = {"token": token, "expires_in": 600, "mac_t": mac_t}
        elif request.target.startswith("/v1/metainfo/"):
            return Response(404, [("Content-Type", "application/msgpack")], msgpack.packb({}))
        elif request.target == "/v1/lease":
            answer = {"granted": False, "holder": holder, "start": 0, "end": None}
            answer["expires_in"] = 5.0
        elif request.target == "/v1/announce":
            assert body["pieces"] == 0 and body["complete"] is False
            answer = {"peers": [], "interval": 10, "swarm": 2}
        else:
            return Response(404, [("Content-Type", "application/msgpack")], msgpack.packb({}))
        return Response(200, [("Content-Type", "application/msgpack")], msgpack.packb(answer))

    listeners = await nursery.start(
        functools.partial(serve_http, max_body=4096), "127.0.0.1", 0, older
    )
    client = clients(f"http://127.0.0.1:{bound_port(listeners)}")
    started = await client.start_pull(BLOB, addr="h:1")
    assert started.metainfo is None and started.announce.swarm == 2
    assert started.lease is not None and started.lease.holder == holder
    assert [t for t in asked if not t.startswith("/v1/auth/")] == [
        "/v1/start",
        f"/v1/metainfo/{BLOB}",
        "/v1/lease",
        "/v1/announce",
    ]


# -- several trackers --------------------------------------------------------------------------


async def test_rendezvous_splits_digests_and_fails_over(start_tracker, clients) -> None:
    one, two = await start_tracker(), await start_tracker()
    client = clients(one.url, two.url)
    digests = [Digest.of_bytes(bytes([n])) for n in range(40)]
    home = {d: client.trackers_for(d)[0] for d in digests}
    assert set(home.values()) == {one.url, two.url}
    # Another client (another agent) agrees on every digest.
    other = clients(two.url, one.url)
    assert all(other.trackers_for(d)[0] == home[d] for d in digests)
    for d in digests:
        result = await client.announce(d, addr="10.0.0.1:7000", complete=True, pieces=1)
        assert result.tracker == home[d]
    now = trio.current_time()
    for tracker in (one, two):
        for d in digests:
            held = await tracker.running.store.peers(d, now)
            assert bool(held) == (home[d] == tracker.url)

    await one.stop()
    with trio.fail_after(20):
        for d in digests:
            result = await client.announce(d, addr="10.0.0.1:7000", complete=True, pieces=1)
            assert result.tracker == two.url
    # The stopped tracker is asked last for a while, even for its own digests.
    moved = next(d for d in digests if home[d] == one.url)
    assert client.trackers_for(moved) == [two.url, one.url]

    await two.stop()
    with pytest.raises(TrackerUnavailable, match="no tracker answered"):
        await client.get_metainfo(moved)


async def test_failover_on_5xx_and_on_a_tracker_that_never_answers(
    start_tracker, clients, nursery: trio.Nursery
) -> None:
    good = await start_tracker()

    async def broken(request: Request) -> Response:
        return Response(503, [("Content-Type", "text/plain")], b"down for maintenance\n")

    async def silent(request: Request) -> Response:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    for handler in (broken, silent):
        port = bound_port(await nursery.start(serve_http, "127.0.0.1", 0, handler))
        bad_url = f"http://127.0.0.1:{port}"
        client = clients(bad_url, good.url, timeout=0.5, answer_timeout=0.5)
        digest = next(
            d
            for d in (Digest.of_bytes(bytes([n])) for n in range(100))
            if client.trackers_for(d)[0] == bad_url
        )
        with trio.fail_after(10):
            result = await client.announce(digest, addr="h:1", complete=False, pieces=0)
        assert result.tracker == good.url
        assert client.trackers_for(digest)[0] == good.url


# -- abuse -------------------------------------------------------------------------------------


async def test_malformed_requests_get_400_and_the_tracker_keeps_serving(
    start_tracker, clients, http
) -> None:
    tracker = await start_tracker(max_body=64 * 1024)
    peer_id = os.urandom(16)
    token, _ = await raw_session(http, tracker.url, peer_id)
    good = {
        "digest": str(BLOB),
        "peer_id": peer_id,
        "addr": "10.0.0.1:7000",
        "zone": "z",
        "complete": False,
        "pieces": 3,
    }
    cases: list[tuple[str, str, object, str]] = [
        ("POST", "/v1/announce", b"\xc1\xc1 not msgpack", "msgpack"),
        ("POST", "/v1/announce", b"", "empty"),
        ("POST", "/v1/announce", [1, 2, 3], "map"),
        ("POST", "/v1/announce", {**good, "digest": "sha256:nothex"}, "digest"),
        ("POST", "/v1/announce", {**good, "digest": 7}, "digest"),
        ("POST", "/v1/announce", {**good, "pieces": -1}, "pieces"),
        ("POST", "/v1/announce", {**good, "pieces": True}, "pieces"),
        ("POST", "/v1/announce", {**good, "complete": "yes"}, "complete"),
        ("POST", "/v1/announce", {**good, "addr": "no-port"}, "addr"),
        # digits str.isdigit() accepts and int() refuses, and more than int() reads
        ("POST", "/v1/announce", {**good, "addr": "10.0.0.1:\u00b2"}, "addr"),
        ("POST", "/v1/announce", {**good, "addr": "10.0.0.1:" + "7" * 5000}, "addr"),
        ("POST", "/v1/announce", {**good, "zone": "z" * 1000}, "zone"),
        ("POST", "/v1/announce", {k: v for k, v in good.items() if k != "addr"}, "addr"),
        ("POST", "/v1/start", {**good, "digest": "sha256:nothex"}, "digest"),
        ("POST", "/v1/start", {**good, "zone": 5}, "zone"),
        ("POST", "/v1/lease", {**good, "start": 5, "end": 5}, "end"),
        ("POST", "/v1/lease", {**good, "start": "0"}, "start"),
        ("POST", "/v1/report-bad", {"digest": str(BLOB), "publisher": b"short"}, "publisher"),
        ("PUT", f"/v1/metainfo/{BLOB}", {"d": str(BLOB), "s": 1, "p": 3, "h": []}, "metainfo"),
        ("GET", "/v1/metainfo/latest", None, "digest"),
        ("POST", "/v1/auth/challenge", {"peer_id": "text"}, "peer_id"),
        ("POST", "/v1/auth/session", {1: 2}, "msgpack"),
    ]
    for method, path, body, needle in cases:
        status, answer = await send(http, tracker.url, method, path, body, token)
        assert status == 400, (path, body, answer)
        assert needle in answer["error"], (needle, answer)
    assert (await send(http, tracker.url, "GET", "/v2/nothing"))[0] == 404
    assert (await send(http, tracker.url, "DELETE", "/v1/announce", token=token))[0] == 405

    # A body over the bound: 413 before it is read.
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", tracker.running.port)
        async with stream:
            await stream.send_all(
                b"POST /v1/announce HTTP/1.1\r\nHost: t\r\nContent-Length: 999999999\r\n\r\n"
            )
            reply = await stream.receive_some(4096)
    assert reply.startswith(b"HTTP/1.1 413")
    # Not HTTP at all.
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", tracker.running.port)
        async with stream:
            await stream.send_all(b"\x16\x03\x01 hello, TLS?\r\n\r\n")
            reply = await stream.receive_some(4096)
    assert reply.startswith(b"HTTP/1.1 400")

    # Still serving, and the good request works.
    client = clients(tracker.url)
    await client.announce(BLOB, addr="10.0.0.2:7000", complete=True, pieces=3)
    status, answer = await send(http, tracker.url, "POST", "/v1/announce", good, token)
    assert status == 200 and [p["addr"] for p in answer["peers"]] == ["10.0.0.2:7000"]


def _counted_handshakes(client: TrackerClient) -> list[str]:
    """The trackers ``client`` opens a session with from now on, one entry per handshake."""
    handshakes: list[str] = []
    authenticate = client._authenticate

    async def counted(url: str) -> tuple[bytes, float]:
        handshakes.append(url)
        return await authenticate(url)

    client._authenticate = counted  # type: ignore[method-assign]
    return handshakes


async def test_sessions_are_kept_open_so_a_pull_starts_without_a_handshake(
    start_tracker, clients, nursery: trio.Nursery
) -> None:
    """TrackerClient.keep_sessions renews the session in the second half of its life, so the
    calls of a pull need no challenge and session first (docs/tracker.md, "A rollout's
    start": 28% of the tracker's CPU per start)."""
    tracker = await start_tracker(session_ttl=2.0)  # the client renews within 0.5-1 s
    client = clients(tracker.url)
    handshakes = _counted_handshakes(client)
    nursery.start_soon(functools.partial(client.keep_sessions, first_within=0.0))
    await trio.sleep(3.0)
    assert 3 <= len(handshakes) <= 8  # renewed, not hammered
    before = len(handshakes)
    await client.announce(BLOB, addr="10.0.0.1:7000", complete=False, pieces=0)
    assert len(handshakes) == before


async def test_keeping_sessions_with_a_tracker_that_is_down_retries_slowly(
    clients, nursery: trio.Nursery
) -> None:
    client = clients("http://127.0.0.1:9", down_for=1.0, timeout=0.5)  # nothing listens
    attempts = _counted_handshakes(client)
    nursery.start_soon(functools.partial(client.keep_sessions, first_within=0.0))
    await trio.sleep(2.0)
    assert 1 <= len(attempts) <= 4  # every 0.5-1.5 s, not in a loop
