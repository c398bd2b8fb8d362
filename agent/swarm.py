"""Fetches one blob's pieces from other agents: the downloading half of the peer protocol.

One ``Swarm`` per blob being downloaded. Its state (the piece picker, each peer's bitfield and
requests in flight) changes only in plain methods that never await, called from this swarm's own
tasks, so trio's cooperative scheduling makes every change atomic: one writer, as in Kraken's
scheduler. IO happens in one task per peer connection (dial, handshake, read events) and one
ticker task (send requests, detect stalled peers).

Per peer: at most ``MAX_IN_FLIGHT`` requests; a peer whose oldest request is older than
``piece_timeout`` is dropped and its pieces go elsewhere; a peer that sends a piece that does not
match its published hash is banned (every agent checks every piece against the metainfo).
Pieces whose hash is not known yet (the metainfo is published as the origin fetcher progresses)
are learned from the peers that announce them (GET_META), not by polling the tracker.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import trio

from agent.assembly import BlobAssembly
from agent.peer_link import PeerGone, PeerIdentity, PeerLink
from p2preg.digest import Digest
from p2preg.errors import LocalProtocolError, RemoteProtocolError
from p2preg.metainfo import MetaInfo
from p2preg.peer_rotation import only_source, peer_to_dial, peer_to_drop
from p2preg.piece_picker import PiecePicker, queued_to_take_over
from p2preg.swarm_limits import (
    download_peers,
    head_patience,
    patience_for,
    piece_seconds_after,
    rotates_peers,
)
from p2preg.wire import (
    BitfieldMsg,
    Busy,
    Cancel,
    ConnectionClosed,
    Error,
    Event,
    GetMeta,
    Have,
    Interest,
    Meta,
    Piece,
    Progress,
    Reject,
    Request,
)

log = logging.getLogger(__name__)

MAX_IN_FLIGHT = 8
MAX_IN_FLIGHT_BYTES = 8 * 1024 * 1024
# A piece a peer refused is not asked of that peer again for this long.
REFUSAL_BACKOFF = 0.5
TICK = 0.05
# A dropped or failed peer's address is not dialled again for this long.
REDIAL_BACKOFF = 2.0
# A peer we have requests at hears how many pieces we hold at most this often (Progress): it
# ranks requesters by it (p2preg.upload_order), and a count a few pieces old ranks the same.
PROGRESS_INTERVAL = 0.25


@dataclass(slots=True)
class _Peer:
    link: PeerLink
    # The pieces it holds, as a set: C-speed membership, and the picker intersects sets
    # directly (a Bitfield costs a Python call per piece, per pick: most of an agent's CPU at
    # 256 KiB pieces).
    held: set[int] = field(default_factory=set)
    in_flight: dict[int, float] = field(default_factory=dict)  # piece -> requested at
    meta_asked: bool = False
    refused: dict[int, float] = field(default_factory=dict)  # piece -> when it said no
    counted: bool = False  # its bits are in the picker's availability
    # Requests we cancelled here to ask another peer (queued_to_take_over). The Cancel can
    # cross the piece on the wire, so one of these may still arrive: it is not a protocol error.
    cancelled: set[int] = field(default_factory=set)
    progress_told: int = -1  # the pieces we held when we last told it (Progress) ...
    progress_told_at: float = -1e9  # ... and when
    # Its last fill found nothing to ask at this Swarm._picks_changed (-1: it found something),
    # and when its oldest refusal runs out: till then the ticker need not fill it again.
    dry_at: int = -1
    refusals_until: float = 0.0
    last_arrival: float = -1e9  # when its last piece for us arrived
    # Since the last rotation (Swarm.rotate): pieces it delivered, and requests we withdrew
    # there after they waited for a slot.
    delivered: int = 0
    withdrawn: int = 0


class Swarm:
    def __init__(
        self,
        digest: Digest,
        assembly: BlobAssembly,
        identity: PeerIdentity,
        banned: set[bytes],
        *,
        piece_timeout: float = 10.0,
        on_bad_peer: Callable[[bytes], None] = lambda peer_id: None,
        rng: random.Random | None = None,
    ) -> None:
        self.digest = digest
        self.assembly = assembly
        self._rng = rng if rng is not None else random.Random()
        self._identity = identity
        # What we receive at once, and whether our peers know we are busy (tests: None)
        self._incoming = identity.incoming if identity is not None else None
        self._banned = banned
        self._piece_timeout = piece_timeout
        self._on_bad_peer = on_bad_peer
        self.picker = PiecePicker(assembly.metainfo.num_pieces, rng=rng)
        self._learn(assembly.metainfo)
        for index in range(assembly.metainfo.num_pieces):
            if index in assembly.pieces:
                self.picker.mark_have(index)
        self.peers: dict[bytes, _Peer] = {}
        self._addresses: list[str] = []
        self._max_peers = download_peers(None)  # sized at every announce (note_swarm_size)
        self._swarm_count: int | None = None  # the tracker's count at the last announce
        self._count_before: int | None = None  # ... and at the one before it
        self._piece_seconds = 0.0  # how long a piece takes to arrive (running mean; 0: none yet)
        self._dialing: set[str] = set()
        self._failed: dict[str, float] = {}
        self._wakeup = trio.Event()
        # Bumps whenever a pick may find something it did not before for any peer: hashes
        # learned, a request of ours ended without the piece, the endgame (_Peer.dry_at).
        self._picks_changed = 0
        self.bytes_from_peers = 0
        # What happened, for the log line at the end (operators and benchmarks read it):
        # pieces, duplicates (endgame copies that arrived anyway), refusals, dropped peers.
        self.stats: collections.Counter[str] = collections.Counter()
        self._verifying: set[int] = set()  # pieces received, being checked and written

    # -- inputs from the download (never await) ------------------------------------------------

    def add_addresses(self, addresses: list[str]) -> None:
        for address in addresses:
            if address not in self._addresses:
                self._addresses.append(address)
        self._wakeup.set()

    def note_swarm_size(self, peers: int) -> None:
        """The tracker's last answer counted ``peers`` other peers: download from as many at
        once as p2preg.swarm_limits gives for that size (and the count before). Peers over a
        lowered limit are dropped by the ticker."""
        self._count_before = self._swarm_count
        self._max_peers = download_peers(peers, self._count_before)
        self._swarm_count = peers
        self._wakeup.set()

    def learn_metainfo(self, metainfo: MetaInfo) -> None:
        self.assembly.learn_hashes(metainfo)
        self._learn(self.assembly.metainfo)
        self._picks_changed += 1
        self._wakeup.set()

    def _note_have(self) -> None:
        """A piece arrived. Near the end that may allow endgame duplicates (PiecePicker)."""
        self._note_endgame()

    def _note_endgame(self) -> None:
        """Few pieces are missing: once all are requested, any peer holding one may be asked
        for a second copy (the endgame), so dry peers must be filled again."""
        if self.picker.num_pieces - len(self.picker.have) <= self.picker.endgame_pieces:
            self._picks_changed += 1

    def _request_ended(self, index: int) -> None:
        """A request of ours for ``index`` ended without the piece: any peer may be asked."""
        self.picker.request_ended(index)
        self._picks_changed += 1

    def local_piece(self, index: int) -> None:
        """The assembly gained a piece by other means (the origin)."""
        self.picker.mark_have(index)
        self._note_have()

    @property
    def complete(self) -> bool:
        return self.picker.complete

    def _learn(self, metainfo: MetaInfo) -> None:
        for index, value in enumerate(metainfo.piece_hashes):
            if value is not None:
                self.picker.mark_known(index)

    # -- running -------------------------------------------------------------------------------

    async def run(self) -> None:
        """Download until every piece is here; cancel the scope around it to stop early."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._ticker)
            while not self.complete:
                self._dial_more(nursery)
                with trio.move_on_after(0.5):
                    await self._wakeup.wait()
                self._wakeup = trio.Event()
            nursery.cancel_scope.cancel()

    def _dial_more(self, nursery: trio.Nursery) -> None:
        now = trio.current_time()
        connected = {peer.link.address for peer in self.peers.values()}
        for address in self._addresses:
            if len(self.peers) + len(self._dialing) >= self._max_peers:
                return
            if not self._may_dial(address, connected, now):
                continue
            self._dialing.add(address)
            nursery.start_soon(self._peer_task, address)

    async def _peer_task(self, address: str) -> None:
        peer: _Peer | None = None
        try:
            link = await self._identity.dial(address)
            self._dialing.discard(address)
            if link.peer_id in self._banned or link.peer_id in self.peers:
                await link.aclose()
                return
            peer = _Peer(link)
            self.peers[link.peer_id] = peer
            if self._incoming is not None:  # (it ranks our requests there)
                self._incoming.watch(link, lambda: bool(peer.in_flight))
            await link.send(Interest(self.digest))
            await self._read(peer)
        except (PeerGone, RemoteProtocolError, LocalProtocolError, ValueError) as exc:
            log.info("peer %s for %s: %s", address, self.digest, exc)
            self._failed[address] = trio.current_time()
        finally:
            self._dialing.discard(address)
            if not self.complete:
                # Whatever ended this connection, do not redial the address straight away.
                self._failed[address] = trio.current_time()
            if peer is not None:
                self._forget(peer)
                await peer.link.aclose()
            self._wakeup.set()

    def _forget(self, peer: _Peer) -> None:
        if self.peers.get(peer.link.peer_id) is peer:
            del self.peers[peer.link.peer_id]
        if self._incoming is not None:
            self._incoming.unwatch(peer.link)
        if peer.counted:
            self.picker.remove_peer(peer.held)
            peer.counted = False
        for index in peer.in_flight:
            self._request_ended(index)
        peer.in_flight.clear()

    async def _read(self, peer: _Peer) -> None:
        while not self.complete:
            event: Event | None = await peer.link.receive()
            # Every event the last read brought in first, then one fill: a burst of HAVEs
            # costs one pick and one batch of requests instead of one per message (and the
            # pick sees them all).
            while event is not None:
                if not await self._handle(peer, event):
                    return
                event = peer.link.buffered_event()
            await self._fill(peer)

    async def _handle(self, peer: _Peer, event: Event) -> bool:
        """Apply one event from ``peer``; False: the connection is over."""
        if isinstance(event, ConnectionClosed | Error):
            return False
        if isinstance(event, Have) and event.digest == self.digest:
            if not 0 <= event.index < self.picker.num_pieces:
                raise RemoteProtocolError(f"have for piece {event.index} out of range")
            if event.index not in peer.held:
                peer.held.add(event.index)
                if peer.counted:
                    self.picker.peer_has(event.index)
            await self._ask_meta_if_needed(peer, (event.index,))
        elif isinstance(event, Piece) and event.digest == self.digest:
            await self._piece(peer, event)
        elif isinstance(event, BitfieldMsg) and event.digest == self.digest:
            bits = event.to_bitfield()
            if bits.size != self.picker.num_pieces:
                raise RemoteProtocolError("bitfield size does not match the metainfo")
            if peer.counted:
                self.picker.remove_peer(peer.held)
            peer.held, peer.counted = {i for i in range(bits.size) if i in bits}, True
            self.picker.add_peer(peer.held)
            await self._ask_meta_if_needed(peer, peer.held)
        elif isinstance(event, Reject) and event.digest == self.digest:
            if event.index < 0:
                return False  # the peer does not have this blob at all
            if peer.in_flight.pop(event.index, None) is not None:
                self._request_ended(event.index)
            # Not from this peer for a while (it may want us to get it from another).
            self._not_asked_here(peer, event.index, trio.current_time())
            self.stats["refusals"] += 1
            log.debug("refused %d by %s", event.index, peer.link.address)
        elif isinstance(event, Meta) and event.metainfo.digest == self.digest:
            peer.meta_asked = False
            self.learn_metainfo(event.metainfo)
            await self._ask_meta_if_needed(peer, peer.held)
        return True

    async def _piece(self, peer: _Peer, event: Piece) -> None:
        index = event.index
        peer.last_arrival = trio.current_time()
        if peer.link.last_payload_seconds > 0:
            self._piece_seconds = piece_seconds_after(
                self._piece_seconds, peer.link.last_payload_seconds
            )
        requested = peer.in_flight.pop(index, None) is not None
        if not requested:
            if index not in peer.cancelled:
                raise RemoteProtocolError(f"unrequested piece {index}")
            # Cancelled (moved to another peer, or an endgame copy came first), but this peer
            # had started it: as good as any copy if we still lack it.
            peer.cancelled.discard(index)
        if index in self.assembly.pieces or index in self._verifying:
            if requested:
                self._request_ended(index)
            self.stats["duplicates"] += 1  # an endgame copy that was already on its way
            return
        # The piece stays "requested" in the picker until it is verified and written (a thread
        # hop): released earlier, the next fill would ask another peer for it meanwhile. That
        # race made nodes download 25-40% of a blob twice (8 nodes, 32 pieces: 8-13 copies).
        self._verifying.add(index)
        try:
            good = await self.assembly.write_piece(index, event.data)
        finally:
            self._verifying.discard(index)
        if not good:
            if requested:
                self._request_ended(index)
            log.warning(
                "peer %s sent a bad piece %d of %s: banned", peer.link.address, index, self.digest
            )
            self._banned.add(peer.link.peer_id)
            self._on_bad_peer(peer.link.peer_id)
            raise PeerGone("banned for a bad piece")
        self.bytes_from_peers += len(event.data)
        self.stats["pieces"] += 1
        peer.delivered += 1
        log.debug("piece %d of %s from %s", index, self.digest, peer.link.address)
        self.picker.mark_have(index)  # also ends every request for it, ours included
        self._note_have()
        for other in list(self.peers.values()):
            # (Forgotten here too: a stale entry would look like a stalled request at the
            # ticker; if the copy comes anyway, it is counted as a duplicate.)
            if other is not peer and other.in_flight.pop(index, None) is not None:
                other.cancelled.add(index)
                await self._cancel(other, index)
        self._wakeup.set()

    async def _ask_meta_if_needed(self, peer: _Peer, pieces: Iterable[int]) -> None:
        """Ask ``peer`` for the metainfo if it holds one of ``pieces`` whose hash we lack."""
        known = self.picker.known
        if peer.meta_asked or len(known) == self.picker.num_pieces:
            return
        if any(i not in known for i in pieces):
            peer.meta_asked = True
            await peer.link.send(GetMeta(self.digest))

    def lacks_hashes(self) -> bool:
        """A peer holds a piece whose hash we do not know yet: we cannot ask for it until we
        learn the hash (from that peer's Meta, or the tracker's metainfo)."""
        known = self.picker.known
        if len(known) == self.picker.num_pieces:
            return False
        return any(i not in known for peer in self.peers.values() for i in peer.held)

    def pieces_of(self, peer_id: bytes) -> set[int] | None:
        """What the peer ``peer_id`` told us it holds (None: not one of our peers)."""
        peer = self.peers.get(peer_id)
        return peer.held if peer is not None else None

    def waiting_on_peers(self) -> bool:
        """Requests are out and not yet overdue: a busy seeder, not a stalled swarm."""
        now = trio.current_time()
        return any(
            now - requested < self._piece_timeout
            for peer in self.peers.values()
            for requested in peer.in_flight.values()
        )

    async def _tell_progress(self, peer: _Peer) -> None:
        """Tell ``peer`` how many pieces we hold if that changed (at most every
        PROGRESS_INTERVAL): it serves the requesters holding fewest first, among those that
        are not busy, for equally fresh pieces (p2preg.upload_order). Only peers we ask
        something of need it."""
        progress = self._progress_for(peer)
        if progress is not None:
            await peer.link.send(progress)

    def _progress_for(self, peer: _Peer) -> Progress | None:
        """The progress message ``peer`` is due (see _tell_progress), marked as told; or None."""
        held = len(self.assembly.pieces)
        now = trio.current_time()
        if held != peer.progress_told and now - peer.progress_told_at >= PROGRESS_INTERVAL:
            peer.progress_told, peer.progress_told_at = held, now
            return Progress(self.digest, held)
        return None

    async def _fill(self, peer: _Peer) -> None:
        # Bound the bytes in flight per peer, not the count: deep queues of big pieces on one
        # busy seeder only add latency (and look like stalls).
        depth = max(1, min(MAX_IN_FLIGHT, MAX_IN_FLIGHT_BYTES // self.assembly.piece_length))
        room = depth - len(peer.in_flight)
        if room <= 0 or self.complete:
            if peer.in_flight:  # (requests waiting there are ranked by it)
                await self._tell_progress(peer)
            return
        read_position = self.picker.first_missing()
        now = trio.current_time()
        if peer.refused:
            peer.refused = {i: at for i, at in peer.refused.items() if now - at < REFUSAL_BACKOFF}
            peer.refusals_until = min(peer.refused.values(), default=now) + REFUSAL_BACKOFF
        exclude = set(peer.in_flight) | set(peer.refused)
        chosen = self.picker.pick(peer.held, room, read_position, exclude=exclude)
        for index in chosen:
            peer.in_flight[index] = now
            self.picker.request_started(index)
        self.stats["requests"] += len(chosen)
        if chosen and not self.picker.unrequested:
            self._note_endgame()  # (every missing piece is requested now)
        if not chosen and not peer.in_flight and not peer.refused:
            # (Not at a peer that refused us lately: the origin fetcher, super-seeding, refuses
            # pieces that others hold already; a moved request it refuses starts queueing anew.)
            chosen = await self._take_over(peer, room, now)
        peer.dry_at = -1 if chosen else self._picks_changed
        # Whether we are busy and our progress first (they rank the requests), then the
        # requests: one write.
        messages: list[Busy | Progress | Request] = []
        incoming = self._incoming
        if chosen and incoming is not None and (busy := incoming.due(peer.link)) is not None:
            messages.append(busy)
            self.stats["busy_with_requests"] += 1
        progress = self._progress_for(peer) if peer.in_flight else None
        if progress is not None:
            messages.append(progress)
        if chosen:
            log.debug("requested %s of %s from %s", chosen, self.digest, peer.link.address)
        messages += [Request(self.digest, index) for index in chosen]
        if messages:
            await peer.link.send_many(messages)

    def _nothing_new_for(self, peer: _Peer, now: float) -> bool:
        """The ticker may skip filling ``peer``: its last fill found nothing, nothing a pick
        reads changed since (its own HAVEs fill it when they come), no refusal of it ran out,
        and requests are out there (an idle peer may take over others' queued requests, which
        change all the time)."""
        return (
            bool(peer.in_flight)
            and peer.dry_at == self._picks_changed
            and (not peer.refused or now < peer.refusals_until)
        )

    async def _take_over(self, peer: _Peer, room: int, now: float) -> list[int]:
        """Nothing fresh to ask ``peer`` for and nothing outstanding there: take over requests
        of ours that wait at other peers behind another one (p2preg.piece_picker's
        queued_to_take_over; simulator and agent share it). Each is cancelled where it waited;
        the picker's count of requests for it does not change."""
        queues = (
            (other, list(other.in_flight))  # (dicts keep the order we sent them in)
            for other in self.peers.values()
            if other is not peer and len(other.in_flight) > 1
        )
        moves = queued_to_take_over(peer.held, queues, room)
        # Every change first, then the Cancels: while one is being sent, the others' readers
        # run and may pop these very requests (the piece arrived after all).
        for other, index in moves:
            del other.in_flight[index]
            other.cancelled.add(index)
            peer.in_flight[index] = now
        self.stats["taken_over"] += len(moves)
        for other, index in moves:
            await self._cancel(other, index)
        return [index for _, index in moves]

    async def _withdraw_stalled_head(self, peer: _Peer, now: float) -> None:
        """Our first request at ``peer`` waited there longer than p2preg.swarm_limits's
        head_patience for an upload slot (since we sent it, or since the piece before it
        arrived) and none of it is arriving: cancel it and let another peer be asked
        (p2preg.upload_order.HEAD_PATIENCE says why a request can wait there indefinitely).
        Not asked of this peer again for REFUSAL_BACKOFF, as if it had refused; if the piece
        was under way after all, the Cancel crosses it and it is used as any cancelled piece
        that arrives."""
        if not peer.in_flight or peer.link.arriving:
            return
        index, requested = next(iter(peer.in_flight.items()))  # (the order we sent them in)
        patience = patience_for(
            head_patience(self._swarm_count, self._count_before), self._piece_seconds
        )
        if now - max(requested, peer.last_arrival) < patience:
            return
        del peer.in_flight[index]
        peer.cancelled.add(index)
        self._not_asked_here(peer, index, now)
        self._request_ended(index)
        self.stats["withdrawn"] += 1
        peer.withdrawn += 1
        await self._cancel(peer, index)

    @staticmethod
    def _not_asked_here(peer: _Peer, index: int, now: float) -> None:
        """``index`` is not asked of ``peer`` again for REFUSAL_BACKOFF (it refused it, or
        we withdrew it there)."""
        peer.refused[index] = now
        if peer.refusals_until <= now:
            peer.refusals_until = now + REFUSAL_BACKOFF

    async def _cancel(self, other: _Peer, index: int) -> None:
        """Tell ``other`` we no longer want ``index``; from this peer's task, so a broken link
        to the other one is not this one's failure (the other's reader cleans up after it)."""
        with contextlib.suppress(PeerGone, LocalProtocolError):
            await other.link.send(Cancel(self.digest, index))

    async def rotate(self, handout: list[str], count: int = 1) -> None:
        """The tracker answered with ``handout``: where we rotate peers (more than 16 others,
        from our second count: p2preg.swarm_limits.rotates_peers), at our peer limit, drop the
        peer where our requests starved most since the last answer and dial one of the answer
        instead, ``count`` times at most (p2preg.peer_rotation says why, which and how many).
        Their requests go back to the picker; a dropped address is not redialled for
        REDIAL_BACKOFF."""
        peers = list(self.peers.values())
        counts = [(peer, peer.withdrawn, peer.delivered) for peer in peers]
        for peer in peers:
            peer.delivered = peer.withdrawn = 0
        if (
            self.complete
            or not rotates_peers(self._swarm_count, self._count_before)
            or len(peers) + len(self._dialing) < self._max_peers
        ):
            return
        now = trio.current_time()
        connected = {peer.link.address for peer in peers}
        options = [a for a in dict.fromkeys(handout) if self._may_dial(a, connected, now)]
        if not options:
            return
        dropped: list[_Peer] = []
        for _ in range(count):
            # (after _forget: our availability no longer counts the peers dropped before)
            out = peer_to_drop(counts, self._sole_source)
            if out is None:
                break
            address = peer_to_dial(options, self._rng)
            assert address is not None
            # First in line for _dial_more, which fills the places the dropped peers leave.
            with contextlib.suppress(ValueError):
                self._addresses.remove(address)
            self._addresses.insert(0, address)
            log.debug("rotating peer %s out for %s on %s", out.link.address, address, self.digest)
            self.stats["rotated"] += 1
            self._failed[out.link.address] = now
            self._forget(out)
            dropped.append(out)
            counts = [entry for entry in counts if entry[0] is not out]
            options.remove(address)
            if not options:
                break
        if dropped:
            self._wakeup.set()
            for out in dropped:
                await out.link.aclose()

    def _may_dial(self, address: str, connected: set[str], now: float) -> bool:
        """``address`` is not a peer of ours, not being dialled, and not dropped or failed
        within REDIAL_BACKOFF."""
        return (
            address not in connected
            and address not in self._dialing
            and now - self._failed.get(address, -1e9) >= REDIAL_BACKOFF
        )

    def _sole_source(self, peer: _Peer) -> bool:
        """``peer`` is the only one of our peers holding some piece we lack."""
        return peer.counted and only_source(peer.held, self.picker.have, self.picker.availability)

    async def _drop_extra(self) -> None:
        """More peers than the limit (it fell: the swarm grew past a size): drop the ones with
        the fewest of our requests out; those go back to the picker."""
        extra = len(self.peers) - self._max_peers
        if extra <= 0:
            return
        for peer in sorted(self.peers.values(), key=lambda p: len(p.in_flight))[:extra]:
            log.info(
                "peer %s dropped: %d peers for %s from now",
                peer.link.address,
                self._max_peers,
                self.digest,
            )
            self.stats["dropped_extra"] += 1
            self._forget(peer)
            await peer.link.aclose()

    async def _ticker(self) -> None:
        """Top up every peer's requests, and drop peers that stopped delivering or are over
        the limit."""
        while True:
            await trio.sleep(TICK)
            await self._drop_extra()
            now = trio.current_time()
            for peer in list(self.peers.values()):
                oldest = min(peer.in_flight.values(), default=now)
                if now - oldest > self._piece_timeout:
                    log.info("peer %s stalled on %s; dropping it", peer.link.address, self.digest)
                    self.stats["stalled_peers"] += 1
                    self._forget(peer)
                    await peer.link.aclose()
                    continue
                try:
                    await self._withdraw_stalled_head(peer, now)
                    if self._nothing_new_for(peer, now):
                        await self._tell_progress(peer)  # (the count may have changed)
                    else:
                        await self._fill(peer)
                except (PeerGone, LocalProtocolError):
                    # The connection broke: drop it entirely (its reader ends with it).
                    self._forget(peer)
                    await peer.link.aclose()
