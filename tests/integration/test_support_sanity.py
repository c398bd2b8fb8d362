"""The integration test support code does what the agent's tests will rely on.

If a fault were injected at the wrong offset, or the origin silently rewrote a digest, every
agent test built on top would fail (or pass) for the wrong reason; these tests pin the helpers
down first, against the real docker-registry and skopeo. Loopback only.
"""

from __future__ import annotations

import gc
import gzip
import hashlib
import io
import json
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from tests.support.fault_proxy import Fault, FaultProxy, run_fault_proxy
from tests.support.oci_image import (
    OCI_INDEX,
    OCI_LAYER_TAR_GZIP,
    OCI_MANIFEST,
    Blob,
    TestImage,
    build_image,
    push_image,
)
from tests.support.origin import OriginRegistry
from tests.support.tools import free_port, require_tool

KiB = 1024
MiB = 1024 * KiB
MANIFEST_ACCEPT = f"{OCI_MANIFEST}, {OCI_INDEX}"
SINGLE_SIZES = [3 * MiB + 123, 40 * KiB, 21 * MiB + 7]
MULTI_SIZES = [1 * MiB + 5, 2 * KiB, 5 * MiB + 1]


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("layout")


@pytest.fixture(scope="module")
def single(layout: Path) -> TestImage:
    return build_image(layout, "single", SINGLE_SIZES, seed=11, gzip_layers=[False, True, False])


@pytest.fixture(scope="module")
def multi(layout: Path) -> TestImage:
    return build_image(
        layout, "multi", MULTI_SIZES, seed=12, gzip_layers=[True, False, False], multiarch=True
    )


@pytest.fixture(scope="module")
def origin(
    tmp_path_factory: pytest.TempPathFactory, single: TestImage, multi: TestImage
) -> Iterator[OriginRegistry]:
    registry = OriginRegistry(tmp_path_factory.mktemp("origin"))
    registry.start()
    try:
        push_image(single, registry.host, "test/single")
        push_image(multi, registry.host, "test/multi", all_platforms=True)
        yield registry
    finally:
        registry.stop()


@pytest.fixture
async def proxy(nursery: trio.Nursery, origin: OriginRegistry) -> FaultProxy:
    started: FaultProxy = await nursery.start(run_fault_proxy, origin.url)
    return started


def client_for(url: str, **kwargs: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=url, trust_env=False, timeout=10.0, **kwargs)


def blob_url(repo: str, blob: Blob) -> str:
    kind = "manifests" if blob.media_type in (OCI_MANIFEST, OCI_INDEX) else "blobs"
    return f"/v2/{repo}/{kind}/{blob.digest}"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def raw_get(url: str, target: str) -> trio.SocketStream:
    """Open a plain socket and send a GET: lets a test hang up mid-body at a byte it chooses."""
    port = httpx.URL(url).port
    assert port is not None
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(f"GET {target} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
    return stream


# --- tools -------------------------------------------------------------------------------------


def test_require_tool_skips_locally_and_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    assert require_tool("docker-registry").endswith("/docker-registry")
    monkeypatch.setenv("PATH", "")
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="not installed"):
        require_tool("docker-registry")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true requires it"):
        require_tool("docker-registry")


def test_fault_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        Fault("status", "/v2/", times=0)
    with pytest.raises(ValueError):
        Fault("redirect", "/v2/", listener="cdn")
    with pytest.raises(ValueError):
        Fault("bogus", "/v2/")  # type: ignore[arg-type]


# --- images ------------------------------------------------------------------------------------


def test_build_is_deterministic_and_well_formed(tmp_path: Path, single: TestImage) -> None:
    again = build_image(
        tmp_path / "a", "x", SINGLE_SIZES, seed=11, gzip_layers=[False, True, False]
    )
    assert [b.digest for b in again.all_blobs()] == [b.digest for b in single.all_blobs()]
    other = build_image(tmp_path / "b", "x", [1000], seed=99)
    assert (
        other.layers[0].digest != build_image(tmp_path / "c", "x", [1000], seed=98).layers[0].digest
    )

    config = json.loads(single.config.read_bytes())
    manifest = json.loads(single.manifest.read_bytes())
    assert manifest["mediaType"] == OCI_MANIFEST
    assert [d["digest"] for d in manifest["layers"]] == [b.digest for b in single.layers]
    for layer, size, diff_id in zip(
        single.layers, SINGLE_SIZES, config["rootfs"]["diff_ids"], strict=True
    ):
        data = layer.read_bytes()
        assert sha256(data) == layer.digest and len(data) == layer.size
        tar_bytes = gzip.decompress(data) if layer.media_type == OCI_LAYER_TAR_GZIP else data
        assert sha256(tar_bytes) == diff_id
        with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tf:
            assert [m.size for m in tf.getmembers() if m.isfile()] == [size]

    index = json.loads((single.layout / "index.json").read_text())
    refs = {
        m["annotations"]["org.opencontainers.image.ref.name"]: m["digest"]
        for m in index["manifests"]
    }
    assert refs["single"] == single.manifest.digest


def test_multiarch_layout(multi: TestImage, layout: Path) -> None:
    assert multi.index is not None
    index = json.loads(multi.index.read_bytes())
    assert index["mediaType"] == OCI_INDEX
    platforms = [(m["platform"]["os"], m["platform"]["architecture"]) for m in index["manifests"]]
    assert platforms == [("linux", "amd64"), ("linux", "arm64")]
    assert [m["digest"] for m in index["manifests"]] == [b.digest for b in multi.platform_manifests]
    amd64, arm64 = multi.platforms
    assert not {b.digest for b in amd64.layers} & {b.digest for b in arm64.layers}
    assert multi.tag_digest == multi.index.digest
    # 1 index + 2 manifests + 2 configs + 6 layers, all on disk
    assert len(multi.all_blobs()) == 11
    assert all(b.path.parent == layout / "blobs" / "sha256" for b in multi.all_blobs())


# --- proxy pass-through ------------------------------------------------------------------------


async def test_every_blob_round_trips_through_proxy(
    proxy: FaultProxy, single: TestImage, multi: TestImage
) -> None:
    expected_body = 0
    async with client_for(proxy.url) as client:
        for image, repo in ((single, "test/single"), (multi, "test/multi")):
            head = await client.head(
                f"/v2/{repo}/manifests/{image.tag}", headers={"Accept": MANIFEST_ACCEPT}
            )
            assert head.status_code == 200
            assert head.headers["docker-content-digest"] == image.tag_digest
            for blob in image.all_blobs():
                response = await client.get(
                    blob_url(repo, blob), headers={"Accept": MANIFEST_ACCEPT}
                )
                assert response.status_code == 200, response.text
                assert int(response.headers["content-length"]) == blob.size
                assert sha256(response.content) == blob.digest
                assert response.content == blob.read_bytes()
                expected_body += blob.size
    assert proxy.body_bytes() == expected_body
    assert proxy.count("/manifests/", "HEAD") == 2
    assert proxy.body_bytes(method="HEAD") == 0
    # keep-alive: one httpx client, sequential requests -> one proxied connection
    assert len({r.connection for r in proxy.requests}) == 1
    assert all(r.complete and r.fault is None for r in proxy.requests)


async def test_range_request_passes_through(proxy: FaultProxy, single: TestImage) -> None:
    big = single.layers[2]
    start = 9 * MiB + 17
    async with client_for(proxy.url) as client:
        response = await client.get(
            blob_url("test/single", big), headers={"Range": f"bytes={start}-"}
        )
    assert response.status_code == 206
    assert response.content == big.read_bytes()[start:]
    assert proxy.requests[-1].headers["range"] == f"bytes={start}-"


async def test_upstream_down_gives_502(nursery: trio.Nursery) -> None:
    dead: FaultProxy = await nursery.start(run_fault_proxy, f"http://127.0.0.1:{free_port()}")
    async with client_for(dead.url) as client:
        response = await client.get("/v2/")
    assert response.status_code == 502
    assert response.json()["errors"][0]["code"] == "UNAVAILABLE"


async def test_non_loopback_upstream_is_refused() -> None:
    with pytest.raises(ValueError, match="loopback"):
        await run_fault_proxy("http://192.0.2.1:5000")


# --- faults ------------------------------------------------------------------------------------


async def test_corrupt_flips_exactly_one_byte(proxy: FaultProxy, single: TestImage) -> None:
    big = single.layers[2]
    offset = 5 * MiB + 3
    proxy.add_fault(Fault("corrupt", r"/blobs/", after_bytes=offset))
    async with client_for(proxy.url) as client:
        bad = (await client.get(blob_url("test/single", big))).content
        good = (await client.get(blob_url("test/single", big))).content  # fault used up
    original = big.read_bytes()
    assert len(bad) == len(original)
    assert bad[:offset] == original[:offset]
    assert bad[offset] == original[offset] ^ 0xFF
    assert bad[offset + 1 :] == original[offset + 1 :]
    assert good == original
    assert [r.fault for r in proxy.requests] == ["corrupt", None]


async def test_status_429_with_retry_after_then_recovers(
    proxy: FaultProxy, single: TestImage
) -> None:
    proxy.add_fault(
        Fault("status", r"/blobs/", method="GET", times=2, status=429, headers={"Retry-After": "1"})
    )
    url = blob_url("test/single", single.layers[1])
    async with client_for(proxy.url) as client:
        head = await client.head(url)  # method filter: HEAD is not affected
        first = await client.get(url)
        second = await client.get(url)
        third = await client.get(url)
    assert head.status_code == 200
    for response in (first, second):
        assert response.status_code == 429
        assert response.headers["retry-after"] == "1"
        assert response.json() == {"errors": [{"code": "TOOMANYREQUESTS", "message": "injected"}]}
    assert third.status_code == 200 and third.content == single.layers[1].read_bytes()
    assert proxy.armed_faults() == []
    assert proxy.body_bytes(r"/blobs/") == len(first.content) * 2 + single.layers[1].size


async def test_drop_truncates_and_closes(proxy: FaultProxy, single: TestImage) -> None:
    big = single.layers[2]
    cut = 4 * MiB + 1
    proxy.add_fault(Fault("drop", re.escape(big.digest), after_bytes=cut))
    received = bytearray()
    async with client_for(proxy.url) as client:
        with pytest.raises(httpx.RemoteProtocolError):
            async with client.stream("GET", blob_url("test/single", big)) as response:
                assert response.status_code == 200
                async for chunk in response.aiter_raw():
                    received += chunk
        # the client recovers on a fresh connection
        again = await client.get(blob_url("test/single", big))
    assert bytes(received) == big.read_bytes()[:cut]
    assert again.content == big.read_bytes()
    dropped, retried = proxy.requests
    assert (dropped.body_bytes_sent, dropped.complete) == (cut, False)
    assert retried.complete and retried.connection != dropped.connection


async def test_stall_delays_but_delivers(proxy: FaultProxy, single: TestImage) -> None:
    layer = single.layers[0]
    proxy.add_fault(Fault("stall", r"/blobs/", after_bytes=1000, stall_seconds=0.3))
    async with client_for(proxy.url) as client:
        started = trio.current_time()
        response = await client.get(blob_url("test/single", layer))
        elapsed = trio.current_time() - started
    assert response.content == layer.read_bytes()
    assert elapsed >= 0.3


async def test_redirect_goes_to_cdn_without_authorization(
    proxy: FaultProxy, single: TestImage
) -> None:
    layer = single.layers[0]
    proxy.add_fault(Fault("redirect", r"/blobs/"))
    headers = {"Authorization": "Bearer secret-token"}
    async with client_for(proxy.url, follow_redirects=True, headers=headers) as client:
        response = await client.get(blob_url("test/single", layer), params={"ns": "docker.io"})
    assert response.content == layer.read_bytes()
    assert [r.status_code for r in response.history] == [307]
    assert response.url.host == "localhost"
    assert str(response.url).startswith(proxy.cdn_url + "/cdn/v2/test/single/blobs/")

    redirect, cdn = proxy.requests
    assert (redirect.listener, redirect.status, redirect.fault) == ("proxy", 307, "redirect")
    assert redirect.headers["authorization"] == "Bearer secret-token"
    assert (cdn.listener, cdn.status, cdn.query) == ("cdn", 200, "ns=docker.io")
    assert "authorization" not in cdn.headers
    assert proxy.body_bytes(listener="cdn") == layer.size
    assert proxy.body_bytes(listener="proxy") == 0


async def test_client_hangup_mid_body_is_clean(proxy: FaultProxy, single: TestImage) -> None:
    big = single.layers[2]
    async with await raw_get(proxy.url, blob_url("test/single", big)) as stream:
        received = 0
        with trio.fail_after(10):
            while received < 256 * KiB:  # bounded by the deadline
                data = await stream.receive_some(64 * KiB)
                assert data, "proxy closed the connection early"
                received += len(data)
    # the proxy notices on a later send and ends that connection, and only that one
    with trio.fail_after(10):
        (record,) = await proxy.wait_for("/blobs/")
        await record.done.wait()
    assert record.status == 200 and not record.complete
    async with client_for(proxy.url) as client:
        again = await client.get(blob_url("test/single", big))
    assert again.content == big.read_bytes()
    gc.collect()  # an abandoned async generator would warn (and so fail the test) by now


async def test_cancelling_the_proxy_mid_body_is_clean(
    origin: OriginRegistry, single: TestImage
) -> None:
    big = single.layers[2]
    async with trio.open_nursery() as nursery:
        proxy: FaultProxy = await nursery.start(run_fault_proxy, origin.url)
        proxy.add_fault(Fault("stall", r"/blobs/", after_bytes=MiB, stall_seconds=60))
        async with await raw_get(proxy.url, blob_url("test/single", big)) as stream:
            with trio.fail_after(10):
                received = bytearray()
                while len(received.partition(b"\r\n\r\n")[2]) < MiB:  # bounded by the deadline
                    data = await stream.receive_some(256 * KiB)
                    assert data, "proxy closed the connection early"
                    received += data
                (record,) = await proxy.wait_for("/blobs/")
                await trio.testing.wait_all_tasks_blocked(cushion=0.05)  # proxy now sleeps
            assert record.body_bytes_sent == MiB and not record.done.is_set()
            nursery.cancel_scope.cancel()
    assert record.done.is_set() and not record.complete
    gc.collect()


# --- origin ------------------------------------------------------------------------------------


def test_origin_restart_keeps_content(tmp_path: Path) -> None:
    image = build_image(tmp_path / "layout", "tiny", [10 * KiB], seed=5)
    with OriginRegistry(tmp_path / "origin") as origin:
        push_image(image, origin.host, "test/tiny")
        port = origin.port
        url = f"{origin.url}{blob_url('test/tiny', image.layers[0])}"
        origin.stop()
        assert not origin.running
        with httpx.Client(trust_env=False, timeout=2.0) as client:
            with pytest.raises(httpx.ConnectError):
                client.get(url)
            origin.start()
            assert origin.port == port
            response = client.get(url)
    assert response.status_code == 200
    assert response.content == image.layers[0].read_bytes()
    assert not origin.running
