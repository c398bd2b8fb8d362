"""Tracker session auth (p2preg/cluster_auth.py): the handshake, replay, expiry, bounds."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from p2preg.cluster_auth import (
    AuthError,
    SessionTable,
    authorization_header,
    client_mac,
    parse_authorization,
    parse_cluster_secret,
    verify_tracker_mac,
)
from p2preg.errors import ConfigError

SECRET = b"s" * 32
PEER, OTHER = b"p" * 16, b"o" * 16
NONCE_T, NONCE_C, TOKEN = b"t" * 32, b"c" * 32, b"k" * 32


def handshake(table: SessionTable, now: float = 0.0, secret: bytes = SECRET) -> bytes:
    nonce_t = table.issue_challenge(PEER, now, NONCE_T)
    mac_c = client_mac(secret, PEER, nonce_t, NONCE_C)
    grant = table.open_session(PEER, nonce_t, NONCE_C, mac_c, now, TOKEN)
    assert verify_tracker_mac(secret, PEER, NONCE_C, nonce_t, grant.token, grant.mac_t)
    return grant.token


def test_macs_are_labelled_hmac_sha256() -> None:
    expected = hmac.new(
        SECRET, b"p2preg/1 tracker-client\0" + PEER + NONCE_T + NONCE_C, hashlib.sha256
    ).digest()
    assert client_mac(SECRET, PEER, NONCE_T, NONCE_C) == expected
    mac_t = hmac.new(
        SECRET, b"p2preg/1 tracker\0" + PEER + NONCE_C + NONCE_T + TOKEN, hashlib.sha256
    ).digest()
    assert verify_tracker_mac(SECRET, PEER, NONCE_C, NONCE_T, TOKEN, mac_t)
    assert not verify_tracker_mac(b"x" * 32, PEER, NONCE_C, NONCE_T, TOKEN, mac_t)


def test_session_maps_token_to_peer_until_expiry() -> None:
    table = SessionTable(SECRET, session_ttl=600.0)
    token = handshake(table, now=0.0)
    assert table.authenticate(token, 599.0) == PEER
    assert table.authenticate(token, 600.0) is None
    assert table.authenticate(b"z" * 32, 1.0) is None and table.authenticate(None, 1.0) is None


def test_wrong_secret_refused() -> None:
    table = SessionTable(SECRET)
    nonce_t = table.issue_challenge(PEER, 0.0, NONCE_T)
    with pytest.raises(AuthError, match="cluster secret"):
        table.open_session(
            PEER, nonce_t, NONCE_C, client_mac(b"w" * 32, PEER, nonce_t, NONCE_C), 0.0, TOKEN
        )
    assert table.session_count == 0


def test_challenge_is_single_use_so_replay_fails() -> None:
    table = SessionTable(SECRET)
    nonce_t = table.issue_challenge(PEER, 0.0, NONCE_T)
    mac_c = client_mac(SECRET, PEER, nonce_t, NONCE_C)
    table.open_session(PEER, nonce_t, NONCE_C, mac_c, 0.0, TOKEN)
    with pytest.raises(AuthError, match="used or expired"):
        table.open_session(PEER, nonce_t, NONCE_C, mac_c, 1.0, b"j" * 32)
    # A failed attempt consumes the challenge too: one nonce, one guess.
    nonce_t = table.issue_challenge(PEER, 0.0, b"u" * 32)
    with pytest.raises(AuthError):
        table.open_session(PEER, nonce_t, NONCE_C, b"\0" * 32, 0.0, TOKEN)
    with pytest.raises(AuthError, match="used or expired"):
        table.open_session(PEER, nonce_t, NONCE_C, mac_c, 0.0, TOKEN)


def test_challenge_expires_and_is_bound_to_its_peer() -> None:
    table = SessionTable(SECRET, challenge_ttl=30.0)
    nonce_t = table.issue_challenge(PEER, 0.0, NONCE_T)
    with pytest.raises(AuthError, match="expired"):
        table.open_session(
            PEER, nonce_t, NONCE_C, client_mac(SECRET, PEER, nonce_t, NONCE_C), 30.0, TOKEN
        )
    nonce_t = table.issue_challenge(PEER, 0.0, NONCE_T)
    with pytest.raises(AuthError, match="another peer"):
        table.open_session(
            OTHER, nonce_t, NONCE_C, client_mac(SECRET, OTHER, nonce_t, NONCE_C), 1.0, TOKEN
        )


def test_tables_are_bounded() -> None:
    table = SessionTable(SECRET, max_challenges=3, max_sessions=2)
    nonces = [bytes([n]) * 32 for n in range(5)]
    for nonce in nonces:
        table.issue_challenge(PEER, 0.0, nonce)
    with pytest.raises(AuthError):  # the oldest challenges were dropped
        table.open_session(
            PEER, nonces[0], NONCE_C, client_mac(SECRET, PEER, nonces[0], NONCE_C), 0.0, TOKEN
        )
    tokens = []
    for n in (2, 3, 4):
        token = bytes([0x80 + n]) * 32
        mac_c = client_mac(SECRET, PEER, nonces[n], NONCE_C)
        tokens.append(table.open_session(PEER, nonces[n], NONCE_C, mac_c, 0.0, token).token)
    assert table.session_count == 2
    assert table.authenticate(tokens[0], 1.0) is None
    assert table.authenticate(tokens[2], 1.0) == PEER
    table.sweep(10_000.0)
    assert table.session_count == 0


def test_authorization_header_round_trip() -> None:
    assert parse_authorization(authorization_header(TOKEN)) == TOKEN
    assert parse_authorization(f"p2preg {TOKEN.hex()}") == TOKEN
    for bad in (None, "", "Bearer x", "P2PREG", "P2PREG abc", f"P2PREG {'zz' * 32}"):
        assert parse_authorization(bad) is None


def test_cluster_secret_needs_16_bytes() -> None:
    assert parse_cluster_secret(b"  0123456789abcdef0123\n") == b"0123456789abcdef0123"
    with pytest.raises(ConfigError, match="at least 16 bytes"):
        parse_cluster_secret(b"short\n", "cluster secret file /x")
    assert SECRET not in repr(SessionTable(SECRET)).encode()
