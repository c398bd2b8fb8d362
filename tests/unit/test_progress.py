"""A downloader tells the peers it has requests at how many pieces it holds (the progress
message, agent/swarm.py), so that they can serve the neediest first (p2preg.upload_order)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import trio.testing

from agent.swarm import PROGRESS_INTERVAL, Swarm, _Peer
from p2preg.swarm_limits import LARGE_SWARM_PEERS
from p2preg.wire import Message, Progress, Request
from tests.support.swarm_alone import swarm_alone

PIECE = 256 * 1024


class RecordingLink:
    """Stands in for a PeerLink: keeps what the swarm sends."""

    address = "10.0.0.9:7000"

    def __init__(self) -> None:
        self.sent: list[Message] = []

    async def send(self, message: Message) -> None:
        self.sent.append(message)

    async def send_many(self, messages: Iterable[Message]) -> None:
        self.sent.extend(messages)


def _progress(link: RecordingLink) -> list[int]:
    return [m.held for m in link.sent if isinstance(m, Progress)]


async def test_progress_goes_when_the_count_changed_at_most_every_interval(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    async with swarm_alone(tmp_path, 4, PIECE) as (swarm, data):
        swarm.note_swarm_size(15)  # small: uploaders read the count
        link = RecordingLink()
        peer = _Peer(link)  # type: ignore[arg-type]
        await _fill(swarm, peer)  # first requests: the count goes first
        assert _progress(link) == [0]
        assert isinstance(link.sent[1], Request)
        await swarm._tell_progress(peer)  # nothing changed: nothing sent
        assert _progress(link) == [0]
        assert await swarm.assembly.write_piece(0, data[:PIECE])
        await swarm._tell_progress(peer)  # changed, but told a moment ago
        assert _progress(link) == [0]
        mock_clock.jump(PROGRESS_INTERVAL)
        await swarm._tell_progress(peer)
        assert _progress(link) == [0, 1]


async def test_progress_goes_in_a_large_swarm_too(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    async with swarm_alone(tmp_path, 4, PIECE) as (swarm, _):
        swarm.note_swarm_size(LARGE_SWARM_PEERS + 1)  # (uploaders read the count at any size)
        link = RecordingLink()
        peer = _Peer(link)  # type: ignore[arg-type]
        await _fill(swarm, peer)
        assert _progress(link) == [0] and any(isinstance(m, Request) for m in link.sent)


async def _fill(swarm: Swarm, peer: Any) -> None:
    """Connect ``peer`` holding every piece and let the swarm request from it."""
    peer.held = set(range(swarm.picker.num_pieces))
    swarm.peers[b"p" * 16] = peer
    swarm.picker.add_peer(peer.held)
    peer.counted = True
    await swarm._fill(peer)
