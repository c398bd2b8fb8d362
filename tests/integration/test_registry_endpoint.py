"""The agent's OCI pull endpoint against a real origin (docker-registry), through the fault proxy.

Every misbehaviour is injected by the proxy in front of the real origin, never by mocking the
agent's client.
"""

from __future__ import annotations

import hashlib
import json

import httpx
import pytest
import trio

from p2preg.mediatypes import DEFAULT_MANIFEST_ACCEPT, OCI_INDEX, OCI_MANIFEST
from tests.support.fault_proxy import Fault, run_fault_proxy
from tests.support.oci_image import TestImage
from tests.support.tools import wait_until

pytestmark = pytest.mark.timeout(120)


def _error_code(response: httpx.Response) -> str:
    return str(response.json()["errors"][0]["code"])


async def test_v2_and_manifest_and_blobs_byte_identical(
    origin, shared_image: TestImage, start_agent
) -> None:
    agent = await start_agent(origin.url)
    async with httpx.AsyncClient(base_url=agent.registry_url, timeout=30) as client:
        response = await client.get("/v2/")
        assert response.status_code == 200
        assert response.headers["docker-distribution-api-version"] == "registry/2.0"

        head = await client.head(
            "/v2/team/app/manifests/v1", headers={"Accept": DEFAULT_MANIFEST_ACCEPT}
        )
        assert head.status_code == 200
        assert head.headers["docker-content-digest"] == shared_image.manifest.digest
        assert head.headers["content-type"] == OCI_MANIFEST
        assert int(head.headers["content-length"]) == shared_image.manifest.size

        manifest = await client.get(
            "/v2/team/app/manifests/v1", headers={"Accept": DEFAULT_MANIFEST_ACCEPT}
        )
        assert manifest.content == shared_image.manifest.path.read_bytes()
        assert manifest.headers["docker-content-digest"] == shared_image.manifest.digest

        for blob in (shared_image.config, *shared_image.layers):
            response = await client.get(f"/v2/team/app/blobs/{blob.digest}")
            assert response.status_code == 200
            assert response.headers["docker-content-digest"] == blob.digest
            assert response.headers["content-type"] == "application/octet-stream"
            assert int(response.headers["content-length"]) == blob.size
            assert response.content == blob.path.read_bytes()
            head = await client.head(f"/v2/team/app/blobs/{blob.digest}")
            assert int(head.headers["content-length"]) == blob.size
            assert head.content == b""


async def test_multiarch_index_passes_through(origin, image_factory, start_agent) -> None:
    image = image_factory("team/multi", multiarch=True)
    agent = await start_agent(origin.url)
    async with httpx.AsyncClient(base_url=agent.registry_url, timeout=30) as client:
        index = await client.get(
            "/v2/team/multi/manifests/v1", headers={"Accept": f"{OCI_INDEX}, {OCI_MANIFEST}"}
        )
        assert index.status_code == 200
        assert index.headers["content-type"] == OCI_INDEX
        assert index.content == image.index.path.read_bytes()
        for platform_manifest in image.platform_manifests:
            response = await client.get(
                f"/v2/team/multi/manifests/{platform_manifest.digest}",
                headers={"Accept": OCI_MANIFEST},
            )
            assert response.content == platform_manifest.path.read_bytes()
            assert response.headers["content-type"] == OCI_MANIFEST


async def test_range_requests(origin, shared_image: TestImage, start_agent) -> None:
    agent = await start_agent(origin.url)
    layer = shared_image.layers[2]
    data = layer.path.read_bytes()
    url = f"/v2/team/app/blobs/{layer.digest}"
    async with httpx.AsyncClient(base_url=agent.registry_url, timeout=30) as client:
        # Cold: the range is served while the blob downloads; then warm from the store.
        for _ in range(2):
            response = await client.get(url, headers={"Range": "bytes=5000000-5000099"})
            assert response.status_code == 206
            assert response.content == data[5000000:5000100]
            assert response.headers["content-range"] == f"bytes 5000000-5000099/{len(data)}"
        response = await client.get(url, headers={"Range": "bytes=-10"})
        assert response.status_code == 206 and response.content == data[-10:]
        response = await client.get(url, headers={"Range": f"bytes={len(data) - 3}-"})
        assert response.status_code == 206 and response.content == data[-3:]
        response = await client.get(url, headers={"Range": f"bytes={len(data)}-"})
        assert response.status_code == 416
        assert response.headers["content-range"] == f"bytes */{len(data)}"
        assert _error_code(response) == "RANGE_INVALID"


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("GET", "/v2/Bad_Name/manifests/v1", 400, "NAME_INVALID"),
        ("GET", "/v2/team/..%2F..%2Fetc/blobs/sha256:" + "0" * 64, 400, "NAME_INVALID"),
        ("GET", "/v2/team/app/blobs/sha256:1234", 400, "DIGEST_INVALID"),
        ("GET", "/v2/team/app/blobs/md5:" + "0" * 32, 400, "DIGEST_INVALID"),
        ("GET", "/v2/team/app/manifests/sha256:zz", 400, "DIGEST_INVALID"),
        ("GET", "/v2/team/app/blobs/sha256:" + "0" * 64, 404, "BLOB_UNKNOWN"),
        ("HEAD", "/v2/team/app/blobs/sha256:" + "0" * 64, 404, None),
        ("GET", "/v2/team/app/manifests/nope", 404, "MANIFEST_UNKNOWN"),
        ("GET", "/v2/team/app/manifests/sha256:" + "0" * 64, 404, "MANIFEST_UNKNOWN"),
        ("POST", "/v2/team/app/blobs/uploads/", 405, "UNSUPPORTED"),
        ("PUT", "/v2/team/app/manifests/v1", 405, "UNSUPPORTED"),
        ("DELETE", "/v2/team/app/blobs/sha256:" + "0" * 64, 405, "UNSUPPORTED"),
        ("GET", "/v2/team/app/manifests/v1?ns=quay.io", 404, "NAME_UNKNOWN"),
    ],
)
async def test_errors_are_oci_json(
    origin, shared_image: TestImage, start_agent, method: str, path: str, status: int, code
) -> None:
    agent = await start_agent(origin.url)
    async with httpx.AsyncClient(base_url=agent.registry_url, timeout=30) as client:
        response = await client.request(method, path)
        assert response.status_code == status, response.text
        if code is not None:
            assert response.headers["content-type"] == "application/json"
            assert _error_code(response) == code


async def test_unknown_upstream_without_default_is_404(origin, start_agent) -> None:
    agent = await start_agent(None)
    async with httpx.AsyncClient(base_url=agent.registry_url, timeout=30) as client:
        response = await client.get("/v2/team/app/manifests/v1")
        assert response.status_code == 404 and _error_code(response) == "NAME_UNKNOWN"


async def test_malformed_http_gets_400_and_agent_survives(origin, start_agent) -> None:
    agent = await start_agent(origin.url)
    stream = await trio.open_tcp_stream("127.0.0.1", agent.registry_port)
    async with stream:
        await stream.send_all(b"GARBAGE\x00\x01 nonsense\r\n\r\n")
        with trio.fail_after(5):
            reply = await stream.receive_some(4096)
        assert reply.startswith(b"HTTP/1.1 400")
    # A path that tries to climb out of the store (clients such as httpx would normalise it,
    # so it is sent raw) is refused by the name grammar before it reaches any file path.
    stream = await trio.open_tcp_stream("127.0.0.1", agent.registry_port)
    async with stream:
        digest = "sha256:" + "0" * 64
        await stream.send_all(
            f"GET /v2/../../etc/passwd/blobs/{digest} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        )
        reply = b""
        with trio.fail_after(5):
            while b"NAME_INVALID" not in reply and (chunk := await stream.receive_some(4096)):
                reply += chunk
        assert reply.startswith(b"HTTP/1.1 400") and b"NAME_INVALID" in reply
    async with httpx.AsyncClient(base_url=agent.registry_url, timeout=30) as client:
        assert (await client.get("/v2/")).status_code == 200


async def test_containerd_ns_selects_upstream_and_library_prefix(
    origin, image_factory, start_agent
) -> None:
    image = image_factory("library/busybox")
    from p2preg.config import Upstream

    agent = await start_agent(None, namespace_upstreams={"docker.io": Upstream(origin.url)})
    async with httpx.AsyncClient(base_url=agent.registry_url, timeout=30) as client:
        # containerd sends the full name; a single-segment name gets library/ for docker.io.
        for path in ("/v2/library/busybox/manifests/v1", "/v2/busybox/manifests/v1"):
            response = await client.get(
                path, params={"ns": "docker.io"}, headers={"Accept": DEFAULT_MANIFEST_ACCEPT}
            )
            assert response.status_code == 200, response.text
            assert response.content == image.manifest.path.read_bytes()
        response = await client.get("/v2/library/busybox/manifests/v1", params={"ns": "ghcr.io"})
        assert response.status_code == 404
        # No ns and no default upstream: 404 too.
        response = await client.get("/v2/library/busybox/manifests/v1")
        assert response.status_code == 404


async def test_tags_list_passes_through(origin, shared_image: TestImage, start_agent) -> None:
    agent = await start_agent(origin.url)
    async with httpx.AsyncClient(base_url=agent.registry_url, timeout=30) as client:
        response = await client.get("/v2/team/app/tags/list")
        assert response.status_code == 200
        assert "v1" in response.json()["tags"]


async def test_concurrent_pulls_share_one_origin_download(
    origin, image_factory, start_agent, nursery
) -> None:
    image = image_factory("team/concurrent")
    proxy = await nursery.start(run_fault_proxy, origin.url)
    agent = await start_agent(proxy.url)
    layer = image.layers[2]
    expected = hashlib.sha256(layer.path.read_bytes()).hexdigest()
    results: list[str] = []

    async def pull() -> None:
        async with httpx.AsyncClient(base_url=agent.registry_url, timeout=30) as client:
            response = await client.get(f"/v2/team/concurrent/blobs/{layer.digest}")
            assert response.status_code == 200
            results.append(hashlib.sha256(response.content).hexdigest())

    async with trio.open_nursery() as pulls:
        for _ in range(8):
            pulls.start_soon(pull)
    assert results == [expected] * 8
    assert proxy.count(f"/blobs/{layer.digest}", "GET") == 1
    assert proxy.body_bytes(f"/blobs/{layer.digest}") == layer.size


async def test_digest_mismatch_aborts_response_and_caches_nothing(
    origin, image_factory, start_agent, nursery
) -> None:
    image = image_factory("team/corrupt")
    proxy = await nursery.start(run_fault_proxy, origin.url)
    agent = await start_agent(proxy.url)
    layer = image.layers[2]
    proxy.add_fault(Fault("corrupt", f"/blobs/{layer.digest}", after_bytes=1_000_000))
    url = f"{agent.registry_url}/v2/team/corrupt/blobs/{layer.digest}"
    async with httpx.AsyncClient(timeout=30) as client:
        with pytest.raises(httpx.RemoteProtocolError):
            # The body is cut short before its last byte: the client sees a truncated response.
            await client.get(url)
        assert not agent.store.has(_digest(layer.digest))
        assert list((agent.store.root / "partial").iterdir()) == []
        # The next pull fetches again and succeeds.
        response = await client.get(url)
        assert response.content == layer.path.read_bytes()
    # The client gets its last byte once the digest checks out; the commit (after fsync)
    # follows right behind.
    await wait_until(lambda: agent.store.has(_digest(layer.digest)))


def _digest(text: str):
    from p2preg.digest import Digest

    return Digest.parse(text)


async def test_dropped_connection_resumes_with_range(
    origin, image_factory, start_agent, nursery
) -> None:
    image = image_factory("team/drop")
    proxy = await nursery.start(run_fault_proxy, origin.url)
    agent = await start_agent(proxy.url)
    layer = image.layers[2]
    proxy.add_fault(Fault("drop", f"/blobs/{layer.digest}", after_bytes=7_000_000))
    async with httpx.AsyncClient(base_url=agent.registry_url, timeout=30) as client:
        response = await client.get(f"/v2/team/drop/blobs/{layer.digest}")
        assert response.content == layer.path.read_bytes()
    gets = proxy.records(f"/blobs/{layer.digest}", "GET")
    assert len(gets) == 2
    assert gets[1].headers.get("range") == "bytes=7000000-"
    # The origin sent the blob about once: the resume did not start over.
    assert proxy.body_bytes(f"/blobs/{layer.digest}") == layer.size


async def test_origin_5xx_is_retried(origin, image_factory, start_agent, nursery) -> None:
    image = image_factory("team/flaky")
    proxy = await nursery.start(run_fault_proxy, origin.url)
    agent = await start_agent(proxy.url)
    proxy.add_fault(Fault("status", "/manifests/", status=503, times=2))
    async with httpx.AsyncClient(base_url=agent.registry_url, timeout=30) as client:
        response = await client.get(
            "/v2/team/flaky/manifests/v1", headers={"Accept": DEFAULT_MANIFEST_ACCEPT}
        )
        assert response.status_code == 200
        assert response.content == image.manifest.path.read_bytes()


async def test_429_retried_after_retry_after(origin, shared_image, start_agent, nursery) -> None:
    proxy = await nursery.start(run_fault_proxy, origin.url)
    agent = await start_agent(proxy.url)
    proxy.add_fault(
        Fault("status", "/manifests/v1", status=429, headers={"Retry-After": "1"}, times=1)
    )
    async with httpx.AsyncClient(base_url=agent.registry_url, timeout=30) as client:
        started = trio.current_time()
        response = await client.head(
            "/v2/team/app/manifests/v1", headers={"Accept": DEFAULT_MANIFEST_ACCEPT}
        )
        assert response.status_code == 200
        assert trio.current_time() - started >= 1.0
    assert proxy.count("/manifests/v1", "HEAD") == 2


async def test_429_beyond_deadline_is_passed_on(origin, shared_image, start_agent, nursery) -> None:
    proxy = await nursery.start(run_fault_proxy, origin.url)
    agent = await start_agent(proxy.url, request_timeout=3.0)
    proxy.add_fault(
        Fault("status", "/manifests/v1", status=429, headers={"Retry-After": "60"}, times=-1)
    )
    async with httpx.AsyncClient(base_url=agent.registry_url, timeout=30) as client:
        response = await client.get("/v2/team/app/manifests/v1")
        assert response.status_code == 429
        assert response.headers["retry-after"] == "60"
        assert _error_code(response) == "TOOMANYREQUESTS"


async def test_redirect_to_another_host_without_credentials(
    origin, image_factory, start_agent, nursery, tmp_path
) -> None:
    image = image_factory("team/cdn")
    proxy = await nursery.start(run_fault_proxy, origin.url)
    host = proxy.url.removeprefix("http://")
    from p2preg.config import Credentials

    agent = await start_agent(proxy.url, credentials={host: Credentials("user", "secret")})
    layer = image.layers[0]
    # A Basic challenge first, so the agent sends credentials to the registry host.
    proxy.add_fault(
        Fault(
            "status",
            "/manifests/v1",
            status=401,
            headers={"WWW-Authenticate": 'Basic realm="test"'},
        )
    )
    proxy.add_fault(Fault("redirect", f"/blobs/{layer.digest}"))
    async with httpx.AsyncClient(base_url=agent.registry_url, timeout=30) as client:
        response = await client.get(
            "/v2/team/cdn/manifests/v1", headers={"Accept": DEFAULT_MANIFEST_ACCEPT}
        )
        assert response.status_code == 200
        response = await client.get(f"/v2/team/cdn/blobs/{layer.digest}")
        assert response.content == layer.path.read_bytes()
    registry_blob = proxy.records(f"/blobs/{layer.digest}", "GET", listener="proxy")
    assert registry_blob and registry_blob[0].headers.get("authorization", "").startswith("Basic")
    cdn = proxy.records(f"/blobs/{layer.digest}", "GET", listener="cdn")
    assert len(cdn) == 1 and "authorization" not in cdn[0].headers


async def test_unauthorized_passes_challenge_to_client(
    origin, shared_image, start_agent, nursery
) -> None:
    proxy = await nursery.start(run_fault_proxy, origin.url)
    agent = await start_agent(proxy.url)
    challenge = 'Basic realm="private"'
    proxy.add_fault(
        Fault("status", "/manifests/v1", status=401, headers={"WWW-Authenticate": challenge})
    )
    async with httpx.AsyncClient(base_url=agent.registry_url, timeout=30) as client:
        response = await client.get("/v2/team/app/manifests/v1")
        assert response.status_code == 401
        assert _error_code(response) == "UNAUTHORIZED"
        assert response.headers["www-authenticate"] == challenge


async def test_tag_cache_ttl_and_stale_answer_when_origin_down(
    origin, image_factory, start_agent, nursery
) -> None:
    image = image_factory("team/stale")
    proxy = await nursery.start(run_fault_proxy, origin.url)
    agent = await start_agent(proxy.url, tag_ttl=0.5)
    accept = {"Accept": DEFAULT_MANIFEST_ACCEPT}
    async with httpx.AsyncClient(base_url=agent.registry_url, timeout=30) as client:
        for _ in range(3):
            response = await client.get("/v2/team/stale/manifests/v1", headers=accept)
            assert response.status_code == 200
        # Within the TTL the tag was resolved once, and the manifest fetched by digest once.
        assert proxy.count("/manifests/v1", "HEAD") == 1
        assert proxy.count("/manifests/v1", "GET") == 0
        assert proxy.count(f"/manifests/{image.manifest.digest}", "GET") == 1
        await trio.sleep(0.6)
        proxy.add_fault(Fault("status", "/manifests/", status=503, times=-1))
        response = await client.get("/v2/team/stale/manifests/v1", headers=accept)
        assert response.status_code == 200
        assert response.content == image.manifest.path.read_bytes()
        assert json.loads(response.content)["layers"]


async def test_client_disconnect_does_not_cancel_shared_download(
    origin, image_factory, start_agent, nursery
) -> None:
    image = image_factory("team/disconnect")
    proxy = await nursery.start(run_fault_proxy, origin.url)
    agent = await start_agent(proxy.url)
    layer = image.layers[2]
    # The origin pauses after 6 MiB, so the first client is surely mid-download when it leaves.
    proxy.add_fault(
        Fault("stall", f"/blobs/{layer.digest}", after_bytes=6 * 1024 * 1024, stall_seconds=1.0)
    )
    request = f"GET /v2/team/disconnect/blobs/{layer.digest} HTTP/1.1\r\nHost: x\r\n\r\n"
    leaver = await trio.open_tcp_stream("127.0.0.1", agent.registry_port)
    await leaver.send_all(request.encode())
    with trio.fail_after(10):
        received = 0
        while received < 2 * 1024 * 1024:
            received += len(await leaver.receive_some(1 << 20))
    results: list[bytes] = []
    async with (
        httpx.AsyncClient(base_url=agent.registry_url, timeout=30) as client,
        trio.open_nursery() as both,
    ):

        async def stayer() -> None:
            response = await client.get(f"/v2/team/disconnect/blobs/{layer.digest}")
            results.append(response.content)

        both.start_soon(stayer)
        await trio.sleep(0.1)
        await leaver.aclose()  # the first client hangs up mid-body
    assert results == [layer.path.read_bytes()]
    assert proxy.count(f"/blobs/{layer.digest}", "GET") == 1
    await wait_until(lambda: agent.store.has(_digest(layer.digest)))


async def test_mirror_all_tries_https_for_unknown_namespace(origin, start_agent) -> None:
    namespace = "127.0.0.1:9"  # loopback, nothing listens: the attempt fails fast
    strict = await start_agent(None)
    permissive = await start_agent(None, mirror_all=True, connect_timeout=1.0, request_timeout=3.0)
    async with httpx.AsyncClient(timeout=30) as client:
        response = await client.get(
            f"{strict.registry_url}/v2/team/app/manifests/v1", params={"ns": namespace}
        )
        assert response.status_code == 404
        response = await client.get(
            f"{permissive.registry_url}/v2/team/app/manifests/v1", params={"ns": namespace}
        )
        # It tried https://127.0.0.1:9 (and could not reach it) instead of refusing the ns.
        assert response.status_code == 503
        assert "https://127.0.0.1:9" in response.text
