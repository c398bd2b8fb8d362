"""Malformed and adversarial requests against the agent's registry endpoint (a real origin behind).

Distilled from an exploratory fuzzing run: raw bytes over a socket (clients such as httpx would
normalise most of these away), every answer parsed strictly with h11. For bad input the agent must
answer 4xx (OCI error JSON where the registry answers), never 5xx and never a traceback; it must
keep serving correct bytes afterwards and leave nothing stray in its store. The run found three
bugs, each now a test below: Range numbers that str.isdigit() accepts and int() refuses (a 500
that also leaked the blob's file and pinned it), an absolute-form target with a malformed host
(a 500), and non-ASCII Accept / Authorization values sent on to the origin (a 500, or a 503 for
every client sharing the download).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
from dataclasses import dataclass

import h11
import pytest
import trio

from p2preg.digest import Digest
from p2preg.mediatypes import DEFAULT_MANIFEST_ACCEPT
from tests.support.oci_image import TestImage
from tests.support.tools import wait_until

pytestmark = pytest.mark.timeout(60)

KiB = 1024
REPO = "fuzz/app"
ZERO_DIGEST = "sha256:" + "0" * 64
UNKNOWN_DIGEST = "sha256:" + "1" * 64
STORE_FILE = re.compile(
    r"(blobs|types|meta)/(sha256/[0-9a-f]{2}/[0-9a-f]{64}|sha512/[0-9a-f]{2}/[0-9a-f]{128})"
)


@pytest.fixture(scope="module")
def fuzz_image(image_factory) -> TestImage:
    """A small two-layer image; the first layer is several hundred KiB so ranges have room."""
    return image_factory(REPO, layer_sizes=(300 * KiB + 5, 2 * KiB))


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def oci_error_code(self) -> str:
        """The first OCI error code of the body; fails the test if it is not OCI error JSON."""
        assert self.headers.get("content-type") == "application/json", self
        errors = json.loads(self.body)["errors"]
        assert isinstance(errors, list) and errors and "message" in errors[0], self
        return str(errors[0]["code"])


def request(
    method: str, target: str, headers: tuple[tuple[str, str], ...] = (), body: bytes = b""
) -> bytes:
    """One HTTP/1.1 request as raw bytes; header values may hold any latin-1 character."""
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1", *(f"{k}: {v}" for k, v in headers)]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


async def exchange(
    port: int, raw: bytes, methods: list[str], *, half_close: bool = False
) -> tuple[list[Answer], bool]:
    """Send ``raw`` and read one answer per entry of ``methods`` (the method tells h11 how a
    response is framed: HEAD has no body). Returns the answers and whether the agent closed the
    connection. Anything that is not valid HTTP/1.1 fails the test (h11 raises)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        try:
            await stream.send_all(raw)
            if half_close:
                await stream.send_eof()
        except trio.BrokenResourceError:
            pass  # the agent refused early and closed; its answer is still in our buffer
        client = h11.Connection(h11.CLIENT, max_incomplete_event_size=1 << 20)
        answers: list[Answer] = []
        with trio.fail_after(10):
            for method in methods:
                client.send(h11.Request(method=method, target="/", headers=[("Host", "x")]))
                client.send(h11.EndOfMessage())
                status, headers, body = 0, {}, bytearray()
                while True:
                    event = client.next_event()
                    if event is h11.NEED_DATA:
                        try:
                            data = await stream.receive_some(1 << 20)
                        except trio.BrokenResourceError:
                            data = b""
                        if not data and not status:
                            return answers, True  # closed without answering this request
                        client.receive_data(data)
                    elif isinstance(event, h11.InformationalResponse):
                        continue
                    elif isinstance(event, h11.Response):
                        status = event.status_code
                        headers = {
                            k.decode().lower(): v.decode("latin-1") for k, v in event.headers
                        }
                    elif isinstance(event, h11.Data):
                        body += event.data
                    elif isinstance(event, h11.EndOfMessage):
                        answers.append(Answer(status, headers, bytes(body)))
                        break
                    else:
                        raise AssertionError(f"unexpected {event!r} after {answers}")
                if h11.MUST_CLOSE in (client.our_state, client.their_state):
                    return answers, True
                client.start_next_cycle()
        return answers, False


async def ask(port: int, method: str, target: str, *headers: tuple[str, str]) -> Answer:
    answers, _ = await exchange(port, request(method, target, headers), [method])
    assert len(answers) == 1, f"no answer to {method} {target}"
    return answers[0]


def assert_no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    crashed = [r for r in caplog.records if r.exc_info is not None]
    assert not crashed, "\n".join(f"{r.name}: {r.getMessage()}" for r in crashed)


def assert_store_clean(agent) -> None:
    """Only the store's documented layout (docs/store.md): no partial or temporary files."""
    root = agent.store.root
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    stray = [name for name in files if not STORE_FILE.fullmatch(name)]
    assert stray == [], f"unexpected files in the store: {stray}"


async def assert_pulls_correct(port: int, image: TestImage) -> None:
    manifest = await ask(
        port, "GET", f"/v2/{REPO}/manifests/{image.tag}", ("Accept", DEFAULT_MANIFEST_ACCEPT)
    )
    assert manifest.status == 200 and manifest.body == image.manifest.path.read_bytes()
    for blob in (image.config, *image.layers):
        got = await ask(port, "GET", f"/v2/{REPO}/blobs/{blob.digest}")
        assert got.status == 200
        assert "sha256:" + hashlib.sha256(got.body).hexdigest() == blob.digest
        head = await ask(port, "HEAD", f"/v2/{REPO}/blobs/{blob.digest}")
        assert head.status == 200 and int(head.headers["content-length"]) == blob.size


async def assert_nothing_pinned(agent, blobs) -> None:
    """Every response has ended, so no cached blob may still be held open: evicting all succeeds.
    (A leaked OpenBlob keeps its file descriptor and is never evicted.)"""
    digests = [Digest.parse(b.digest) for b in blobs]
    await wait_until(lambda: all(agent.store.has(d) for d in digests))

    def evicted() -> bool:
        agent.store.evict_to_fit(agent.store.capacity + 1)
        return not any(agent.store.has(d) for d in digests)

    await wait_until(evicted, seconds=3)


# --- bad names, references, methods and targets: 4xx with an OCI error ----------------------

LONG_NAME = "a" * 256


@pytest.mark.parametrize(
    ("method", "target", "status", "code"),
    [
        ("GET", "/v2/Fuzz/App/manifests/v1", 400, "NAME_INVALID"),
        ("GET", f"/v2/fuzz/%2e%2e/app/blobs/{ZERO_DIGEST}", 400, "NAME_INVALID"),
        ("GET", f"/v2/%2e%2e/%2e%2e/etc/blobs/{ZERO_DIGEST}", 400, "NAME_INVALID"),
        ("GET", f"/v2/fuzz/../app/blobs/{ZERO_DIGEST}", 400, "NAME_INVALID"),
        ("GET", "/v2/fuzz//app/manifests/v1", 400, "NAME_INVALID"),
        ("GET", "/v2//manifests/v1", 400, "NAME_INVALID"),
        ("GET", f"/v2/{LONG_NAME}/manifests/v1", 400, "NAME_INVALID"),
        ("GET", "/v2/fuzz/app%00/manifests/v1", 400, "NAME_INVALID"),
        ("GET", "/v2/fuzz/-app/manifests/v1", 400, "NAME_INVALID"),
        ("GET", "/v2/fuzz/app/blobs/sha256:", 400, "DIGEST_INVALID"),
        ("GET", "/v2/fuzz/app/blobs/sha256", 400, "DIGEST_INVALID"),
        ("GET", "/v2/fuzz/app/blobs/sha256:" + "A" * 64, 400, "DIGEST_INVALID"),
        ("GET", "/v2/fuzz/app/blobs/sha256:" + "0" * 63, 400, "DIGEST_INVALID"),
        ("GET", "/v2/fuzz/app/blobs/sha256:" + "0" * 4000, 400, "DIGEST_INVALID"),
        ("GET", "/v2/fuzz/app/blobs/sha256:" + "g" * 64, 400, "DIGEST_INVALID"),
        ("GET", "/v2/fuzz/app/blobs/SHA256:" + "0" * 64, 400, "DIGEST_INVALID"),
        ("GET", "/v2/fuzz/app/blobs/sha1:" + "0" * 40, 400, "DIGEST_INVALID"),
        ("GET", "/v2/fuzz/app/blobs/sha256:../../etc/passwd", 404, "UNSUPPORTED"),
        ("GET", "/v2/fuzz/app/manifests/sha256:" + "0" * 65, 400, "DIGEST_INVALID"),
        ("GET", "/v2/fuzz/app/manifests/-v1", 400, "MANIFEST_INVALID"),
        ("GET", "/v2/fuzz/app/manifests/" + "v" * 129, 400, "MANIFEST_INVALID"),
        ("GET", "/v2/fuzz/app/manifests/", 400, "MANIFEST_INVALID"),
        ("GET", f"/v2/fuzz/app/blobs/{UNKNOWN_DIGEST}", 404, "BLOB_UNKNOWN"),
        ("GET", "/v2/fuzz/app/blobs/sha512:" + "0" * 128, 404, "BLOB_UNKNOWN"),
        ("GET", "/v2/fuzz/app/manifests/v1?ns=EVIL.example", 404, "NAME_UNKNOWN"),
        ("GET", "/v2/_catalog", 404, "UNSUPPORTED"),
        ("GET", "/v2/fuzz/app/tags/", 404, "UNSUPPORTED"),
        ("OPTIONS", "/v2/", 405, "UNSUPPORTED"),
        ("OPTIONS", "*", 404, "UNSUPPORTED"),
        ("PATCH", "/v2/fuzz/app/blobs/uploads/abc", 405, "UNSUPPORTED"),
        ("DELETE", "/v2/fuzz/app/manifests/v1", 405, "UNSUPPORTED"),
        ("PROPFIND", "/v2/fuzz/app/tags/list", 405, "UNSUPPORTED"),
        ("HEAD", "/v2/Fuzz/App/manifests/v1", 400, None),
        ("HEAD", "/v2/fuzz/app/blobs/sha256:", 400, None),
        ("HEAD", f"/v2/fuzz/app/blobs/{UNKNOWN_DIGEST}", 404, None),
    ],
)
async def test_bad_input_gets_4xx_oci_error(
    origin, fuzz_image, start_agent, caplog, method: str, target: str, status: int, code
) -> None:
    agent = await start_agent(origin.url)
    answer = await ask(agent.registry_port, method, target)
    assert answer.status == status, answer
    if code is not None:
        assert answer.oci_error_code() == code
    else:
        assert answer.body == b""  # HEAD
    assert_no_tracebacks(caplog)


async def test_methods_with_bodies_are_refused_and_connection_stays_usable(
    origin, fuzz_image, start_agent, caplog
) -> None:
    agent = await start_agent(origin.url)
    raw = request("PUT", f"/v2/{REPO}/manifests/v1", body=b"{}" * 100) + request("GET", "/v2/")
    answers, _ = await exchange(agent.registry_port, raw, ["PUT", "GET"])
    assert [a.status for a in answers] == [405, 200]
    assert answers[0].oci_error_code() == "UNSUPPORTED"
    # A body over the drain bound: refused, and the agent closes rather than read 3 MiB.
    big = request("POST", f"/v2/{REPO}/blobs/uploads/", body=b"y" * (3 * 1024 * 1024))
    answers, _ = await exchange(agent.registry_port, big, ["POST"])
    assert [a.status for a in answers] == [405]
    assert_no_tracebacks(caplog)


# --- Range on a cached blob -------------------------------------------------------------------


async def test_range_edge_cases(origin, fuzz_image, start_agent, caplog) -> None:
    agent = await start_agent(origin.url)
    port = agent.registry_port
    layer = fuzz_image.layers[0]
    data, size = layer.path.read_bytes(), layer.size
    url = f"/v2/{REPO}/blobs/{layer.digest}"
    assert (await ask(port, "GET", url)).body == data  # cached from here on
    expectations = {
        # RFC 9110 lets a server ignore a Range it does not support or cannot parse: 200, whole.
        "bytes=0-0,5-9": (200, None),
        "bytes=10-5": (200, None),
        "bytes=": (200, None),
        "bytes=-": (200, None),
        "bytes=a-b": (200, None),
        "bytes=+1-2": (200, None),
        "bytes=0x10-0x20": (200, None),
        "items=0-5": (200, None),
        "bytes=1-2-3": (200, None),
        "bytes=0-0": (206, (0, 0)),
        "bytes=-5": (206, (size - 5, size - 1)),
        f"bytes=-{size + 10}": (206, (0, size - 1)),
        f"bytes={size - 1}-{size * 5}": (206, (size - 1, size - 1)),
        "bytes=0-" + "9" * 30: (206, (0, size - 1)),
        "BYTES=3-4": (206, (3, 4)),
        "bytes=-0": (416, None),
        f"bytes={size}-": (416, None),
        f"bytes={size + 100}-{size + 200}": (416, None),
        "bytes=" + "9" * 30 + "-": (416, None),
    }
    for value, (status, span) in expectations.items():
        answer = await ask(port, "GET", url, ("Range", value))
        assert answer.status == status, (value, answer.status)
        if status == 416:
            assert answer.headers["content-range"] == f"bytes */{size}"
            assert answer.oci_error_code() == "RANGE_INVALID"
        elif status == 206:
            assert span is not None
            start, end = span
            assert answer.headers["content-range"] == f"bytes {start}-{end}/{size}"
            assert answer.body == data[start : end + 1], value
        else:
            assert answer.body == data, value
        # Range is defined for GET only (RFC 9110 14.2): HEAD ignores it, whatever it says.
        head = await ask(port, "HEAD", url, ("Range", value))
        assert head.status == 200 and int(head.headers["content-length"]) == size, value
        assert head.body == b""
    await assert_nothing_pinned(agent, [layer])
    assert_no_tracebacks(caplog)


@pytest.mark.parametrize(
    ("value", "status"),
    [
        # digits str.isdigit() accepts and int() refuses: not a number, the header is ignored
        ("bytes=\u00b2-", 200),
        ("bytes=0-\u00b9", 200),
        # past int()'s 4,300 digits: well-formed, so answered as RFC 9110 says (a start past the
        # end is unsatisfiable; a suffix longer than the blob is the whole blob)
        ("bytes=" + "1" * 5000 + "-", 416),
        ("bytes=-" + "9" * 5000, 206),
    ],
    ids=["superscript-start", "superscript-end", "5000-digit-start", "5000-digit-suffix"],
)
async def test_range_with_an_odd_number_is_answered_not_failed(
    origin, fuzz_image, start_agent, caplog, value: str, status: int
) -> None:
    agent = await start_agent(origin.url)
    layer = fuzz_image.layers[0]
    url = f"/v2/{REPO}/blobs/{layer.digest}"
    assert (await ask(agent.registry_port, "GET", url)).status == 200
    answer = await ask(agent.registry_port, "GET", url, ("Range", value))
    assert answer.status == status, answer.status
    if status != 416:
        assert answer.body == layer.path.read_bytes()
    await assert_nothing_pinned(agent, [layer])
    assert_no_tracebacks(caplog)


# --- request targets and headers the agent must not choke on ---------------------------------


async def test_absolute_form_target_is_served(origin, fuzz_image, start_agent, caplog) -> None:
    agent = await start_agent(origin.url)
    layer = fuzz_image.layers[1]
    # The agent serves its own paths whatever host the absolute-form names; it never dials it.
    answer = await ask(
        agent.registry_port, "GET", f"http://evil.example/v2/{REPO}/blobs/{layer.digest}"
    )
    assert answer.status == 200 and answer.body == layer.path.read_bytes()
    assert_no_tracebacks(caplog)


@pytest.mark.parametrize("target", ["http://[zz]/v2/", "http://[::1/v2/", "//[/v2/"])
async def test_absolute_form_target_with_bad_host_is_400(
    origin, start_agent, caplog, target: str
) -> None:
    agent = await start_agent(origin.url)
    answer = await ask(agent.registry_port, "GET", target)
    assert 400 <= answer.status < 500, answer
    assert_no_tracebacks(caplog)


@pytest.mark.parametrize(
    ("method", "path", "header"),
    [
        ("GET", "/manifests/v1", ("Accept", "\xe9")),
        ("HEAD", "/manifests/v1", ("Accept", "\xe9")),
        ("GET", "/manifests/v1", ("Authorization", "Bearer \xe9")),
        ("GET", "/tags/list", ("Authorization", "Bearer \xe9")),
        ("HEAD", f"/blobs/{UNKNOWN_DIGEST}", ("Authorization", "Bearer \xe9")),
        ("GET", f"/blobs/{UNKNOWN_DIGEST}", ("Authorization", "Bearer \xe9")),
    ],
    ids=["accept-get", "accept-head", "auth-manifest", "auth-tags", "auth-blob-head", "auth-blob"],
)
async def test_non_ascii_forwarded_header_is_not_5xx(
    origin, fuzz_image, start_agent, caplog, method: str, path: str, header: tuple[str, str]
) -> None:
    agent = await start_agent(origin.url)
    answer = await ask(agent.registry_port, method, f"/v2/{REPO}{path}", header)
    assert answer.status < 500, answer
    assert_no_tracebacks(caplog)


# --- HTTP framing: malformed, pipelined, smuggling-shaped, half-sent --------------------------


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GARBAGE\x00\x01 nonsense\r\n\r\n", 400),
        (b"GET /v2/\x00 HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET /v2/fuzz/\xe1pp/manifests/v1 HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET /v2/ HTTP/1.1\r\n\r\n", 400),  # no Host
        (b"GET /v2/ HTTP/1.1\r\nHost: x\r\nBad Header: y\r\n\r\n", 400),
        (b"GET /v2/ HTTP/1.1\r\nHost: x\r\nContent-Length: " + b"1" * 5000 + b"\r\n\r\n", 400),
        (b"GET /v2/ HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 6\r\n\r\n", 400),
        (b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 140_000 + b"\r\n\r\n", 431),
        (b"GET /v2/ HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
    ],
    ids=[
        "garbage",
        "nul-target",
        "non-ascii-target",
        "no-host",
        "bad-header",
        "huge-content-length",
        "conflicting-content-length",
        "huge-header",
        "unknown-transfer-coding",
    ],
)
async def test_malformed_http_is_refused_and_agent_survives(
    origin, fuzz_image, start_agent, caplog, raw: bytes, status: int
) -> None:
    agent = await start_agent(origin.url)
    answers, closed = await exchange(agent.registry_port, raw, ["GET"])
    assert [a.status for a in answers] == [status] and closed
    assert (await ask(agent.registry_port, "GET", "/v2/")).status == 200
    assert_no_tracebacks(caplog)


async def test_pipelined_requests_are_answered_in_order(
    origin, fuzz_image, start_agent, caplog
) -> None:
    agent = await start_agent(origin.url)
    layer, config = fuzz_image.layers[0], fuzz_image.config
    accept = (("Accept", DEFAULT_MANIFEST_ACCEPT),)
    steps = [
        ("GET", "/v2/", 200),
        ("HEAD", f"/v2/{REPO}/blobs/{config.digest}", 200),
        ("GET", f"/v2/Bad/blobs/{ZERO_DIGEST}", 400),
        ("GET", f"/v2/{REPO}/blobs/{layer.digest}", 200),
        ("GET", f"/v2/{REPO}/manifests/{fuzz_image.tag}", 200),
        ("HEAD", f"/v2/{REPO}/blobs/sha256:", 400),
        ("GET", f"/v2/{REPO}/blobs/{config.digest}", 200),
    ]
    raw = b"".join(request(m, t, accept) for m, t, _ in steps)
    answers, _ = await exchange(agent.registry_port, raw, [m for m, _, _ in steps])
    assert [a.status for a in answers] == [s for _, _, s in steps]
    assert answers[3].body == layer.path.read_bytes()
    assert answers[4].body == fuzz_image.manifest.path.read_bytes()
    assert answers[6].body == config.path.read_bytes()
    assert answers[1].body == b"" and int(answers[1].headers["content-length"]) == config.size
    # After a request that is not HTTP the connection closes: nothing behind it is answered.
    answers, closed = await exchange(
        agent.registry_port, b"GARBAGE\r\n\r\n" + request("GET", "/v2/"), ["GET", "GET"]
    )
    assert [a.status for a in answers] == [400] and closed
    assert_no_tracebacks(caplog)


async def test_request_body_is_never_parsed_as_a_request(
    origin, fuzz_image, start_agent, caplog
) -> None:
    agent = await start_agent(origin.url)
    inner = request("GET", f"/v2/{REPO}/blobs/{UNKNOWN_DIGEST}")
    for raw in (
        request("GET", "/v2/", body=inner),
        b"GET /v2/ HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        + f"{len(inner):x}\r\n".encode()
        + inner
        + b"\r\n0\r\n\r\n",
    ):
        answers, closed = await exchange(agent.registry_port, raw, ["GET", "GET"], half_close=True)
        assert [a.status for a in answers] == [200] and closed
    assert not agent.downloads.active(Digest.parse(UNKNOWN_DIGEST))
    assert_no_tracebacks(caplog)


async def test_half_sent_requests_then_close(origin, fuzz_image, start_agent, caplog) -> None:
    agent = await start_agent(origin.url)
    layer = fuzz_image.layers[0]
    for raw in (
        b"G",
        b"GET /v2/ HT",
        b"GET /v2/ HTTP/1.1\r\nHost: x\r\n",
        b"GET /v2/ HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc",
        b"POST /v2/ HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n10\r\nabc",
        request("GET", f"/v2/{REPO}/blobs/{layer.digest}"),  # hang up before reading the blob
    ):
        stream = await trio.open_tcp_stream("127.0.0.1", agent.registry_port)
        await stream.send_all(raw)
        await stream.aclose()
    # Half-closed instead: a truncated request line gets a 400; a request whose headers arrived
    # whole is answered, and the connection closes when its body turns out to be short.
    for raw, status in (
        (b"GET /v2/ HT", 400),
        (b"GET /v2/ HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nab", 200),
    ):
        answers, closed = await exchange(agent.registry_port, raw, ["GET", "GET"], half_close=True)
        assert [a.status for a in answers] == [status] and closed
    await assert_pulls_correct(agent.registry_port, fuzz_image)
    await assert_nothing_pinned(agent, (fuzz_image.config, *fuzz_image.layers))
    assert_store_clean(agent)
    assert_no_tracebacks(caplog)


# --- a seeded burst of mutated requests, then a correct pull and a clean store ----------------

_MUTATION_ALPHABET = "aZ09/._-:%?#&=;~@!$'()*+,\\^`{|}[]\x7f\xe9"


def _mutated_targets(image: TestImage, count: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    bases = [
        f"/v2/{REPO}/blobs/{image.layers[0].digest}",
        f"/v2/{REPO}/manifests/{image.tag}",
        f"/v2/{REPO}/tags/list",
        f"/v2/{REPO}/manifests/{image.manifest.digest}",
    ]
    targets = []
    for _ in range(count):
        target = list(rng.choice(bases))
        for _ in range(rng.randrange(1, 4)):
            position = rng.randrange(1, len(target))
            operation = rng.randrange(3)
            if operation == 0:
                target.insert(position, rng.choice(_MUTATION_ALPHABET))
            elif operation == 1:
                del target[position]
            else:
                target[position] = rng.choice(_MUTATION_ALPHABET)
        targets.append((rng.choice(("GET", "HEAD")), "".join(target)))
    return targets


async def test_mutated_requests_never_5xx_and_pulls_stay_correct(
    origin, fuzz_image, start_agent, caplog
) -> None:
    agent = await start_agent(origin.url)
    port = agent.registry_port
    await assert_pulls_correct(port, fuzz_image)
    accept = ("Accept", DEFAULT_MANIFEST_ACCEPT)
    statuses: dict[int, int] = {}

    async def one(method: str, target: str) -> None:
        answers, _ = await exchange(port, request(method, target, (accept,)), [method])
        assert len(answers) == 1, (method, target)
        answer = answers[0]
        statuses[answer.status] = statuses.get(answer.status, 0) + 1
        assert answer.status < 500, (method, target, answer)
        if method == "HEAD":
            assert answer.body == b""
        elif answer.status >= 400 and "docker-distribution-api-version" in answer.headers:
            answer.oci_error_code()  # a registry error is OCI JSON
        elif answer.status >= 400:
            assert b"illegal request line" in answer.body, (target, answer)  # not HTTP at all
        elif "docker-content-digest" in answer.headers and answer.status == 200:
            digest = answer.headers["docker-content-digest"]
            assert "sha256:" + hashlib.sha256(answer.body).hexdigest() == digest

    targets = _mutated_targets(fuzz_image, 240, seed=20240501)
    limit = trio.CapacityLimiter(8)

    async def limited(method: str, target: str) -> None:
        async with limit:
            await one(method, target)

    async with trio.open_nursery() as nursery:
        for method, target in targets:
            nursery.start_soon(limited, method, target)
    assert statuses.get(200, 0) and statuses.get(400, 0) and statuses.get(404, 0), statuses
    await assert_pulls_correct(port, fuzz_image)
    await assert_nothing_pinned(agent, (fuzz_image.config, *fuzz_image.layers))
    assert_store_clean(agent)
    assert_no_tracebacks(caplog)


async def test_agent_logs_nothing_above_warning_for_client_errors(
    origin, fuzz_image, start_agent, caplog
) -> None:
    """4xx answers are the client's business: they must not produce ERROR log lines."""
    agent = await start_agent(origin.url)
    with caplog.at_level(logging.INFO):
        for target in (
            "/v2/Bad/manifests/v1",
            "/v2/fuzz/app/blobs/sha256:",
            f"/v2/fuzz/app/blobs/{UNKNOWN_DIGEST}",
            "/v2/fuzz/app/manifests/nope",
        ):
            answer = await ask(agent.registry_port, "GET", target)
            assert 400 <= answer.status < 500
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
