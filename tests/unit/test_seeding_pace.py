"""A seeder re-announces each blob when the tracker's last answer for it says
(SwarmCoordinator.seed_forever; p2preg/announce_pacing.py): at the fixed 10 s of before, 1,000
nodes holding 100 blobs each asked 10,000 announces a second of one tracker, every second."""

from __future__ import annotations

import os
from pathlib import Path

import trio

from agent.content_store import ContentStore
from agent.peer_link import PeerIdentity
from agent.peer_server import PeerServer
from agent.swarm_coordinator import SwarmCoordinator
from p2preg.config import AgentConfig, TrackerConfig
from p2preg.digest import Digest
from p2preg.metainfo import MetaInfo
from p2preg.token_bucket import RateLimiter
from tracker.client import TrackerClient
from tracker.server import RunningTracker, run_tracker

SECRET = b"cluster-secret-0123456789abcdef"


async def test_each_blob_is_re_announced_at_the_interval_the_tracker_gave(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    # Seeders paced to 1 announce a second (a quarter of 4), from 0.2 s up (peer TTL 0.6 s).
    config = TrackerConfig(
        cluster_secret=SECRET, host="127.0.0.1", port=0, peer_ttl=0.6, announce_budget=4
    )
    running: RunningTracker = await nursery.start(run_tracker, config)
    announced: list[Digest] = []
    stored = [Digest.of_bytes(bytes([n])) for n in range(3)]
    infos = {d: MetaInfo.empty(d, 1, 64 * 1024).with_hashes([(0, b"h" * 16)]) for d in stored}
    peer_id = os.urandom(16)
    store = ContentStore.open(tmp_path / "store", 1 << 20)
    peer_server = PeerServer(peer_id, SECRET, store, RateLimiter(None), RateLimiter(None))
    identity = PeerIdentity(peer_id, SECRET, RateLimiter(None), RateLimiter(None))
    async with TrackerClient([running.url], peer_id, SECRET) as tracker:
        real_announce = tracker.announce

        async def counted(digest: Digest, **kwargs: object) -> object:
            announced.append(digest)
            return await real_announce(digest, **kwargs)  # type: ignore[arg-type]

        tracker.announce = counted  # type: ignore[method-assign]
        coordinator = SwarmCoordinator(AgentConfig(), tracker, identity, "h:1", peer_server)
        with trio.move_on_after(2.8):
            await coordinator.seed_forever(lambda: stored, infos.get, round_seconds=0.05)
    # At t = 0 each blob once (told 0.2, 1 and 2 s: 0, 1 and 2 seeders counted before it);
    # then each again once, told 3 s (3 seeders). Every round, as before: some 150 announces.
    assert set(announced[:3]) == set(stored)
    assert 6 <= len(announced) <= 8, announced
