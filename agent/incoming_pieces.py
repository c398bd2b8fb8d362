"""How many pieces this agent is receiving at once, and telling its peers when that makes it busy.

Each sender grants its upload slots on its own, so without this some downloaders received pieces
from five or six senders at once, splitting their downlink between them (and idling those
senders' uplinks), while others, their requests queued behind, received nothing. A downloader
that receives ``BUSY_INCOMING_PIECES`` pieces at once (over all its download connections, all
blobs: they share one downlink) says it is busy; the peers it has requests waiting at then serve
requesters that are not busy first (p2preg.upload_order, where the measurements are).

The flag must be fresh to help: ranked by a count up to 50 ms old, half the gain was gone in
the simulator. So a change is sent at once to every download connection that has requests out
(the only ones whose sender ranks us), one task per connection being told (a peer that stops
reading holds up only its own), and it rides along with new requests to the others
(agent/swarm.py). A connection remembers what its peer was last told (``told_busy``), so nothing
is sent twice.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import trio

from agent.peer_link import PeerGone
from p2preg.errors import LocalProtocolError
from p2preg.upload_order import BUSY_INCOMING_PIECES
from p2preg.wire import Busy

if TYPE_CHECKING:
    from agent.peer_link import PeerLink

log = logging.getLogger(__name__)


class IncomingPieces:
    """Counts the pieces arriving now (PeerLink reports each start and end) and keeps the
    download connections' peers told whether this agent is busy."""

    def __init__(self, busy_at: int = BUSY_INCOMING_PIECES) -> None:
        if busy_at < 1:
            raise ValueError("busy_at must be at least 1")
        self.arriving = 0
        self.busy = False
        self._busy_at = busy_at
        # download connection -> whether we have requests out there (its sender ranks them)
        self._links: dict[PeerLink, Callable[[], bool]] = {}
        self._telling: set[PeerLink] = set()  # a task is sending to these
        self._changed = trio.Event()
        self.messages_sent = 0  # busy messages run() sent (logged as each swarm ends)

    def piece_started(self) -> None:
        self.arriving += 1
        if not self.busy and self.arriving >= self._busy_at:
            self.busy = True
            self._changed.set()

    def piece_ended(self) -> None:
        self.arriving -= 1
        if self.busy and self.arriving < self._busy_at:
            self.busy = False
            self._changed.set()

    def watch(self, link: PeerLink, has_requests: Callable[[], bool]) -> None:
        """``link`` downloads from its peer; ``has_requests()``: we have requests out there."""
        self._links[link] = has_requests

    def unwatch(self, link: PeerLink) -> None:
        self._links.pop(link, None)

    def due(self, link: PeerLink) -> Busy | None:
        """The busy message ``link``'s peer has not heard yet (marked as told), or None."""
        if link.told_busy == self.busy:
            return None
        link.told_busy = self.busy
        return Busy(self.busy)

    async def run(self) -> None:
        """Tell every watched connection with requests out each change, as it happens."""
        async with trio.open_nursery() as nursery:
            while True:
                await self._changed.wait()
                self._changed = trio.Event()
                for link, has_requests in list(self._links.items()):
                    # (one without requests out is told along with its next ones, Swarm._fill)
                    if link.told_busy != self.busy and link not in self._telling and has_requests():
                        self._telling.add(link)
                        nursery.start_soon(self._tell, link)

    async def _tell(self, link: PeerLink) -> None:
        try:
            while (message := self.due(link)) is not None:  # (until it heard the latest)
                await link.send(message)
                self.messages_sent += 1
        except (PeerGone, LocalProtocolError) as exc:  # (the connection's own task ends it)
            log.debug("busy message to %s: %r", link.address, exc)
        finally:
            self._telling.discard(link)
