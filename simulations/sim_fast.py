"""Faster stand-ins for the data the policies read, so the simulator can call them 10^5+ times.

Nothing here changes a decision of the policies: :class:`PieceSet` answers the same questions as
:class:`p2preg.bitfield.Bitfield` (``in``, ``add``, ``len``, ``complete``) but ``in`` is the C
slot of ``set`` instead of a Python method, which halves the cost of ``PiecePicker.pick``; and
:class:`FastShuffleRandom` shuffles by sorting on random keys drawn in one C call, a uniform
permutation like ``random.shuffle`` at about 60% of its cost. See docs/simulator.md (profile).
"""

from __future__ import annotations

import random
from collections.abc import MutableSequence
from typing import Any, cast

from p2preg.bitfield import Bitfield
from p2preg.piece_picker import PiecePicker


class PieceSet(set[int]):
    """The pieces a node holds, with the part of the Bitfield interface the picker uses
    (``in``, ``add``, ``len``, ``complete``; ``add``'s result, unused by the picker, is None)."""

    __slots__ = ("size",)

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    @property
    def complete(self) -> bool:
        return len(self) == self.size

    def as_bitfield(self) -> Bitfield:
        """This object typed as the Bitfield it stands in for (``pick(peer, ...)``)."""
        return cast(Bitfield, self)


class FastShuffleRandom(random.Random):
    """``random.Random`` whose ``shuffle`` sorts on 32-bit keys from one ``randbytes`` call."""

    def shuffle(self, x: MutableSequence[Any]) -> None:
        n = len(x)
        if n < 2:
            return
        keys = memoryview(self.randbytes(4 * n)).cast("I").tolist()
        order = sorted(range(n), key=keys.__getitem__)
        x[:] = [x[i] for i in order]


def install_piece_sets(picker: PiecePicker, known: PieceSet) -> PieceSet:
    """Give ``picker`` a PieceSet for its own pieces and the shared ``known`` set (the piece
    hashes published so far, the same for every node); returns the new ``have``."""
    have = PieceSet(picker.num_pieces)
    if len(picker.have):
        have.update(i for i in range(picker.num_pieces) if i in picker.have)
    picker.have = have.as_bitfield()
    picker.known = known.as_bitfield()
    return have
