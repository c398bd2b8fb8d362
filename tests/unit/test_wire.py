"""The peer wire codec and connection state machine: pure, no sockets.

Handshake (success, wrong secret, replay, reflection, self, version), a round trip of every
message type in random chunkings, decoding of hostile bytes (only events or RemoteProtocolError,
bounded buffering), and the state machine in the manner of h2's test_state_machines.py: every
(state, message) pair, and random send / receive sequences across both roles.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import itertools
import random
import struct
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, rule

from p2preg.bitfield import Bitfield
from p2preg.digest import Digest
from p2preg.errors import LocalProtocolError, RemoteProtocolError
from p2preg.metainfo import MIN_PIECE_LENGTH, MetaInfo
from p2preg.wire import (
    MAX_INDEX,
    MAX_QUERY_DIGESTS,
    MAX_TEXT,
    NEED_DATA,
    Auth,
    Authenticated,
    BitfieldMsg,
    Busy,
    Cancel,
    ConnectionClosed,
    Error,
    Event,
    GetMeta,
    Have,
    Hello,
    Holdings,
    Interest,
    KeepAlive,
    Message,
    Meta,
    PeerConnection,
    Piece,
    Progress,
    Query,
    Reject,
    Request,
    Role,
    State,
    encode,
)

SECRET = b"cluster secret for tests"
DIALER_ID = bytes(range(16))
LISTENER_ID = bytes(range(100, 116))
NONCE_D = b"D" * 32
NONCE_L = b"L" * 32
SHA = Digest.parse("sha256:" + "ab" * 32)
KiB = 1024
MiB = 1024 * KiB

# Small limits keep the hostile-input tests able to reach every bound quickly.
SMALL = {"max_header": 4 * KiB, "max_piece_payload": 64 * KiB}
FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- helpers -------------------------------------------------------------------------------------


def frame(obj: object) -> bytes:
    """A frame around any msgpack value: for forging what a well-behaved peer never sends."""
    body = msgpack.packb(obj, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


def make_pair(
    *, dialer_secret: bytes = SECRET, listener_secret: bytes = SECRET, **limits: int
) -> tuple[PeerConnection, PeerConnection]:
    dialer = PeerConnection(Role.DIALER, DIALER_ID, dialer_secret, NONCE_D, **limits)
    listener = PeerConnection(Role.LISTENER, LISTENER_ID, listener_secret, NONCE_L, **limits)
    return dialer, listener


def drain(conn: PeerConnection) -> list[Event]:
    events: list[Event] = []
    while True:
        event = conn.next_event()
        if event is NEED_DATA:
            return events
        assert not isinstance(event, type)
        events.append(event)
        if isinstance(event, (ConnectionClosed, Error)):
            return events


def feed(conn: PeerConnection, data: bytes, cuts: Iterable[int] = ()) -> list[Event]:
    """Feed ``data`` cut at ``cuts``, draining events after every chunk as an IO layer does."""
    events: list[Event] = []
    points = [0, *sorted({c for c in cuts if 0 < c < len(data)}), len(data)]
    for start, end in itertools.pairwise(points):
        conn.receive_data(data[start:end])
        events += drain(conn)
    return events


def handshake(dialer: PeerConnection, listener: PeerConnection) -> tuple[list[Event], list[Event]]:
    """Both send hello at once, then shuttle whatever each side has to send until quiet."""
    to_dialer, to_listener = listener.initiate(), dialer.initiate()
    d_events: list[Event] = []
    l_events: list[Event] = []
    while to_dialer or to_listener:
        if to_dialer:
            d_events += feed(dialer, to_dialer)
        if to_listener:
            l_events += feed(listener, to_listener)
        to_dialer, to_listener = listener.data_to_send(), dialer.data_to_send()
    return d_events, l_events


def open_pair(**limits: int) -> tuple[PeerConnection, PeerConnection]:
    dialer, listener = make_pair(**limits)
    handshake(dialer, listener)
    assert dialer.authenticated and listener.authenticated
    return dialer, listener


def spec_mac(
    secret: bytes, role: bytes, sender: bytes, receiver: bytes, r_nonce: bytes, s_nonce: bytes
) -> bytes:
    """The MAC exactly as docs/wire-protocol.md states it, computed independently."""
    data = b"p2preg/1 auth\x00" + role + sender + receiver + r_nonce + s_nonce
    return hmac.new(secret, data, hashlib.sha256).digest()


# -- strategies ------------------------------------------------------------------------------------

digests = st.one_of(
    st.binary(min_size=32, max_size=32).map(lambda b: Digest.parse("sha256:" + b.hex())),
    st.binary(min_size=64, max_size=64).map(lambda b: Digest.parse("sha512:" + b.hex())),
)
indexes = st.integers(0, MAX_INDEX)
short_text = st.text(max_size=40)


@st.composite
def bitfield_msgs(draw: st.DrawFn) -> BitfieldMsg:
    bits = draw(st.lists(st.booleans(), max_size=300))
    bitfield = Bitfield(len(bits))
    for index, bit in enumerate(bits):
        if bit:
            bitfield.add(index)
    return BitfieldMsg.of(draw(digests), bitfield)


@st.composite
def metainfos(draw: st.DrawFn) -> MetaInfo:
    piece_length = draw(st.sampled_from([MIN_PIECE_LENGTH, 4 * MiB]))
    size = draw(st.integers(0, 40 * piece_length))
    empty = MetaInfo.empty(draw(digests), size, piece_length)
    known = draw(st.sets(st.integers(0, max(0, empty.num_pieces - 1))))
    hashes = [(i, draw(st.binary(min_size=16, max_size=16))) for i in known if i < empty.num_pieces]
    return empty.with_hashes(hashes)


data_messages: st.SearchStrategy[Message] = st.one_of(
    st.builds(Interest, digests),
    bitfield_msgs(),
    st.builds(Have, digests, indexes),
    st.builds(Request, digests, indexes),
    st.builds(Progress, digests, indexes),
    st.builds(Busy, st.booleans()),
    st.builds(Piece, digests, indexes, st.binary(max_size=2048)),
    st.builds(Cancel, digests, indexes),
    st.builds(Reject, digests, st.integers(-1, MAX_INDEX), st.text(max_size=MAX_TEXT)),
    st.builds(Query, st.lists(digests, max_size=20).map(tuple)),
    st.builds(Holdings, st.lists(digests, max_size=20).map(tuple)),
    st.builds(GetMeta, digests),
    st.builds(Meta, metainfos()),
    st.builds(KeepAlive),
)
errors = st.builds(Error, st.text(max_size=64), st.text(max_size=MAX_TEXT))
handshake_messages: st.SearchStrategy[Message] = st.one_of(
    st.builds(Hello, st.binary(min_size=16, max_size=16), st.binary(min_size=32, max_size=32)),
    st.builds(Auth, st.binary(min_size=32, max_size=32)),
)
any_messages = st.one_of(data_messages, errors, handshake_messages)


def cut_points(total: int) -> st.SearchStrategy[list[int]]:
    return st.lists(st.integers(0, total), max_size=40)


# -- handshake -----------------------------------------------------------------------------------


def test_handshake_both_ways_yields_authenticated_with_the_right_ids() -> None:
    dialer, listener = make_pair()
    assert (dialer.state, listener.state) == (State.HELLO, State.HELLO)
    d_events, l_events = handshake(dialer, listener)
    assert d_events == [Hello(LISTENER_ID, NONCE_L), Authenticated(LISTENER_ID)]
    assert l_events == [Hello(DIALER_ID, NONCE_D), Authenticated(DIALER_ID)]
    assert (dialer.peer_id, listener.peer_id) == (LISTENER_ID, DIALER_ID)
    assert dialer.state is listener.state is State.OPEN
    assert dialer.data_to_send() == listener.data_to_send() == b""


def test_auth_mac_is_exactly_the_documented_hmac() -> None:
    dialer, listener = make_pair()
    feed(listener, dialer.initiate())
    feed(dialer, listener.initiate())  # hello + auth: the dialer's hello came first
    d_auth = msgpack.unpackb(dialer.data_to_send()[4:])
    assert d_auth == {
        "t": "auth",
        "mac": spec_mac(SECRET, b"D", DIALER_ID, LISTENER_ID, NONCE_L, NONCE_D),
    }


def test_peer_hello_before_initiate_keeps_hello_first_on_the_wire() -> None:
    dialer, listener = make_pair()
    assert feed(listener, dialer.initiate()) == [Hello(DIALER_ID, NONCE_D)]
    first = listener.initiate()  # hello, then the auth the dialer's hello already queued
    assert feed(dialer, first) == [Hello(LISTENER_ID, NONCE_L), Authenticated(LISTENER_ID)]
    assert feed(listener, dialer.data_to_send()) == [Authenticated(DIALER_ID)]
    with pytest.raises(LocalProtocolError, match="already"):
        listener.initiate()


def test_send_returns_undrained_handshake_bytes_first() -> None:
    dialer, listener = make_pair()
    to_listener, to_dialer = dialer.initiate(), listener.initiate()
    feed(listener, to_listener)
    feed(dialer, to_dialer)
    feed(listener, dialer.data_to_send())  # the listener has verified the dialer...
    assert listener.authenticated
    out = listener.send(Interest(SHA))  # ...and never drained its own auth: it comes first
    assert feed(dialer, out) == [Authenticated(LISTENER_ID), Interest(SHA)]


@pytest.mark.parametrize("wrong_side", ["dialer", "listener"])
def test_wrong_secret_is_refused(wrong_side: str) -> None:
    bad = {f"{wrong_side}_secret": b"not the cluster secret"}
    dialer, listener = make_pair(**bad)
    to_listener, to_dialer = dialer.initiate(), listener.initiate()
    feed(listener, to_listener)
    feed(dialer, to_dialer)
    with pytest.raises(RemoteProtocolError, match="failed authentication"):
        feed(listener, dialer.data_to_send())
    with pytest.raises(RemoteProtocolError, match="failed authentication"):
        feed(dialer, listener.data_to_send())
    assert listener.state is dialer.state is State.ERROR
    assert listener.peer_id is None and not dialer.authenticated


def test_replayed_handshake_is_refused() -> None:
    dialer, listener = make_pair()
    captured = dialer.initiate()
    feed(dialer, listener.initiate())
    captured += dialer.data_to_send()
    assert feed(listener, captured)[-1] == Authenticated(DIALER_ID)
    # Later the attacker replays the dialer's hello and auth at the same listener node, which
    # now has a fresh nonce: the old MAC bound the old nonce.
    fresh = PeerConnection(Role.LISTENER, LISTENER_ID, SECRET, b"f" * 32)
    fresh.initiate()
    with pytest.raises(RemoteProtocolError, match="failed authentication"):
        feed(fresh, captured)
    assert not fresh.authenticated


def test_reflected_auth_is_refused() -> None:
    listener = PeerConnection(Role.LISTENER, LISTENER_ID, SECRET, NONCE_L)
    listener.initiate()
    # An attacker without the secret claims some id, then echoes the listener's own auth back.
    feed(listener, encode(Hello(DIALER_ID, NONCE_D)))
    reflected = listener.data_to_send()
    with pytest.raises(RemoteProtocolError, match="failed authentication"):
        feed(listener, reflected)


def test_role_byte_alone_changes_the_mac() -> None:
    # Same ids and nonces on both sides: only the role byte tells the two MACs apart.
    same = b"s" * 16
    assert spec_mac(SECRET, b"D", same, same, NONCE_L, NONCE_L) != spec_mac(
        SECRET, b"L", same, same, NONCE_L, NONCE_L
    )


def test_connecting_to_self_is_refused() -> None:
    dialer = PeerConnection(Role.DIALER, LISTENER_ID, SECRET, NONCE_D)
    listener = PeerConnection(Role.LISTENER, LISTENER_ID, SECRET, NONCE_L)
    listener.initiate()
    with pytest.raises(RemoteProtocolError, match="connected to self"):
        feed(listener, dialer.initiate())


@pytest.mark.parametrize("version", [0, 1, 2, 4, 1 << 40])
def test_version_mismatch_is_refused(version: int) -> None:
    _, listener = make_pair()
    hello = frame({"t": "hello", "v": version, "id": DIALER_ID, "nonce": NONCE_D, "new": 1})
    with pytest.raises(RemoteProtocolError, match=f"unsupported protocol version {version}"):
        feed(listener, hello)


@given(message=st.one_of(data_messages, st.builds(Auth, st.binary(min_size=32, max_size=32))))
@FAST
def test_any_message_before_the_hello_is_refused(message: Message) -> None:
    _, listener = make_pair()
    with pytest.raises(RemoteProtocolError, match="refused before the handshake"):
        feed(listener, encode(message))


@given(message=data_messages)
@FAST
def test_any_message_between_hello_and_auth_is_refused(message: Message) -> None:
    dialer, listener = make_pair()
    assert feed(listener, dialer.initiate()) == [Hello(DIALER_ID, NONCE_D)]
    with pytest.raises(RemoteProtocolError, match="refused before authentication"):
        feed(listener, encode(message))
    assert listener.their_state is State.ERROR


def test_unauthenticated_peer_cannot_make_us_buffer_a_big_frame() -> None:
    _, listener = make_pair()
    listener.receive_data(struct.pack(">I", 64 * KiB))
    with pytest.raises(RemoteProtocolError, match="exceeds the limit of 8192"):
        listener.next_event()


@given(message=data_messages)
@FAST
def test_send_before_auth_is_a_local_error(message: Message) -> None:
    dialer, listener = make_pair()
    with pytest.raises(LocalProtocolError, match="before the peer is authenticated"):
        dialer.send(message)
    feed(dialer, listener.initiate())  # hello received, our auth queued: still not allowed
    with pytest.raises(LocalProtocolError, match="before the peer is authenticated"):
        dialer.send(message)
    with pytest.raises(LocalProtocolError):
        dialer.piece_header(SHA, 0, 10)


@pytest.mark.parametrize("message", [Hello(DIALER_ID, NONCE_D), Auth(b"m" * 32)])
def test_handshake_messages_are_never_sent_by_hand(message: Message) -> None:
    dialer, _ = open_pair()
    with pytest.raises(LocalProtocolError, match="produced by the connection itself"):
        dialer.send(message)


def test_error_during_the_handshake_tells_the_peer_why() -> None:
    dialer, listener = make_pair()
    out = listener.send(Error("draining", "go away"))  # carries the hello first
    assert listener.our_state is State.CLOSED
    assert feed(listener, dialer.initiate()) == [Hello(DIALER_ID, NONCE_D)]
    assert listener.data_to_send() == b""  # no auth after we gave up
    with pytest.raises(RemoteProtocolError, match="peer refused the handshake: draining"):
        feed(dialer, out)


def test_eof_during_the_handshake_is_an_error() -> None:
    dialer, listener = make_pair()
    feed(listener, dialer.initiate())
    with pytest.raises(RemoteProtocolError, match="during the handshake"):
        feed(listener, b"")


def test_not_a_message_is_a_local_error() -> None:
    dialer, _ = open_pair()
    with pytest.raises(LocalProtocolError, match="not a wire message"):
        dialer.send(Authenticated(DIALER_ID))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"local_id": b"short"},
        {"nonce": b"n" * 31},
        {"secret": b""},
        {"max_header": 10},
        {"max_piece_payload": -1},
    ],
)
def test_bad_constructor_arguments(kwargs: dict[str, Any]) -> None:
    args: dict[str, Any] = {"local_id": DIALER_ID, "secret": SECRET, "nonce": NONCE_D} | kwargs
    with pytest.raises(ValueError):
        PeerConnection(Role.DIALER, **args)


# -- round trips ---------------------------------------------------------------------------------


@given(
    messages=st.lists(data_messages, min_size=1, max_size=8),
    closing=st.one_of(st.none(), errors),
    from_dialer=st.booleans(),
    data=st.data(),
)
@FAST
def test_round_trip_of_every_message_type(
    messages: list[Message],
    closing: Error | None,
    from_dialer: bool,
    data: st.DataObject,
) -> None:
    dialer, listener = open_pair()
    sender, receiver = (dialer, listener) if from_dialer else (listener, dialer)
    wire = b"".join(sender.send(m) for m in messages)
    expected: list[Event] = list(messages)
    if closing is not None:
        wire += sender.send(closing)
        expected.append(closing)
    else:
        expected.append(ConnectionClosed())
    events = feed(receiver, wire, data.draw(cut_points(len(wire))))
    if closing is None:
        receiver.receive_data(b"")
        events += drain(receiver)
    assert events == expected
    assert receiver.their_state is State.CLOSED
    assert receiver.buffered_bytes == 0


@given(
    size=st.integers(0, 3 * MiB),
    seed=st.integers(0, 2**32),
    data=st.data(),
)
@settings(max_examples=15, deadline=None)
def test_large_pieces_in_random_chunks(size: int, seed: int, data: st.DataObject) -> None:
    dialer, listener = open_pair()
    payload = random.Random(seed).randbytes(size)
    wire = dialer.send(Piece(SHA, 7, payload)) + dialer.send(Have(SHA, 7))
    events = feed(listener, wire, data.draw(cut_points(len(wire))))
    assert events == [Piece(SHA, 7, payload), Have(SHA, 7)]


def test_piece_header_then_raw_payload_like_sendfile() -> None:
    dialer, listener = open_pair()
    payload = random.Random(1).randbytes(4 * MiB)
    header = dialer.piece_header(SHA, 3, len(payload))
    # 4 MiB in 1 KiB chunks: 4096 receive_data calls; quadratic buffering would crawl here.
    cuts = range(len(header), len(header) + len(payload), KiB)
    assert feed(listener, header + payload, cuts) == [Piece(SHA, 3, payload)]
    assert listener.buffered_bytes == 0


def test_piece_header_is_bounded() -> None:
    dialer, _ = open_pair(**SMALL)
    with pytest.raises(LocalProtocolError, match="exceeds the limit"):
        dialer.piece_header(SHA, 0, SMALL["max_piece_payload"] + 1)
    with pytest.raises(LocalProtocolError):
        dialer.piece_header(SHA, -1, 10)


@pytest.mark.parametrize(
    "message",
    [
        Have(SHA, -1),
        Request(SHA, MAX_INDEX + 1),
        Progress(SHA, -1),
        Reject(SHA, -2, ""),
        Reject(SHA, 0, "x" * (MAX_TEXT + 1)),
        Error("c" * 65, ""),
        Query((SHA,) * (MAX_QUERY_DIGESTS + 1)),
        BitfieldMsg(SHA, 3, b"\xff"),  # spare bits set
        BitfieldMsg(SHA, 9, b"\x00"),  # too short
        Piece(SHA, 0, b"x" * (SMALL["max_piece_payload"] + 1)),
        Meta(MetaInfo.empty(SHA, 1 << 30, MIN_PIECE_LENGTH)),  # 16384 hashes: over 4 KiB
    ],
    ids=repr,
)
def test_send_checks_fields_like_the_receiver_does(message: Message) -> None:
    dialer, _ = open_pair(**SMALL)
    with pytest.raises(LocalProtocolError, match=r"cannot send|exceeds the limit"):
        dialer.send(message)
    assert dialer.our_state is State.OPEN  # nothing was sent


def test_after_sending_an_error_nothing_more_is_sent() -> None:
    dialer, listener = open_pair()
    assert feed(listener, dialer.send(Error("shutdown", "bye"))) == [Error("shutdown", "bye")]
    with pytest.raises(LocalProtocolError, match="already sent an error"):
        dialer.send(KeepAlive())
    with pytest.raises(LocalProtocolError, match="already sent an error"):
        dialer.send(Error("again", ""))


def test_after_receiving_an_error_or_eof_nothing_more_is_received() -> None:
    dialer, listener = open_pair()
    feed(listener, dialer.send(Error("shutdown", "bye")))
    listener.receive_data(b"")  # EOF after the error is expected
    with pytest.raises(RemoteProtocolError, match="already ended"):
        listener.next_event()
    with pytest.raises(RemoteProtocolError, match="after the connection ended"):
        listener.receive_data(b"\x00")
    dialer2, listener2 = open_pair()
    listener2.receive_data(b"")
    assert listener2.next_event() == ConnectionClosed()
    with pytest.raises(RemoteProtocolError):
        listener2.next_event()
    with pytest.raises(RemoteProtocolError):
        listener2.receive_data(dialer2.send(KeepAlive()))
    # We can still say goodbye after the peer closed.
    assert listener2.send(Error("closing", "")).startswith(b"\x00\x00")


def test_events_before_eof_are_still_delivered() -> None:
    dialer, listener = open_pair()
    listener.receive_data(dialer.send(Have(SHA, 1)) + dialer.send(Have(SHA, 2)))
    listener.receive_data(b"")
    assert drain(listener) == [Have(SHA, 1), Have(SHA, 2), ConnectionClosed()]


def test_receive_without_draining_is_bounded() -> None:
    dialer, listener = open_pair(max_header=KiB, max_piece_payload=0)
    keepalives = dialer.send(KeepAlive()) * 200  # far more than 4 + 1 KiB, all complete
    listener.receive_data(keepalives)
    with pytest.raises(LocalProtocolError, match="call next_event"):
        listener.receive_data(keepalives)


# -- hostile bytes -------------------------------------------------------------------------------

GOOD_D = str(SHA)


HOSTILE_LIMITS = {"max_header": 128 * KiB, "max_piece_payload": 64 * KiB}
BAD_FRAMES = [
    (struct.pack(">I", 128 * KiB + 1), "exceeds the limit of 131072"),
    (struct.pack(">I", 1 << 31), "exceeds the limit"),
    (struct.pack(">I", 0), "empty frame"),
    (frame({"t": "piece", "d": GOOD_D, "i": 0, "n": 64 * KiB + 1}), "piece payload of"),
    (struct.pack(">I", 1) + b"\xc1", "malformed msgpack"),
    (struct.pack(">I", 2) + b"\x81\xa1", "malformed msgpack"),  # truncated map
    (struct.pack(">I", 2) + b"\x80\xc0", "malformed msgpack"),  # trailing data
    (struct.pack(">I", 3) + b"\xd4\x01\x00", "malformed msgpack"),  # ext type
    (struct.pack(">I", 3) + b"\xa2\xff\xfe", "malformed msgpack"),  # bad utf-8
    (struct.pack(">I", 3) + b"\x81\x01\x01", "malformed msgpack"),  # int key
    (struct.pack(">I", 3000) + b"\x91" * 3000, "malformed msgpack"),  # deep nesting
    (frame(["t", "keepalive"]), "must be a msgpack map"),
    (frame({"type": "keepalive"}), "message type"),
    (frame({"t": b"keepalive"}), "message type"),
    (frame({"t": "choke"}), "unknown message type 'choke'"),
    (frame({"t": "have", "d": GOOD_D}), "have is missing field"),
    (frame({"t": "have", "d": GOOD_D, "i": 1, "x": 1}), "unexpected field"),
    (frame({"t": "have", "d": GOOD_D, "i": 1, b"x": 1}), "unexpected field"),
    (frame({"t": "have", "d": GOOD_D, "i": "1"}), r"have\.i must be an integer"),
    (frame({"t": "have", "d": GOOD_D, "i": True}), r"have\.i must be an integer"),
    (frame({"t": "have", "d": GOOD_D, "i": 1.0}), r"have\.i must be an integer"),
    (frame({"t": "have", "d": GOOD_D, "i": -1}), "out of range"),
    (frame({"t": "have", "d": GOOD_D, "i": 1 << 63}), "out of range"),
    (frame({"t": "have", "d": [GOOD_D], "i": 1}), r"have\.d must be a digest string"),
    (frame({"t": "have", "d": {"x": GOOD_D}, "i": 1}), r"have\.d must be a digest string"),
    (frame({"t": "progress", "d": GOOD_D}), "progress is missing field"),
    (frame({"t": "progress", "d": GOOD_D, "h": -1}), "out of range"),
    (frame({"t": "progress", "d": GOOD_D, "h": "7"}), r"progress\.h must be an integer"),
    (frame({"t": "busy"}), "busy is missing field"),
    (frame({"t": "busy", "b": 1}), r"busy\.b must be true or false, not int"),
    (frame({"t": "busy", "b": None}), r"busy\.b must be true or false"),
    (frame({"t": "busy", "b": True, "d": GOOD_D}), "busy has unexpected field"),
    (frame({"t": "interest", "d": "sha256:../../etc/passwd"}), "not a valid digest"),
    (frame({"t": "interest", "d": "md5:" + "ab" * 16}), "not a valid digest"),
    (frame({"t": "interest", "d": "sha256:" + "AB" * 32}), "not a valid digest"),
    (frame({"t": "interest", "d": "x" * 300}), "too long to be a digest"),
    (frame({"t": "reject", "d": GOOD_D, "i": -2, "why": ""}), "out of range"),
    (frame({"t": "reject", "d": GOOD_D, "i": 0, "why": "x" * 1025}), "longer than 1024"),
    (frame({"t": "error", "code": "x", "msg": b"bytes"}), r"error\.msg must be a string"),
    (frame({"t": "query", "ds": GOOD_D}), r"query\.ds must be a list"),
    (frame({"t": "query", "ds": [GOOD_D] * 1025}), "more than 1024"),
    (frame({"t": "holdings", "ds": [GOOD_D, 7]}), "must be a digest string"),
    (frame({"t": "bitfield", "d": GOOD_D, "n": 3, "b": b"\x10"}), "bits set past"),
    (frame({"t": "bitfield", "d": GOOD_D, "n": 30, "b": b"\x10"}), "bitfield of 1 bytes"),
    (frame({"t": "bitfield", "d": GOOD_D, "n": 8, "b": "\x10"}), "must be binary"),
    (frame({"t": "meta", "m": []}), "metainfo must be a map"),
    (frame({"t": "meta", "m": {"d": GOOD_D, "s": 1, "p": 3, "h": [b""]}}), "piece length"),
    (
        frame({"t": "meta", "m": {"d": GOOD_D, "s": 1, "p": MIN_PIECE_LENGTH, "h": []}}),
        "one hash per piece",
    ),
    (
        frame({"t": "meta", "m": {"d": GOOD_D, "s": 0, "p": MIN_PIECE_LENGTH, "h": [], "x": 0}}),
        r"meta\.m must have exactly",
    ),
    (frame({"t": "hello", "v": 1, "id": DIALER_ID, "nonce": NONCE_D}), "unexpected hello"),
    (frame({"t": "auth", "mac": b"m" * 32}), "unexpected auth"),
    (struct.pack(">I", 9) + b"\x82\xa1t\xa1t\xa1t\xa1t", "duplicate key"),
]


@pytest.mark.parametrize(("wire", "match"), BAD_FRAMES, ids=[m for _, m in BAD_FRAMES])
def test_bad_frames_are_remote_protocol_errors(wire: bytes, match: str) -> None:
    _, listener = open_pair(**HOSTILE_LIMITS)
    listener.receive_data(wire)
    with pytest.raises(RemoteProtocolError, match=match):
        listener.next_event()
    assert listener.their_state is State.ERROR
    with pytest.raises(RemoteProtocolError, match="after a protocol error"):
        listener.next_event()


def test_oversized_length_is_rejected_before_the_body_arrives() -> None:
    _, listener = open_pair()
    listener.receive_data(b"\x80\x00")
    assert listener.next_event() is NEED_DATA
    listener.receive_data(b"\x00\x00")  # 2**31, and not one byte of the body
    with pytest.raises(RemoteProtocolError, match="2147483648 bytes exceeds"):
        listener.next_event()
    assert listener.buffered_bytes == 0


def test_oversized_piece_is_rejected_before_the_payload_arrives() -> None:
    _, listener = open_pair(**SMALL)
    listener.receive_data(frame({"t": "piece", "d": GOOD_D, "i": 0, "n": MAX_INDEX}))
    with pytest.raises(RemoteProtocolError, match="4294967295 bytes exceeds the limit of 65536"):
        listener.next_event()


@pytest.mark.parametrize(
    "wire",
    [
        b"\x00\x00",  # half a length
        b"\x00\x00\x00\x10",  # a length and no body
        frame({"t": "keepalive"})[:-2],  # part of a body
        frame({"t": "piece", "d": GOOD_D, "i": 0, "n": 10}) + b"12345",  # part of a payload
    ],
)
def test_eof_mid_frame_is_a_remote_protocol_error(wire: bytes) -> None:
    _, listener = open_pair()
    assert feed(listener, wire) == []
    listener.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="mid-frame"):
        listener.next_event()


msgpack_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**63), 2**64 - 1),
        st.floats(allow_nan=False),
        st.text(max_size=20),
        st.binary(max_size=40),
        st.sampled_from([GOOD_D, "sha256:" + "0" * 64, "sha512:" + "1" * 128]),
    ),
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.text(max_size=5), children, max_size=4),
    ),
    max_leaves=10,
)
field_names = st.sampled_from(["v", "id", "nonce", "mac", "d", "n", "b", "i", "why", "ds", "m"])
type_names = st.sampled_from(
    [
        *("hello", "auth", "interest", "bitfield", "have", "request", "piece", "cancel"),
        *("reject", "query", "holdings", "get_meta", "meta", "error", "keepalive", "nope"),
    ]
)
forged_frames = st.builds(
    lambda t, fields: frame({"t": t, **fields}),
    type_names,
    st.dictionaries(field_names, msgpack_values, max_size=4),
)
hostile_chunks = st.lists(
    st.one_of(
        st.binary(max_size=64),
        forged_frames,
        any_messages.map(lambda m: encode(m, max_header=SMALL["max_header"] * 4)),
        st.integers(0, 2**32 - 1).map(lambda n: struct.pack(">I", n)),
    ),
    max_size=12,
)


@given(chunks=hostile_chunks, authenticated=st.booleans(), data=st.data())
@settings(max_examples=150, deadline=None)
def test_arbitrary_bytes_yield_events_or_remote_protocol_error(
    chunks: list[bytes], authenticated: bool, data: st.DataObject
) -> None:
    if authenticated:
        _, conn = open_pair(**SMALL)
    else:
        conn = make_pair(**SMALL)[1]
        conn.initiate()
    wire = b"".join(chunks)
    cuts = data.draw(cut_points(len(wire)))
    # The largest incomplete event: a maximal frame, or a maximal payload after its header.
    bound = max(4 + SMALL["max_header"], SMALL["max_piece_payload"])
    try:
        points = [0, *sorted(set(cuts)), len(wire)]
        for start, end in itertools.pairwise(points):
            if start == end:
                continue
            conn.receive_data(wire[start:end])
            while (event := conn.next_event()) is not NEED_DATA:
                assert isinstance(event, (*EVENT_TYPES,))
            assert conn.buffered_bytes < bound
        conn.receive_data(b"")
        while (event := conn.next_event()) is not NEED_DATA:
            assert isinstance(event, (*EVENT_TYPES,))
    except RemoteProtocolError:
        assert conn.their_state in (State.ERROR, State.CLOSED)


EVENT_TYPES = (
    Hello,
    Authenticated,
    Interest,
    BitfieldMsg,
    Have,
    Request,
    Busy,
    Progress,
    Piece,
    Cancel,
    Reject,
    Query,
    Holdings,
    GetMeta,
    Meta,
    Error,
    KeepAlive,
    ConnectionClosed,
)


# -- the state machine ---------------------------------------------------------------------------
# The spec, written independently of the tables in p2preg/wire.py.

HANDSHAKE_TYPES = (Hello, Auth)


def may_send(conn: PeerConnection, message: Message) -> bool:
    if isinstance(message, HANDSHAKE_TYPES) or conn.our_state is State.CLOSED:
        return False
    return isinstance(message, Error) or conn.our_state is State.OPEN


def accepts(their_state: State, message: Message) -> bool:
    """Whether receiving ``message`` yields an event (rather than RemoteProtocolError)."""
    if their_state is State.HELLO:
        return isinstance(message, Hello) and message.peer_id != LISTENER_ID
    if their_state is State.OPEN:
        return not isinstance(message, HANDSHAKE_TYPES)
    return False  # AUTH: only a valid MAC, which a random one is not; CLOSED, ERROR: nothing


def _fresh() -> PeerConnection:
    listener = make_pair()[1]
    listener.initiate()
    return listener


def _hello_received() -> PeerConnection:
    listener = _fresh()
    feed(listener, encode(Hello(DIALER_ID, NONCE_D)))
    return listener


def _sent_error(make: Callable[[], PeerConnection]) -> Callable[[], PeerConnection]:
    def build() -> PeerConnection:
        conn = make()
        conn.send(Error("bye", ""))
        return conn

    return build


def _open() -> PeerConnection:
    return open_pair()[1]


def _peer_error() -> PeerConnection:
    listener = _open()
    feed(listener, encode(Error("bye", "")))
    return listener


def _peer_eof() -> PeerConnection:
    listener = _open()
    feed(listener, b"")
    return listener


def _remote_error() -> PeerConnection:
    listener = _open()
    with pytest.raises(RemoteProtocolError):
        feed(listener, b"\x00\x00\x00\x00")
    return listener


STAGES: dict[str, Callable[[], PeerConnection]] = {
    "fresh": _fresh,
    "hello received": _hello_received,
    "open": _open,
    "peer sent error": _peer_error,
    "peer closed": _peer_eof,
    "peer broke the protocol": _remote_error,
    "we sent error, fresh": _sent_error(_fresh),
    "we sent error, hello received": _sent_error(_hello_received),
    "we sent error, open": _sent_error(_open),
}


@given(stage=st.sampled_from(sorted(STAGES)), message=any_messages)
@settings(max_examples=200, deadline=None)
def test_every_state_and_message(stage: str, message: Message) -> None:
    """h2-style: for every state x input, the outcome is the spec's, and the error is typed."""
    conn = STAGES[stage]()
    our_state, their_state = conn.our_state, conn.their_state
    if may_send(conn, message):
        assert conn.send(message)
    else:
        with pytest.raises(LocalProtocolError):
            conn.send(message)
        assert conn.our_state is our_state

    conn = STAGES[stage]()
    wire = encode(message)
    if their_state in (State.CLOSED, State.ERROR):
        with pytest.raises(RemoteProtocolError):
            conn.receive_data(wire)
        assert conn.their_state is their_state
    elif accepts(their_state, message):
        events = feed(conn, wire)
        assert events == [message]
        assert conn.their_state in State
    else:
        with pytest.raises(RemoteProtocolError):
            feed(conn, wire)
        assert conn.their_state is State.ERROR


class TwoPeers(RuleBasedStateMachine):
    """A dialer and a listener joined by two in-memory wires. Rules send (through the
    connection, which may refuse), inject (raw frames the peer's state machine never vetted),
    corrupt, deliver in chunks, and close. Only Local/RemoteProtocolError may ever be raised;
    on untouched wires every message arrives intact and in order."""

    def __init__(self) -> None:
        super().__init__()
        dialer, listener = make_pair(**SMALL)
        self.conns = {Role.DIALER: dialer, Role.LISTENER: listener}
        self.wire = {role: bytearray() for role in Role}  # bytes in flight *to* role
        self.eof = dict.fromkeys(Role, False)  # the peer of role has closed its side
        self.eof_delivered = dict.fromkeys(Role, False)
        self.dead = dict.fromkeys(Role, False)  # role's connection raised RemoteProtocolError
        self.trusted = dict.fromkeys(Role, True)  # the wire to role carries only send() output
        self.expected: dict[Role, deque[Message]] = {role: deque() for role in Role}

    def _emit(self, sender: Role, data: bytes) -> None:
        if data and not self.eof[sender.other]:
            self.wire[sender.other] += data

    @rule(side=st.sampled_from(Role))
    def initiate(self, side: Role) -> None:
        with contextlib.suppress(LocalProtocolError):
            self._emit(side, self.conns[side].initiate())

    @rule(side=st.sampled_from(Role), message=any_messages)
    def send(self, side: Role, message: Message) -> None:
        conn = self.conns[side]
        if self.eof[side.other]:
            return  # a closed side sends nothing
        allowed = may_send(conn, message)
        try:
            out = conn.send(message)
        except LocalProtocolError:
            assert not allowed
            return
        assert allowed
        self._emit(side, out)
        self.expected[side.other].append(message)

    # Tampering and closing break the clean path, so they fire on one draw in four: most runs
    # should still get past the handshake and exchange messages.
    @rule(side=st.sampled_from(Role), message=any_messages, dice=st.integers(0, 3))
    def inject(self, side: Role, message: Message, dice: int) -> None:
        """The peer sends ``message`` whatever its state: the receiver's checks must hold."""
        if dice:
            return
        try:
            data = encode(message, **SMALL)
        except LocalProtocolError:
            return
        self.trusted[side.other] = False
        self._emit(side, data)

    @rule(
        side=st.sampled_from(Role), data=st.binary(min_size=1, max_size=16), dice=st.integers(0, 3)
    )
    def corrupt(self, side: Role, data: bytes, dice: int) -> None:
        if dice:
            return
        self.trusted[side.other] = False
        self._emit(side, data)

    @rule(side=st.sampled_from(Role), dice=st.integers(0, 3))
    def close(self, side: Role, dice: int) -> None:
        if not dice:
            self.eof[side.other] = True

    @rule(side=st.sampled_from(Role), size=st.integers(1, 5000))
    def deliver(self, side: Role, size: int) -> None:
        conn, wire = self.conns[side], self.wire[side]
        chunk = bytes(wire[:size])
        del wire[:size]
        if not chunk:
            if not self.eof[side] or self.eof_delivered[side]:
                return
            self.eof_delivered[side] = True
        try:
            conn.receive_data(chunk)
            while (event := conn.next_event()) is not NEED_DATA:
                self._emit(side, conn.data_to_send())
                self._check_event(side, event)
        except RemoteProtocolError:
            self.dead[side] = True
            assert conn.their_state in (State.ERROR, State.CLOSED)
        self._emit(side, conn.data_to_send())
        assert conn.buffered_bytes < 4 + SMALL["max_header"] + SMALL["max_piece_payload"]

    @rule()
    def pump(self) -> None:
        for _ in range(3):
            for role in Role:
                self.deliver(role, 1 << 30)

    def _check_event(self, side: Role, event: object) -> None:
        conn = self.conns[side]
        if isinstance(event, Hello):
            assert conn.their_state is State.AUTH
        elif isinstance(event, Authenticated):
            assert conn.authenticated and event.peer_id == conn.peer_id
            assert conn.peer_id == self.conns[side.other].local_id or not self.trusted[side]
        elif isinstance(event, ConnectionClosed):
            assert self.eof[side] and conn.their_state is State.CLOSED
        else:
            assert conn.authenticated
            if self.trusted[side]:
                assert event == self.expected[side].popleft()

    def teardown(self) -> None:
        """On clean wires, flushing everything completes the handshake and every message."""
        clean = not any(self.eof.values()) and all(self.trusted.values())
        clean = clean and not any(self.dead.values())
        clean = clean and all(c.our_state is not State.CLOSED for c in self.conns.values())
        if not clean:
            return
        self.initiate(Role.DIALER)
        self.initiate(Role.LISTENER)
        self.pump()
        assert all(c.authenticated for c in self.conns.values())
        assert not any(self.expected.values())


TwoPeers.TestCase.settings = settings(max_examples=60, stateful_step_count=25, deadline=None)
test_two_peers = TwoPeers.TestCase


def test_digests_parsed_once_are_reused_and_bad_ones_never_cached() -> None:
    import p2preg.wire as wire

    _, listener = open_pair()
    bad = "sha256:" + "zz" * 32
    for _ in range(2):  # a bad digest is refused every time, not remembered as good
        _, conn = open_pair()
        conn.receive_data(frame({"t": "have", "d": bad, "i": 1}))
        with pytest.raises(RemoteProtocolError, match="not a valid digest"):
            conn.next_event()
    assert bad not in wire._parsed_digests
    listener.receive_data(frame({"t": "have", "d": GOOD_D, "i": 1}) * 2)
    first, second = listener.next_event(), listener.next_event()
    assert isinstance(first, Have) and isinstance(second, Have)
    assert first.digest == second.digest == Digest.parse(GOOD_D)
    assert first.digest is second.digest  # parsed once
    # Bounded: a peer naming ever new digests cannot grow it.
    for n in range(wire._PARSED_DIGESTS_MAX + 10):
        listener.receive_data(frame({"t": "have", "d": f"sha256:{n:064x}", "i": 1}))
        assert isinstance(listener.next_event(), Have)
    assert len(wire._parsed_digests) <= wire._PARSED_DIGESTS_MAX


@given(st.integers(min_value=0, max_value=100))
def test_a_full_bitfield_is_every_piece_added_one_by_one(size: int) -> None:
    one_by_one = Bitfield(size)
    for index in range(size):
        one_by_one.add(index)
    full = Bitfield.full(size)
    assert full == one_by_one and len(full) == size and full.complete
    assert Bitfield.from_bytes(size, full.to_bytes()) == full  # (spare bits stay zero)
