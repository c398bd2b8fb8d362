"""Cluster authentication for the tracker API: an HMAC challenge-response that opens a session.

Every cluster member holds the same secret. The flow (docs/tracker.md):

1. client -> ``POST /v1/auth/challenge {peer_id}``; the tracker answers ``{nonce_t}``, 32 random
   bytes bound to that peer id, single-use, valid for ``CHALLENGE_TTL`` seconds.
2. client -> ``POST /v1/auth/session {peer_id, nonce_t, nonce_c, mac_c}`` with 32 fresh random
   bytes ``nonce_c`` and ``mac_c = HMAC-SHA256(secret, CLIENT_LABEL + peer_id + nonce_t +
   nonce_c)``. The tracker consumes ``nonce_t`` (a replay finds it gone), checks ``mac_c`` and
   answers ``{token, expires_in, mac_t}`` with ``mac_t = HMAC-SHA256(secret, TRACKER_LABEL +
   peer_id + nonce_c + nonce_t + token)``: the client's fresh nonce makes ``mac_t`` prove that
   the tracker knows the secret too, so a client never trusts an impostor.
3. client -> every other call with ``Authorization: P2PREG <token hex>``; the token maps to the
   peer id until it expires (the client authenticates again on a 401).

The labels differ per direction and end in a NUL, so a MAC from one step can never be replayed
as another. All comparisons are constant-time. This module is pure: time and random bytes come
in as arguments; :class:`SessionTable` is the tracker's bookkeeping, bounded in size.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from p2preg.errors import ConfigError

CLIENT_LABEL = b"p2preg/1 tracker-client\0"
TRACKER_LABEL = b"p2preg/1 tracker\0"
NONCE_BYTES = 32
TOKEN_BYTES = 32
PEER_ID_BYTES = 16
MAC_BYTES = 32
CHALLENGE_TTL = 30.0
SESSION_TTL = 600.0
MIN_SECRET_BYTES = 16
AUTH_SCHEME = "P2PREG"


class AuthError(Exception):
    """A session request that must be refused (401). The message is safe to send back."""


def parse_cluster_secret(data: bytes, what: str = "cluster secret") -> bytes:
    """The secret file's bytes, surrounding whitespace stripped; at least 16 bytes."""
    secret = data.strip()
    if len(secret) < MIN_SECRET_BYTES:
        raise ConfigError(
            f"{what}: must hold at least {MIN_SECRET_BYTES} bytes "
            f"(e.g. the output of `openssl rand -hex 32`), found {len(secret)}"
        )
    return secret


def client_mac(secret: bytes, peer_id: bytes, nonce_t: bytes, nonce_c: bytes) -> bytes:
    return hmac.new(secret, CLIENT_LABEL + peer_id + nonce_t + nonce_c, hashlib.sha256).digest()


def tracker_mac(
    secret: bytes, peer_id: bytes, nonce_c: bytes, nonce_t: bytes, token: bytes
) -> bytes:
    message = TRACKER_LABEL + peer_id + nonce_c + nonce_t + token
    return hmac.new(secret, message, hashlib.sha256).digest()


def verify_tracker_mac(
    secret: bytes, peer_id: bytes, nonce_c: bytes, nonce_t: bytes, token: bytes, mac_t: bytes
) -> bool:
    """The client's check that the tracker knows the secret."""
    return hmac.compare_digest(tracker_mac(secret, peer_id, nonce_c, nonce_t, token), mac_t)


def authorization_header(token: bytes) -> str:
    return f"{AUTH_SCHEME} {token.hex()}"


def parse_authorization(header: str | None) -> bytes | None:
    """``P2PREG <64 hex digits>`` -> the token; None for anything else."""
    if header is None:
        return None
    scheme, _, value = header.strip().partition(" ")
    value = value.strip()
    if scheme.upper() != AUTH_SCHEME or len(value) != 2 * TOKEN_BYTES:
        return None
    try:
        return bytes.fromhex(value)
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class SessionGrant:
    token: bytes
    expires_in: float
    mac_t: bytes


class SessionTable:
    """The tracker's side: outstanding challenges and open sessions, both bounded and expiring.

    When a table is full the oldest entry goes first (dict order is insertion order and every
    entry lives the same TTL, so the oldest also expires first).
    """

    def __init__(
        self,
        secret: bytes,
        *,
        challenge_ttl: float = CHALLENGE_TTL,
        session_ttl: float = SESSION_TTL,
        max_challenges: int = 100_000,
        max_sessions: int = 100_000,
    ) -> None:
        self._secret = secret
        self.challenge_ttl = challenge_ttl
        self.session_ttl = session_ttl
        self._max_challenges = max_challenges
        self._max_sessions = max_sessions
        self._challenges: dict[bytes, tuple[bytes, float]] = {}  # nonce_t -> (peer_id, expiry)
        self._sessions: dict[bytes, tuple[bytes, float]] = {}  # token -> (peer_id, expiry)

    def __repr__(self) -> str:  # never show the secret
        return f"<SessionTable {len(self._challenges)} challenges {len(self._sessions)} sessions>"

    @property
    def session_count(self) -> int:
        return len(self._sessions)

    def issue_challenge(self, peer_id: bytes, now: float, nonce_t: bytes) -> bytes:
        """Remember ``nonce_t`` (fresh random bytes from the caller) for ``peer_id``."""
        _check_len(peer_id, PEER_ID_BYTES, "peer_id")
        _check_len(nonce_t, NONCE_BYTES, "nonce_t")
        _expire_front(self._challenges, now)
        self._challenges[bytes(nonce_t)] = (bytes(peer_id), now + self.challenge_ttl)
        _trim(self._challenges, self._max_challenges)
        return nonce_t

    def open_session(
        self,
        peer_id: bytes,
        nonce_t: bytes,
        nonce_c: bytes,
        mac_c: bytes,
        now: float,
        token: bytes,
    ) -> SessionGrant:
        """Check step (b) of the handshake; ``token`` is fresh random bytes from the caller.

        Raises AuthError for an unknown, expired, replayed or foreign challenge, or a bad MAC.
        The challenge is consumed either way, so one nonce allows one guess.
        """
        _check_len(peer_id, PEER_ID_BYTES, "peer_id")
        _check_len(nonce_c, NONCE_BYTES, "nonce_c")
        _check_len(token, TOKEN_BYTES, "token")
        issued = self._challenges.pop(bytes(nonce_t), None)
        if issued is None or issued[1] <= now:
            raise AuthError("unknown, used or expired challenge; ask for a new one")
        if not hmac.compare_digest(issued[0], peer_id):
            raise AuthError("the challenge was issued to another peer id")
        expected = client_mac(self._secret, peer_id, nonce_t, nonce_c)
        if not hmac.compare_digest(expected, mac_c):
            raise AuthError("bad cluster credentials (is the cluster secret the same?)")
        _expire_front(self._sessions, now)
        self._sessions[bytes(token)] = (bytes(peer_id), now + self.session_ttl)
        _trim(self._sessions, self._max_sessions)
        mac_t = tracker_mac(self._secret, peer_id, nonce_c, nonce_t, token)
        return SessionGrant(token, self.session_ttl, mac_t)

    def authenticate(self, token: bytes | None, now: float) -> bytes | None:
        """The peer id a valid token belongs to; None if unknown or expired."""
        if token is None:
            return None
        entry = self._sessions.get(token)
        if entry is None:
            return None
        if entry[1] <= now:
            del self._sessions[token]
            return None
        return entry[0]

    def sweep(self, now: float) -> None:
        """Drop every expired challenge and session."""
        _expire_front(self._challenges, now)
        _expire_front(self._sessions, now)


def _check_len(value: bytes, size: int, what: str) -> None:
    if len(value) != size:
        raise AuthError(f"{what} must be {size} bytes")


def _expire_front(table: dict[bytes, tuple[bytes, float]], now: float) -> None:
    """Entries share one TTL and are inserted in time order, so the expired ones lead."""
    while table:
        key = next(iter(table))
        if table[key][1] > now:
            return
        del table[key]


def _trim(table: dict[bytes, tuple[bytes, float]], limit: int) -> None:
    while len(table) > limit:
        del table[next(iter(table))]
