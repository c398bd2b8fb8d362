"""The peer wire protocol, version 2: framing, messages, and the per-connection state machine.

Sans-IO in the manner of h11: this module never touches a socket, a clock or a random source.
Bytes go in with :meth:`PeerConnection.receive_data` and come out as events from
:meth:`PeerConnection.next_event`; messages go in with :meth:`PeerConnection.send` and come out
as bytes. Decoding raises only :class:`RemoteProtocolError` (the peer's fault); asking for
something the protocol forbids right now raises :class:`LocalProtocolError` (our fault).

Framing: ``uint32 big-endian length L`` + ``L bytes of msgpack`` (a map with a ``"t"`` type
key). A ``piece`` frame carries ``"n"``, and exactly ``n`` raw payload bytes follow it, never
copied through msgpack, so the IO layer can send them with ``os.sendfile`` after
:meth:`PeerConnection.piece_header`. docs/wire-protocol.md has the full specification.

How an IO layer drives a connection::

    conn = PeerConnection(role, local_id, secret, os.urandom(32))
    await stream.send_all(conn.initiate())            # our hello, sent at once by both sides
    while True:
        event = conn.next_event()                     # raises RemoteProtocolError: close
        if out := conn.data_to_send():                # our auth, queued by the peer's hello
            await stream.send_all(out)
        if event is NEED_DATA:
            conn.receive_data(await stream.receive_some(65536))   # b"" = the peer closed
        elif isinstance(event, Authenticated): ...    # now send() is allowed
        elif isinstance(event, (Error, ConnectionClosed)): break
        else: ...                                     # a data message
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final, NoReturn, TypeAlias, assert_never

import msgpack  # type: ignore[import-untyped]

from p2preg.bitfield import Bitfield
from p2preg.digest import Digest
from p2preg.errors import LocalProtocolError, RegistryError, RemoteProtocolError
from p2preg.metainfo import MetaInfo

# 2: the progress message (a downloader tells its peers how many pieces it holds).
# 3: the busy message (a downloader tells its peers whether it receives many pieces at once).
PROTOCOL_VERSION: Final = 3
ID_LENGTH: Final = 16
NONCE_LENGTH: Final = 32
MAC_LENGTH: Final = 32
DEFAULT_MAX_HEADER: Final = 1 << 20
DEFAULT_MAX_PIECE_PAYLOAD: Final = 64 << 20
# Before the peer is authenticated, only hello, auth and error can arrive: all are small. An
# unauthenticated peer cannot make us buffer a 1 MiB frame.
HANDSHAKE_MAX_FRAME: Final = 8 << 10
MAX_QUERY_DIGESTS: Final = 1024
MAX_TEXT: Final = 1024  # reject.why and error.msg, in characters
MAX_ERROR_CODE: Final = 64
MAX_INDEX: Final = (1 << 32) - 1  # piece indexes and counts; 1 TiB / 64 KiB = 2**24 pieces
AUTH_CONTEXT: Final = b"p2preg/1 auth\0"

_LENGTH: Final = struct.Struct(">I")
_MAX_DIGEST_TEXT: Final = 256  # longer than any supported digest; checked before parsing
_MAX_MAP_LEN: Final = 16  # no map in the protocol has more keys than this
_MIN_MAX_HEADER: Final = 1024
_METAINFO_KEYS: Final = frozenset({"d", "s", "p", "h"})


class Role(enum.Enum):
    """Which side opened the TCP connection. The value is the role byte bound into the MAC."""

    DIALER = b"D"
    LISTENER = b"L"

    @property
    def other(self) -> Role:
        return Role.LISTENER if self is Role.DIALER else Role.DIALER


class State(enum.Enum):
    """The state of one side of a connection (see the table before :class:`PeerConnection`)."""

    HELLO = "HELLO"
    AUTH = "AUTH"
    OPEN = "OPEN"
    CLOSED = "CLOSED"
    ERROR = "ERROR"


class _Sentinel(type):
    def __repr__(cls) -> str:
        return cls.__name__


class NEED_DATA(metaclass=_Sentinel):  # a sentinel class, as h11's
    """Returned by :meth:`PeerConnection.next_event` when it needs more bytes to go on."""


# -- messages and events -----------------------------------------------------------------------
# A message is what goes over the wire; an event is what next_event() returns (every message
# but Auth, plus Authenticated and ConnectionClosed). All are frozen: safe to share and compare.


@dataclass(frozen=True, slots=True)
class Hello:
    """The first frame from each side: protocol version, the sender's id and fresh nonce."""

    peer_id: bytes
    nonce: bytes
    version: int = PROTOCOL_VERSION


@dataclass(frozen=True, slots=True)
class Auth:
    """HMAC-SHA256 over both ids and both nonces; see docs/wire-protocol.md."""

    mac: bytes


@dataclass(frozen=True, slots=True)
class Authenticated:
    """Emitted once, when the peer's auth has been verified. Not a wire message."""

    peer_id: bytes


@dataclass(frozen=True, slots=True)
class Interest:
    """I want this blob: send me your bitfield now, and a have for every piece you gain (one
    you know I hold, because I told you as a peer you download from, may be left out)."""

    digest: Digest


@dataclass(frozen=True, slots=True)
class BitfieldMsg:
    """Which pieces of a blob the sender holds (MSB first, spare bits zero)."""

    digest: Digest
    num_pieces: int
    bits: bytes

    @classmethod
    def of(cls, digest: Digest, bitfield: Bitfield) -> BitfieldMsg:
        return cls(digest, bitfield.size, bitfield.to_bytes())

    def to_bitfield(self) -> Bitfield:
        return Bitfield.from_bytes(self.num_pieces, self.bits)


@dataclass(frozen=True, slots=True)
class Have:
    digest: Digest
    index: int


@dataclass(frozen=True, slots=True)
class Request:
    digest: Digest
    index: int


@dataclass(frozen=True, slots=True)
class Progress:
    """I hold ``held`` pieces of this blob (to a peer I request from: it serves the requesters
    holding fewest first, p2preg.upload_order)."""

    digest: Digest
    held: int


@dataclass(frozen=True, slots=True)
class Busy:
    """I am receiving many pieces at once (p2preg.upload_order.BUSY_INCOMING_PIECES), over all
    my connections, or no longer: serve requesters that are not busy first. To the peers I have
    requests at, when it changes; not about one blob (the downlink is shared)."""

    busy: bool


@dataclass(frozen=True, slots=True)
class Piece:
    """A piece and its payload. On the wire the payload follows the frame as raw bytes."""

    digest: Digest
    index: int
    data: bytes = field(repr=False)

    def __repr__(self) -> str:
        return f"Piece(digest={self.digest}, index={self.index}, data=<{len(self.data)} bytes>)"


@dataclass(frozen=True, slots=True)
class Cancel:
    digest: Digest
    index: int


@dataclass(frozen=True, slots=True)
class Reject:
    """The sender cannot serve a request (index >= 0) or an interest / get_meta (index -1)."""

    digest: Digest
    index: int
    reason: str


@dataclass(frozen=True, slots=True)
class Query:
    """Which of these blobs do you hold, fully or partly?"""

    digests: tuple[Digest, ...]


@dataclass(frozen=True, slots=True)
class Holdings:
    """The answer to a query: the digests the sender holds."""

    digests: tuple[Digest, ...]


@dataclass(frozen=True, slots=True)
class GetMeta:
    digest: Digest


@dataclass(frozen=True, slots=True)
class Meta:
    metainfo: MetaInfo


@dataclass(frozen=True, slots=True)
class Error:
    """Fatal: the sender closes the connection after it."""

    code: str
    message: str


@dataclass(frozen=True, slots=True)
class KeepAlive:
    pass


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The peer closed the connection cleanly (at a frame boundary). Not a wire message."""


Message: TypeAlias = (
    Hello
    | Auth
    | Interest
    | BitfieldMsg
    | Have
    | Request
    | Progress
    | Busy
    | Piece
    | Cancel
    | Reject
    | Query
    | Holdings
    | GetMeta
    | Meta
    | Error
    | KeepAlive
)
Event: TypeAlias = Message | Authenticated | ConnectionClosed

_TYPE_NAMES: Final[Mapping[type, str]] = MappingProxyType(
    {
        Hello: "hello",
        Auth: "auth",
        Interest: "interest",
        BitfieldMsg: "bitfield",
        Have: "have",
        Request: "request",
        Progress: "progress",
        Busy: "busy",
        Piece: "piece",
        Cancel: "cancel",
        Reject: "reject",
        Query: "query",
        Holdings: "holdings",
        GetMeta: "get_meta",
        Meta: "meta",
        Error: "error",
        KeepAlive: "keepalive",
    }
)

# The fields of every message type, besides "t". The protocol is strict: an unknown field is an
# error, so a new field means a new protocol version.
_SCHEMAS: Final[Mapping[str, frozenset[str]]] = MappingProxyType(
    {
        "hello": frozenset({"v", "id", "nonce"}),
        "auth": frozenset({"mac"}),
        "interest": frozenset({"d"}),
        "bitfield": frozenset({"d", "n", "b"}),
        "have": frozenset({"d", "i"}),
        "request": frozenset({"d", "i"}),
        "progress": frozenset({"d", "h"}),
        "busy": frozenset({"b"}),
        "piece": frozenset({"d", "i", "n"}),
        "cancel": frozenset({"d", "i"}),
        "reject": frozenset({"d", "i", "why"}),
        "query": frozenset({"ds"}),
        "holdings": frozenset({"ds"}),
        "get_meta": frozenset({"d"}),
        "meta": frozenset({"m"}),
        "error": frozenset({"code", "msg"}),
        "keepalive": frozenset(),
    }
)

_HANDSHAKE_TYPES: Final = frozenset({"hello", "auth"})
_DATA_TYPES: Final = frozenset(_SCHEMAS) - _HANDSHAKE_TYPES - {"error"}

################################################################################################
# The state machine
#
# Each connection runs two machines, one per side, as h11 does: ``our_state`` says what we may
# send, ``their_state`` what we accept from the peer. Every rule that changes them lives in the
# two tables below and in PeerConnection._received / send; nothing else assigns them.
#
#   their side:  HELLO --hello--> AUTH --auth (MAC verified)--> OPEN --error / EOF--> CLOSED
#                any state --bad bytes, bad MAC, wrong message for the state--> ERROR
#   our side:    HELLO --(their hello: our auth queued)--> AUTH --(their auth verified)--> OPEN
#                any state --send(Error)--> CLOSED
#
# Rule 1: nothing but hello, auth (and a fatal error) crosses in either direction until the
#         peer's MAC is verified; a peer is refused before it can request or offer anything.
# Rule 2: hello and auth are produced by the connection itself (initiate(), data_to_send());
#         send() never takes them, so a caller cannot get the handshake wrong.
# Rule 3: after an error (either way) or EOF, nothing more is received; after we sent an error,
#         nothing more is sent.
################################################################################################

_RECEIVABLE: Final[Mapping[State, frozenset[str]]] = MappingProxyType(
    {
        State.HELLO: frozenset({"hello", "error"}),
        State.AUTH: frozenset({"auth", "error"}),
        State.OPEN: _DATA_TYPES | {"error"},
        State.CLOSED: frozenset(),
        State.ERROR: frozenset(),
    }
)
_SENDABLE: Final[Mapping[State, frozenset[str]]] = MappingProxyType(
    {
        State.HELLO: frozenset({"error"}),
        State.AUTH: frozenset({"error"}),
        State.OPEN: _DATA_TYPES | {"error"},
        State.CLOSED: frozenset(),
        State.ERROR: frozenset(),
    }
)


@dataclass(frozen=True, slots=True)
class _PieceHeader:
    digest: Digest
    index: int
    length: int


class PeerConnection:
    """One peer connection's codec and handshake state. Not thread-safe; one owner task."""

    def __init__(
        self,
        role: Role,
        local_id: bytes,
        secret: bytes,
        nonce: bytes,
        *,
        max_header: int = DEFAULT_MAX_HEADER,
        max_piece_payload: int = DEFAULT_MAX_PIECE_PAYLOAD,
    ) -> None:
        if not isinstance(role, Role):
            raise ValueError(f"role must be a Role, not {role!r}")
        if not isinstance(local_id, bytes) or len(local_id) != ID_LENGTH:
            raise ValueError(f"local_id must be {ID_LENGTH} bytes")
        if not isinstance(nonce, bytes) or len(nonce) != NONCE_LENGTH:
            raise ValueError(f"nonce must be {NONCE_LENGTH} fresh random bytes")
        if not isinstance(secret, bytes) or not secret:
            raise ValueError("the cluster secret must be non-empty bytes")
        if not _MIN_MAX_HEADER <= max_header <= MAX_INDEX:
            raise ValueError(f"max_header must be {_MIN_MAX_HEADER}..{MAX_INDEX}")
        if not 0 <= max_piece_payload <= MAX_INDEX:
            raise ValueError(f"max_piece_payload must be 0..{MAX_INDEX}")
        self.role = role
        self.local_id = local_id
        self.max_header = max_header
        self.max_piece_payload = max_piece_payload
        self.our_state = State.HELLO
        self.their_state = State.HELLO
        self.peer_id: bytes | None = None  # set only once the peer's MAC is verified
        self._secret = secret
        self._nonce = nonce
        self._peer_hello: Hello | None = None
        self._handshake_limit = min(HANDSHAKE_MAX_FRAME, max_header)
        self._max_buffered = 4 + max_header + max_piece_payload
        self._buf = bytearray()
        self._start = 0  # read offset into _buf; compacted in receive_data
        self._eof = False
        self._pending_piece: _PieceHeader | None = None
        self._outgoing = bytearray(encode(Hello(local_id, nonce), max_header=max_header))
        self._initiated = False

    # -- state ---------------------------------------------------------------------------------

    @property
    def authenticated(self) -> bool:
        """True once the peer's MAC has been verified (it stays True after the close)."""
        return self.peer_id is not None

    @property
    def state(self) -> State:
        """One word for the whole connection: ERROR, CLOSED, OPEN, or the handshake step."""
        if State.ERROR in (self.our_state, self.their_state):
            return State.ERROR
        if State.CLOSED in (self.our_state, self.their_state):
            return State.CLOSED
        if self.our_state is State.OPEN and self.their_state is State.OPEN:
            return State.OPEN
        return self.their_state

    @property
    def payload_bytes_needed(self) -> int:
        """Bytes still missing from the piece payload being received (0: none pending).

        An IO layer can wait for that many bytes at once (SO_RCVLOWAT) instead of waking up
        for every segment: a piece is useless until it is whole.
        """
        if self._pending_piece is None:
            return 0
        return max(0, self._pending_piece.length - (len(self._buf) - self._start))

    @property
    def buffered_bytes(self) -> int:
        """Bytes received and not yet returned as events (a piece header counts as returned)."""
        return len(self._buf) - self._start

    def __repr__(self) -> str:
        return (
            f"<PeerConnection {self.role.name} our={self.our_state.name} "
            f"their={self.their_state.name}>"
        )

    # -- sending -------------------------------------------------------------------------------

    def initiate(self) -> bytes:
        """The bytes to send first: our hello (both sides send theirs at once)."""
        if self._initiated:
            raise LocalProtocolError("initiate() already called: the hello was already sent")
        return self.data_to_send()

    def data_to_send(self) -> bytes:
        """Drain the handshake bytes the connection produced by itself (our auth, after the
        peer's hello was received). Call it after every next_event() and send what it returns."""
        data = bytes(self._outgoing)
        self._outgoing.clear()
        if data:
            self._initiated = True
        return data

    def send(self, message: Message) -> bytes:
        """Encode ``message``. Any handshake bytes not yet drained come first in the result."""
        name = _type_name(message)
        if name in _HANDSHAKE_TYPES:
            raise LocalProtocolError(
                f"{name} is produced by the connection itself: use initiate() and data_to_send()"
            )
        self._check_sendable(name)
        frame = encode(
            message, max_header=self.max_header, max_piece_payload=self.max_piece_payload
        )
        if name == "error":
            self.our_state = State.CLOSED
        return self._after_pending(frame)

    def piece_header(self, digest: Digest, index: int, length: int) -> bytes:
        """The piece frame alone: the IO layer sends exactly ``length`` payload bytes after it
        (e.g. with os.sendfile), so a piece never passes through msgpack or Python buffers."""
        self._check_sendable("piece")
        if isinstance(length, int) and length > self.max_piece_payload:
            raise LocalProtocolError(
                f"piece payload of {length} bytes exceeds the limit of {self.max_piece_payload}"
            )
        frame = _encode_frame("piece", {"d": str(digest), "i": index, "n": length}, self.max_header)
        return self._after_pending(frame)

    def _after_pending(self, frame: bytes) -> bytes:
        pending = self.data_to_send()
        return pending + frame if pending else frame

    def _check_sendable(self, name: str) -> None:
        if name in _SENDABLE[self.our_state]:
            return
        if self.our_state is State.CLOSED:
            raise LocalProtocolError(f"cannot send {name}: we already sent an error")
        raise LocalProtocolError(f"cannot send {name} before the peer is authenticated")

    # -- receiving -----------------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes from the peer; ``b""`` means the peer closed its side."""
        if self.their_state in (State.CLOSED, State.ERROR):
            if data:
                raise RemoteProtocolError(
                    f"data received after the connection ended ({self.their_state.name})"
                )
            return
        if not data:
            self._eof = True
            return
        if self._eof:
            raise RemoteProtocolError("data received after the end of the stream")
        pending = len(self._buf) - self._start
        if pending >= self._max_buffered:
            # An incomplete event never gets this big (frames and payloads are bounded and
            # rejected as soon as their length is known), so complete events are piling up.
            raise LocalProtocolError(
                "receive buffer full: call next_event() until it returns NEED_DATA"
            )
        if self._start and (pending == 0 or self._start >= pending):
            # Amortised compaction: copy the unread tail only when it is no bigger than what
            # was consumed, so feeding many small chunks stays linear.
            self._buf = self._buf[self._start :]
            self._start = 0
        self._buf += data

    def next_event(self) -> Event | type[NEED_DATA]:
        """The next event, NEED_DATA, or RemoteProtocolError (then the connection is dead)."""
        if self.their_state is State.ERROR:
            raise RemoteProtocolError("cannot receive after a protocol error")
        if self.their_state is State.CLOSED:
            raise RemoteProtocolError("cannot receive: the peer already ended the connection")
        try:
            return self._next_event()
        except RemoteProtocolError:
            self.their_state = State.ERROR
            self._release()
            raise

    def _next_event(self) -> Event | type[NEED_DATA]:
        available = len(self._buf) - self._start
        if self._pending_piece is not None:
            header = self._pending_piece
            if available < header.length:
                return self._need_data(f"{available} of a {header.length} byte piece payload")
            self._pending_piece = None
            return Piece(header.digest, header.index, self._take(header.length))
        if available < 4:
            if available == 0 and self._eof:
                return self._peer_closed()
            return self._need_data(f"{available} of 4 frame length bytes")
        (length,) = _LENGTH.unpack_from(self._buf, self._start)
        limit = self.max_header if self.their_state is State.OPEN else self._handshake_limit
        if length == 0:
            raise RemoteProtocolError("empty frame")
        if length > limit:
            raise RemoteProtocolError(f"frame of {length} bytes exceeds the limit of {limit}")
        if available < 4 + length:
            return self._need_data(f"{available - 4} of a {length} byte frame")
        body_start = self._start + 4
        obj = _unpack(self._buf[body_start : body_start + length])
        self._start = body_start + length
        name, fields = _frame_type(obj)
        if name not in _RECEIVABLE[self.their_state]:
            self._refuse(name)
        message = _decode_fields(name, fields)
        if isinstance(message, _PieceHeader):
            if message.length > self.max_piece_payload:
                raise RemoteProtocolError(
                    f"piece payload of {message.length} bytes exceeds the limit of "
                    f"{self.max_piece_payload}"
                )
            self._pending_piece = message
            return self._next_event()
        return self._received(message)

    def _received(self, message: Message) -> Event:
        """Apply the state transitions of a decoded, permitted message."""
        if isinstance(message, Hello):
            if message.peer_id == self.local_id:
                raise RemoteProtocolError("connected to self: the peer has our own id")
            self._peer_hello = message
            self.their_state = State.AUTH
            if self.our_state is State.HELLO:
                mac = _auth_mac(
                    self._secret,
                    self.role,
                    self.local_id,
                    message.peer_id,
                    message.nonce,
                    self._nonce,
                )
                self._outgoing += encode(Auth(mac), max_header=self.max_header)
                self.our_state = State.AUTH
            return message
        if isinstance(message, Auth):
            hello = self._peer_hello
            assert hello is not None  # their_state AUTH implies a hello was received
            expected = _auth_mac(
                self._secret,
                self.role.other,
                hello.peer_id,
                self.local_id,
                self._nonce,
                hello.nonce,
            )
            if not hmac.compare_digest(message.mac, expected):
                raise RemoteProtocolError(
                    "peer failed authentication: wrong cluster secret, or a replayed or "
                    "reflected handshake"
                )
            self.their_state = State.OPEN
            self.peer_id = hello.peer_id
            if self.our_state is State.AUTH:
                self.our_state = State.OPEN
            return Authenticated(hello.peer_id)
        if isinstance(message, Error):
            if self.their_state is not State.OPEN:
                raise RemoteProtocolError(
                    f"peer refused the handshake: {message.code}: {message.message}"
                )
            self.their_state = State.CLOSED
            self._release()
        return message

    def _refuse(self, name: str) -> NoReturn:
        state = self.their_state
        if state is State.HELLO:
            raise RemoteProtocolError(f"expected hello, got {name}: refused before the handshake")
        if state is State.AUTH:
            raise RemoteProtocolError(f"expected auth, got {name}: refused before authentication")
        raise RemoteProtocolError(f"unexpected {name} after the handshake")

    def _need_data(self, progress: str) -> type[NEED_DATA]:
        if self._eof:
            raise RemoteProtocolError(f"peer closed the connection mid-frame ({progress})")
        return NEED_DATA

    def _peer_closed(self) -> ConnectionClosed:
        if self.their_state is not State.OPEN:
            raise RemoteProtocolError("peer closed the connection during the handshake")
        self.their_state = State.CLOSED
        self._release()
        return ConnectionClosed()

    def _take(self, n: int) -> bytes:
        start = self._start
        with memoryview(self._buf) as view:
            data = view[start : start + n].tobytes()
        self._start = start + n
        return data

    def _release(self) -> None:
        self._buf = bytearray()
        self._start = 0
        self._pending_piece = None


# -- encoding ----------------------------------------------------------------------------------


def encode(
    message: Message,
    *,
    max_header: int = DEFAULT_MAX_HEADER,
    max_piece_payload: int = DEFAULT_MAX_PIECE_PAYLOAD,
) -> bytes:
    """Encode one message, stateless (PeerConnection.send adds the state checks).

    Every field is checked by the same code the receiving side runs, so whatever this returns
    the peer accepts; a bad field raises LocalProtocolError."""
    name = _type_name(message)
    try:
        fields = _to_wire(message)
    except (TypeError, ValueError, AttributeError) as exc:
        raise LocalProtocolError(f"cannot encode {name}: {exc}") from None
    frame = _encode_frame(name, fields, max_header)
    if isinstance(message, Piece):
        if not isinstance(message.data, bytes):
            raise LocalProtocolError("a piece's data must be bytes")
        if len(message.data) > max_piece_payload:
            raise LocalProtocolError(
                f"piece payload of {len(message.data)} bytes exceeds the limit of "
                f"{max_piece_payload}"
            )
        return frame + message.data
    return frame


def _encode_frame(name: str, fields: dict[str, Any], max_header: int) -> bytes:
    obj = {"t": name, **fields}
    try:
        _decode_fields(name, obj)
    except RemoteProtocolError as exc:
        raise LocalProtocolError(f"cannot send {name}: {exc}") from None
    body: bytes = msgpack.packb(obj, use_bin_type=True)
    if len(body) > max_header:
        raise LocalProtocolError(
            f"{name} frame of {len(body)} bytes exceeds the limit of {max_header}"
        )
    return _LENGTH.pack(len(body)) + body


def _type_name(message: object) -> str:
    name = _TYPE_NAMES.get(type(message))
    if name is None:
        raise LocalProtocolError(f"not a wire message: {type(message).__name__}")
    return name


def _to_wire(message: Message) -> dict[str, Any]:
    match message:
        case Hello():
            return {"v": message.version, "id": message.peer_id, "nonce": message.nonce}
        case Auth():
            return {"mac": message.mac}
        case Interest() | GetMeta():
            return {"d": str(message.digest)}
        case BitfieldMsg():
            return {"d": str(message.digest), "n": message.num_pieces, "b": message.bits}
        case Have() | Request() | Cancel():
            return {"d": str(message.digest), "i": message.index}
        case Progress():
            return {"d": str(message.digest), "h": message.held}
        case Busy():
            return {"b": message.busy}
        case Piece():
            return {"d": str(message.digest), "i": message.index, "n": len(message.data)}
        case Reject():
            return {"d": str(message.digest), "i": message.index, "why": message.reason}
        case Query() | Holdings():
            return {"ds": [str(d) for d in message.digests]}
        case Meta():
            return {"m": message.metainfo.to_wire()}
        case Error():
            return {"code": message.code, "msg": message.message}
        case KeepAlive():
            return {}
        case _:
            assert_never(message)


def _auth_mac(
    secret: bytes,
    sender_role: Role,
    sender_id: bytes,
    receiver_id: bytes,
    receiver_nonce: bytes,
    sender_nonce: bytes,
) -> bytes:
    # All parts are fixed-length, so the concatenation is unambiguous.
    data = AUTH_CONTEXT + sender_role.value + sender_id + receiver_id + receiver_nonce
    return hmac.new(secret, data + sender_nonce, hashlib.sha256).digest()


# -- decoding: every function below raises only RemoteProtocolError -----------------------------


def _unique_map(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise RemoteProtocolError("duplicate key in a msgpack map")
    return result


def _unpack(body: bytes | bytearray) -> object:
    try:
        return msgpack.unpackb(
            body,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_ext_len=0,
            max_map_len=_MAX_MAP_LEN,
            object_pairs_hook=_unique_map,
        )
    except RemoteProtocolError:
        raise
    except (ValueError, TypeError, RecursionError, OverflowError) as exc:
        # msgpack's errors (ExtraData, FormatError, StackError, UnicodeDecodeError, limits) all
        # derive from ValueError.
        raise RemoteProtocolError(f"malformed msgpack frame: {str(exc)[:200]}") from None


def _frame_type(obj: object) -> tuple[str, dict[str, Any]]:
    if not isinstance(obj, dict):
        raise RemoteProtocolError(f"a frame must be a msgpack map, not {type(obj).__name__}")
    name = obj.get("t")
    if not isinstance(name, str):
        raise RemoteProtocolError("a frame must carry its message type as a string 't'")
    if name not in _SCHEMAS:
        raise RemoteProtocolError(f"unknown message type {name[:64]!r}")
    return name, obj


def _decode_fields(name: str, obj: dict[str, Any]) -> Message | _PieceHeader:
    version = obj.get("v")
    if name == "hello" and type(version) is int and version != PROTOCOL_VERSION:
        raise RemoteProtocolError(
            f"unsupported protocol version {version} (we speak {PROTOCOL_VERSION})"
        )
    expected = _SCHEMAS[name]
    keys = obj.keys() - {"t"}
    if missing := expected - keys:
        raise RemoteProtocolError(f"{name} is missing field(s) {', '.join(sorted(missing))}")
    if extra := keys - expected:
        shown = ", ".join(repr(k[:32]) for k in sorted(extra, key=repr)[:4])
        raise RemoteProtocolError(f"{name} has unexpected field(s) {shown}")
    return _DECODERS[name](_Fields(name, obj))


class _Fields:
    """Typed, bounded access to one decoded frame's fields."""

    __slots__ = ("name", "obj")

    def __init__(self, name: str, obj: dict[str, Any]) -> None:
        self.name = name
        self.obj = obj

    def fail(self, key: str, problem: str) -> NoReturn:
        raise RemoteProtocolError(f"{self.name}.{key} {problem}")

    def get_int(self, key: str, low: int, high: int) -> int:
        value = self.obj[key]
        if not isinstance(value, int) or isinstance(value, bool):
            self.fail(key, f"must be an integer, not {type(value).__name__}")
        if not low <= value <= high:
            self.fail(key, f"= {value} is out of range {low}..{high}")
        return value

    def get_bool(self, key: str) -> bool:
        value = self.obj[key]
        if not isinstance(value, bool):
            self.fail(key, f"must be true or false, not {type(value).__name__}")
        return value

    def get_bytes(self, key: str, length: int) -> bytes:
        value = self.obj[key]
        if not isinstance(value, bytes):
            self.fail(key, f"must be binary, not {type(value).__name__}")
        if len(value) != length:
            self.fail(key, f"must be {length} bytes, not {len(value)}")
        return value

    def get_binary(self, key: str) -> bytes:
        value = self.obj[key]
        if not isinstance(value, bytes):
            self.fail(key, f"must be binary, not {type(value).__name__}")
        return value

    def get_text(self, key: str, max_length: int) -> str:
        value = self.obj[key]
        if not isinstance(value, str):
            self.fail(key, f"must be a string, not {type(value).__name__}")
        if len(value) > max_length:
            self.fail(key, f"is longer than {max_length} characters")
        return value

    def get_digest(self, key: str = "d") -> Digest:
        return self._parse_digest(key, self.obj[key])

    def get_digests(self, key: str = "ds") -> tuple[Digest, ...]:
        values = self.obj[key]
        if not isinstance(values, list):
            self.fail(key, f"must be a list, not {type(values).__name__}")
        if len(values) > MAX_QUERY_DIGESTS:
            self.fail(key, f"lists {len(values)} digests, more than {MAX_QUERY_DIGESTS}")
        return tuple(self._parse_digest(key, value) for value in values)

    def _parse_digest(self, key: str, value: object) -> Digest:
        if not isinstance(value, str):
            self.fail(key, f"must be a digest string, not {type(value).__name__}")
        digest = _parsed_digests.get(value)
        if digest is not None:
            return digest
        if len(value) > _MAX_DIGEST_TEXT:
            self.fail(key, "is too long to be a digest")
        try:
            digest = Digest.parse(value)
        except RegistryError as exc:
            self.fail(key, f"is not a valid digest: {exc.message}")
        if len(_parsed_digests) >= _PARSED_DIGESTS_MAX:
            _parsed_digests.clear()
        _parsed_digests[value] = digest
        return digest


# Digests parsed lately, by their text: nearly every frame names one of the few blobs being
# moved, and Digest.parse (two regular expressions) was ~4% of an agent's CPU at 256 KiB pieces.
# Only valid digests get in; bounded (cleared when full), so a peer cannot grow it.
_PARSED_DIGESTS_MAX: Final = 1024
_parsed_digests: dict[str, Digest] = {}


def _decode_hello(f: _Fields) -> Hello:
    version = f.get_int("v", PROTOCOL_VERSION, PROTOCOL_VERSION)
    return Hello(f.get_bytes("id", ID_LENGTH), f.get_bytes("nonce", NONCE_LENGTH), version)


def _decode_bitfield(f: _Fields) -> BitfieldMsg:
    digest, num_pieces, bits = f.get_digest(), f.get_int("n", 0, MAX_INDEX), f.get_binary("b")
    Bitfield.from_bytes(num_pieces, bits)  # checks the length and the spare bits
    return BitfieldMsg(digest, num_pieces, bits)


def _decode_meta(f: _Fields) -> Meta:
    wire = f.obj["m"]
    if isinstance(wire, dict) and wire.keys() != _METAINFO_KEYS:
        f.fail("m", f"must have exactly the fields {', '.join(sorted(_METAINFO_KEYS))}")
    return Meta(MetaInfo.from_wire(wire))


def _decode_piece(f: _Fields) -> _PieceHeader:
    return _PieceHeader(f.get_digest(), f.get_int("i", 0, MAX_INDEX), f.get_int("n", 0, MAX_INDEX))


_DECODERS: Final[Mapping[str, Callable[[_Fields], Message | _PieceHeader]]] = MappingProxyType(
    {
        "hello": _decode_hello,
        "auth": lambda f: Auth(f.get_bytes("mac", MAC_LENGTH)),
        "interest": lambda f: Interest(f.get_digest()),
        "bitfield": _decode_bitfield,
        "have": lambda f: Have(f.get_digest(), f.get_int("i", 0, MAX_INDEX)),
        "request": lambda f: Request(f.get_digest(), f.get_int("i", 0, MAX_INDEX)),
        "progress": lambda f: Progress(f.get_digest(), f.get_int("h", 0, MAX_INDEX)),
        "busy": lambda f: Busy(f.get_bool("b")),
        "piece": _decode_piece,
        "cancel": lambda f: Cancel(f.get_digest(), f.get_int("i", 0, MAX_INDEX)),
        "reject": lambda f: Reject(
            f.get_digest(), f.get_int("i", -1, MAX_INDEX), f.get_text("why", MAX_TEXT)
        ),
        "query": lambda f: Query(f.get_digests()),
        "holdings": lambda f: Holdings(f.get_digests()),
        "get_meta": lambda f: GetMeta(f.get_digest()),
        "meta": _decode_meta,
        "error": lambda f: Error(f.get_text("code", MAX_ERROR_CODE), f.get_text("msg", MAX_TEXT)),
        "keepalive": lambda f: KeepAlive(),
    }
)
