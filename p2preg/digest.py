"""OCI content digests: parsing against the spec's grammar and streaming verification.

Grammar (OCI image spec, descriptor.md):
    digest    ::= algorithm ":" encoded
    algorithm ::= [a-z0-9]+ ([+._-] [a-z0-9]+)*
We verify only the registered algorithms whose encoding is fixed-length lowercase hex, so a
parsed digest is always safe to use as a file name.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from p2preg.errors import RegistryError

_HEX_LENGTH = {"sha256": 64, "sha512": 128}
_ALGORITHM_RE = re.compile(r"[a-z0-9]+(?:[+._-][a-z0-9]+)*")
_HEX_RE = re.compile(r"[a-f0-9]+")


@dataclass(frozen=True, slots=True)
class Digest:
    algorithm: str
    hex: str

    @classmethod
    def parse(cls, text: str) -> Digest:
        """Parse ``alg:hex``; raise ``RegistryError(DIGEST_INVALID)`` on anything else."""
        algorithm, sep, encoded = text.partition(":")
        if not sep or not _ALGORITHM_RE.fullmatch(algorithm):
            raise RegistryError("DIGEST_INVALID", f"invalid digest {text[:200]!r}")
        expected_length = _HEX_LENGTH.get(algorithm)
        if expected_length is None:
            raise RegistryError("DIGEST_INVALID", f"unsupported digest algorithm {algorithm!r}")
        if len(encoded) != expected_length or not _HEX_RE.fullmatch(encoded):
            raise RegistryError("DIGEST_INVALID", f"invalid {algorithm} digest {text[:200]!r}")
        return cls(algorithm, encoded)

    @classmethod
    def is_digest(cls, text: str) -> bool:
        """A manifest reference is a digest iff it contains ':' (tags cannot)."""
        return ":" in text

    def hasher(self) -> hashlib._Hash:
        return hashlib.new(self.algorithm)

    def matches(self, hasher: hashlib._Hash) -> bool:
        return hasher.hexdigest() == self.hex

    @classmethod
    def of_bytes(cls, data: bytes, algorithm: str = "sha256") -> Digest:
        return cls(algorithm, hashlib.new(algorithm, data).hexdigest())

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"
