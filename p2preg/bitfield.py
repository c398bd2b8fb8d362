"""Which pieces a peer holds: one bit per piece, most significant bit first (as BitTorrent)."""

from __future__ import annotations

from p2preg.errors import RemoteProtocolError


class Bitfield:
    __slots__ = ("_bits", "_count", "size")

    def __init__(self, size: int) -> None:
        self.size = size
        self._bits = bytearray((size + 7) // 8)
        self._count = 0

    @classmethod
    def full(cls, size: int) -> Bitfield:
        bitfield = cls(size)
        whole, spare = divmod(size, 8)
        bitfield._bits[:whole] = b"\xff" * whole
        if spare:
            bitfield._bits[whole] = (0xFF00 >> spare) & 0xFF  # the first ``spare`` bits
        bitfield._count = size
        return bitfield

    @classmethod
    def from_bytes(cls, size: int, data: bytes) -> Bitfield:
        """Decode an untrusted bitfield; spare bits past ``size`` must be zero."""
        if len(data) != (size + 7) // 8:
            raise RemoteProtocolError(f"bitfield of {len(data)} bytes for {size} pieces")
        bitfield = cls(size)
        bitfield._bits[:] = data
        if size % 8 and data and data[-1] & (0xFF >> (size % 8)):
            raise RemoteProtocolError("bitfield has bits set past the last piece")
        bitfield._count = sum(bin(byte).count("1") for byte in data)
        return bitfield

    def add(self, index: int) -> bool:
        """Set bit ``index``; True if it was not set before."""
        if not 0 <= index < self.size:
            raise IndexError(index)
        mask = 0x80 >> (index % 8)
        if self._bits[index // 8] & mask:
            return False
        self._bits[index // 8] |= mask
        self._count += 1
        return True

    def __contains__(self, index: int) -> bool:
        return 0 <= index < self.size and bool(self._bits[index // 8] & (0x80 >> (index % 8)))

    def __len__(self) -> int:
        return self._count

    @property
    def complete(self) -> bool:
        return self._count == self.size

    def missing(self) -> list[int]:
        return [i for i in range(self.size) if i not in self]

    def to_bytes(self) -> bytes:
        return bytes(self._bits)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Bitfield) and (self.size, self._bits) == (other.size, other._bits)

    def __repr__(self) -> str:
        return f"Bitfield({self._count}/{self.size})"
