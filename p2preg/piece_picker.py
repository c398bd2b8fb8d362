"""Which piece to ask a peer for next: a streaming window ahead of the reader, then rarest-first.

Pure policy, shared by the agent's swarm scheduler and the fleet simulator (so improving it
improves both). State is one blob's view from one node: which pieces it has, which have a known
hash (metainfo is published progressively), how many known peers hold each piece, and how many
requests are in flight per piece.

The choice, for a peer that holds pieces we want:
1. Pieces in the window ``[read_position, read_position + window)`` in index order: the local
   client streams the blob in order, so these unblock it soonest. The window is small (one
   piece by default): every node of a rollout starts at offset 0, and a wide in-order window
   makes all of them ask the same seeder for the same pieces at once (measured: the origin
   fetcher then uploaded 2.8-3.4 copies of the blob while the others idled).
2. The rarest remaining pieces (fewest holders), ties broken at random: rarest-first keeps every
   piece replicated, which keeps the swarm healthy when seeders leave and spreads load.
3. Endgame: when at most ``endgame_pieces`` pieces are missing and all of them are requested
   somewhere, a piece may be requested once more from another peer, so one slow peer cannot hold
   up the tail; the first copy wins and the other request is cancelled. Entering endgame earlier
   (as soon as everything missing is in flight, which deep request pipelines reach with dozens of
   pieces left) made nodes download up to 1.7 copies of the blob.

Cost: the picker keeps the set of pieces it lacks and has not requested (``unrequested``) up to
date in ``mark_have`` / ``request_started`` / ``request_ended``, so a pick looks only at those
(intersected with the peer's pieces: C speed when the peer's pieces are a ``set``) instead of
every piece of the blob; ``first_missing`` and the endgame test are O(1) amortized. The fleet
simulator calls it millions of times (docs/simulator.md).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence, Set
from typing import TypeVar

from p2preg.bitfield import Bitfield

K = TypeVar("K")


class PiecePicker:
    def __init__(
        self,
        num_pieces: int,
        *,
        window: int = 1,
        endgame_pieces: int = 4,
        rng: random.Random | None = None,
    ):
        self.num_pieces = num_pieces
        self.window = window
        self.endgame_pieces = endgame_pieces
        self.have = Bitfield(num_pieces)
        self.known = Bitfield(num_pieces)  # piece hash published: the piece can be verified
        self.availability = [0] * num_pieces
        self.in_flight: dict[int, int] = {}
        # Pieces we lack that are not requested from anyone (hash known or not).
        self.unrequested: set[int] = set(range(num_pieces))
        self._first_missing = 0
        self._rng = rng or random.Random()

    # -- what peers hold -----------------------------------------------------------------------

    def add_peer(self, pieces: Iterable[int]) -> None:
        for index in pieces:
            self.availability[index] += 1

    def remove_peer(self, pieces: Iterable[int]) -> None:
        for index in pieces:
            self.availability[index] -= 1

    def peer_has(self, index: int) -> None:
        self.availability[index] += 1

    # -- our own progress ----------------------------------------------------------------------

    def mark_known(self, index: int) -> None:
        self.known.add(index)

    def mark_have(self, index: int) -> None:
        self.have.add(index)
        self.in_flight.pop(index, None)
        self.unrequested.discard(index)
        if index == self._first_missing:
            have, n = self.have, self.num_pieces
            while index < n and index in have:
                index += 1
            self._first_missing = index

    def request_started(self, index: int) -> None:
        self.in_flight[index] = self.in_flight.get(index, 0) + 1
        self.unrequested.discard(index)

    def request_ended(self, index: int) -> None:
        count = self.in_flight.get(index, 0) - 1
        if count > 0:
            self.in_flight[index] = count
        else:
            self.in_flight.pop(index, None)
            if index not in self.have:
                self.unrequested.add(index)

    @property
    def complete(self) -> bool:
        return self.have.complete

    def first_missing(self) -> int:
        """The lowest piece we lack (num_pieces when complete): the reader's next need."""
        return self._first_missing

    # -- the choice ----------------------------------------------------------------------------

    def pick(
        self,
        peer: Bitfield | Set[int],
        count: int,
        read_position: int = 0,
        *,
        exclude: Iterable[int] = (),
    ) -> list[int]:
        """Up to ``count`` pieces to request from a peer holding ``peer``.

        ``exclude`` lists pieces already requested from this very peer (never twice from one).
        """
        if count <= 0:
            return []
        excluded = exclude if isinstance(exclude, Set | dict) else set(exclude)
        known = self.known
        held: Iterable[int]
        if isinstance(peer, set | frozenset):  # a set of piece indexes (the agent's, the sim's)
            held = self.unrequested & peer
        else:
            held = [i for i in self.unrequested if i in peer]
        fresh = sorted(i for i in held if i in known and i not in excluded)
        chosen: list[int] = []
        window_end = read_position + self.window
        rest: list[int] = []
        for index in fresh:
            if read_position <= index < window_end:
                chosen.append(index)
            else:
                rest.append(index)
        if len(chosen) >= count:
            return chosen[:count]
        self._rng.shuffle(rest)  # random among equally rare pieces
        rest.sort(key=self.availability.__getitem__)
        chosen.extend(rest[: count - len(chosen)])
        if len(chosen) < count and self._endgame():
            in_flight = self.in_flight
            duplicates = [
                i
                for i in in_flight
                if in_flight[i] == 1
                and i in peer
                and i in known
                and i not in excluded
                and i not in chosen
                and i not in self.have
            ]
            duplicates.sort(key=lambda i: (in_flight[i], i))
            chosen.extend(duplicates[: count - len(chosen)])
        return chosen

    def _endgame(self) -> bool:
        """Every piece we lack is requested somewhere, and only a few are left."""
        missing = self.num_pieces - len(self.have)
        return 0 < missing <= self.endgame_pieces and not self.unrequested


def queued_to_take_over(
    held: Set[int],
    queues: Iterable[tuple[K, Sequence[int]]],
    room: int,
    skip: Set[int] | Mapping[int, object] = frozenset(),
) -> list[tuple[K, int]]:
    """Requests to move to a peer we have nothing outstanding at: up to ``room`` of the pieces
    it holds (``held``), not in ``skip`` (say, pieces it refused), that wait at other peers
    behind another of our requests. (In endgame too: moving a queued copy beats asking twice,
    by the simulator.)

    ``queues`` gives, per other peer, our requests to it in the order sent. A peer serves one
    connection's requests in order, so all but the first surely have not started: cancelling
    one there costs nothing, and the idle peer can send it now. (The first may be under way
    and is left alone.) Without this, a request commits to the first peer that announced the
    piece and waits behind that peer's queue while later holders sit idle; traced in the
    simulator at 8 nodes: idle uploaders held a piece someone had queued elsewhere for 69
    node-pair-seconds of a 16 s rollout. Same rule in the agent and the simulator.
    """
    moves: list[tuple[K, int]] = []
    if room <= 0:
        return moves
    for key, queue in queues:
        for index in queue[1:]:
            if index in held and index not in skip:
                moves.append((key, index))
                if len(moves) == room:
                    return moves
    return moves
