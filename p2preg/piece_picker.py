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
"""

from __future__ import annotations

import random
from collections.abc import Iterable

from p2preg.bitfield import Bitfield


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

    def request_started(self, index: int) -> None:
        self.in_flight[index] = self.in_flight.get(index, 0) + 1

    def request_ended(self, index: int) -> None:
        count = self.in_flight.get(index, 0) - 1
        if count > 0:
            self.in_flight[index] = count
        else:
            self.in_flight.pop(index, None)

    @property
    def complete(self) -> bool:
        return self.have.complete

    def first_missing(self) -> int:
        """The lowest piece we lack (num_pieces when complete): the reader's next need."""
        for index in range(self.num_pieces):
            if index not in self.have:
                return index
        return self.num_pieces

    # -- the choice ----------------------------------------------------------------------------

    def pick(
        self, peer: Bitfield, count: int, read_position: int = 0, *, exclude: Iterable[int] = ()
    ) -> list[int]:
        """Up to ``count`` pieces to request from a peer holding ``peer``.

        ``exclude`` lists pieces already requested from this very peer (never twice from one).
        """
        if count <= 0:
            return []
        excluded = set(exclude)
        wanted = [
            i
            for i in range(self.num_pieces)
            if i in peer and i not in self.have and i in self.known and i not in excluded
        ]
        fresh = [i for i in wanted if i not in self.in_flight]
        chosen: list[int] = []
        window_end = read_position + self.window
        for index in fresh:
            if read_position <= index < window_end:
                chosen.append(index)
                if len(chosen) == count:
                    return chosen
        rest = [i for i in fresh if not read_position <= i < window_end]
        self._rng.shuffle(rest)  # random among equally rare pieces
        rest.sort(key=self.availability.__getitem__)
        chosen.extend(rest[: count - len(chosen)])
        if len(chosen) < count and self._endgame():
            duplicates = [i for i in wanted if self.in_flight.get(i, 0) == 1 and i not in chosen]
            duplicates.sort(key=lambda i: (self.in_flight[i], i))
            chosen.extend(duplicates[: count - len(chosen)])
        return chosen

    def _endgame(self) -> bool:
        missing = self.num_pieces - len(self.have)
        return 0 < missing <= self.endgame_pieces and all(
            i in self.in_flight for i in range(self.num_pieces) if i not in self.have
        )
