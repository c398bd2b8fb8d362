"""Peers found by discovery, and asking them who holds a blob: the swarm without a tracker.

Discovery (agent/discovery.py) keeps the list of peer addresses current. When a blob is wanted
and no tracker is known (or none answers), the coordinator calls ``find_holders``: it dials up
to ``MAX_QUERIED`` of those peers at once, each connection authenticated by the cluster-secret
handshake (agent/peer_link.py) before anything else is said, asks ``Query([digest])``, and from a
holder ``GetMeta(digest)``. A peer that fails the handshake, or does not answer within the
query's deadline, is simply not a holder. The answer is the holders' addresses and the best
metainfo they gave (a complete one if any holder had it); the coordinator downloads from them
with the ordinary Swarm.

Querying every peer for every blob is fine for a LAN of tens of agents; fleets want a tracker.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import trio

from agent.peer_link import PeerGone, PeerIdentity, PeerLink
from p2preg.digest import Digest
from p2preg.errors import LocalProtocolError, RemoteProtocolError
from p2preg.metainfo import MetaInfo
from p2preg.wire import ConnectionClosed, Error, Event, GetMeta, Holdings, Meta, Query, Reject

log = logging.getLogger(__name__)

QUERY_TIMEOUT = 3.0  # the whole query, every peer included
CONNECT_TIMEOUT = 2.0
MAX_QUERIED = 32  # peers asked per blob
MAX_PARALLEL = 16  # connections open at once for one query
ENOUGH_HOLDERS = 8  # stop asking once this many holders (and a complete metainfo) are known


@dataclass(frozen=True, slots=True)
class Holders:
    """Who answered that they hold a blob (fully or partly), and its metainfo from one of them."""

    addresses: list[str]
    metainfo: MetaInfo | None
    asked: int


class PeerDirectory:
    def __init__(
        self,
        identity: PeerIdentity,
        own_address: str,
        *,
        query_timeout: float = QUERY_TIMEOUT,
        rng: random.Random | None = None,
    ) -> None:
        self._identity = identity
        self._own_address = own_address
        self._query_timeout = query_timeout
        self._rng = rng or random.Random()
        self._addresses: list[str] = []

    @property
    def addresses(self) -> list[str]:
        return list(self._addresses)

    def set_peers(self, addresses: Iterable[str]) -> None:
        """The peers discovery currently sees (``host:port``); replaces the previous list."""
        self._addresses = [a for a in dict.fromkeys(addresses) if a != self._own_address]

    async def find_holders(self, digest: Digest, banned: set[bytes] | None = None) -> Holders:
        """Ask the known peers whether they hold ``digest``; bounded by the query timeout."""
        banned = banned if banned is not None else set()
        candidates = list(self._addresses)
        self._rng.shuffle(candidates)
        candidates = candidates[:MAX_QUERIED]
        holders: list[str] = []
        best: MetaInfo | None = None
        limiter = trio.CapacityLimiter(MAX_PARALLEL)

        def need_meta() -> bool:
            return best is None or not best.complete

        async def ask(address: str, done: trio.CancelScope) -> None:
            nonlocal best
            async with limiter:
                try:
                    held, metainfo = await self._ask(address, digest, banned, need_meta)
                except (PeerGone, RemoteProtocolError, LocalProtocolError, ValueError) as exc:
                    log.info("peer %s did not answer about %s: %s", address, digest, exc)
                    return
            if not held:
                return
            holders.append(address)
            if metainfo is not None and need_meta():
                best = metainfo
            if len(holders) >= ENOUGH_HOLDERS and not need_meta():
                done.cancel()

        with trio.move_on_after(self._query_timeout):
            async with trio.open_nursery() as nursery:
                for address in candidates:
                    nursery.start_soon(ask, address, nursery.cancel_scope)
        return Holders(holders, best, len(candidates))

    async def _ask(
        self,
        address: str,
        digest: Digest,
        banned: set[bytes],
        need_meta: Callable[[], bool],
    ) -> tuple[bool, MetaInfo | None]:
        link = await self._identity.dial(address, connect_timeout=CONNECT_TIMEOUT)
        try:
            if link.peer_id == self._identity.peer_id or link.peer_id in banned:
                return False, None
            await link.send(Query((digest,)))
            holdings = await _next_answer(link)
            if not isinstance(holdings, Holdings) or digest not in holdings.digests:
                return False, None
            if not need_meta():
                return True, None
            await link.send(GetMeta(digest))
            answer = await _next_answer(link)
            if isinstance(answer, Meta) and answer.metainfo.digest == digest:
                return True, answer.metainfo
            return True, None
        finally:
            await link.aclose()


async def _next_answer(link: PeerLink) -> Event:
    """The next Holdings, Meta or Reject from the peer (other messages are skipped)."""
    while True:
        event = await link.receive()
        if isinstance(event, ConnectionClosed | Error):
            raise PeerGone(f"peer closed the connection ({event})")
        if isinstance(event, Holdings | Meta | Reject):
            return event
