"""The store through the agent: eviction under --cache-size, and SIGKILL in mid-download."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import trio

from agent.content_store import ContentStore
from p2preg.digest import Digest
from tests.support.fault_proxy import Fault, run_fault_proxy
from tests.support.tools import free_port, wait_until

MiB = 1024 * 1024
pytestmark = pytest.mark.timeout(120)


async def test_cache_size_is_enforced_by_lru_eviction(origin, image_factory, start_agent) -> None:
    image = image_factory("team/evict", layer_sizes=(3 * MiB, 3 * MiB, 3 * MiB))
    layers = image.layers
    capacity = int(2.5 * layers[0].size)  # room for two layers, not three
    agent = await start_agent(origin.url, cache_size=capacity)
    async with httpx.AsyncClient(base_url=agent.registry_url, timeout=30) as client:
        for layer in layers:
            response = await client.get(f"/v2/team/evict/blobs/{layer.digest}")
            assert response.content == layer.path.read_bytes()
            await wait_until(lambda layer=layer: agent.store.has(Digest.parse(layer.digest)))
            assert agent.store.used_bytes <= capacity
        held = [agent.store.has(Digest.parse(layer.digest)) for layer in layers]
        assert held == [False, True, True], "the least recently used layer was evicted"
        # An evicted blob is fetched again on demand.
        response = await client.get(f"/v2/team/evict/blobs/{layers[0].digest}")
        assert response.content == layers[0].path.read_bytes()


async def test_blob_being_served_is_not_evicted(origin, image_factory, start_agent) -> None:
    image = image_factory("team/pinned", layer_sizes=(3 * MiB, 3 * MiB, 3 * MiB))
    first, second, third = image.layers
    agent = await start_agent(origin.url, cache_size=int(2.5 * first.size))
    async with httpx.AsyncClient(base_url=agent.registry_url, timeout=30) as client:
        for layer in (first, second):
            await client.get(f"/v2/team/pinned/blobs/{layer.digest}")
            await wait_until(lambda layer=layer: agent.store.has(Digest.parse(layer.digest)))
        # Hold a response to the least recently used blob open (a raw socket reading slowly)
        # while a third blob lands and forces an eviction.
        stream = await trio.open_tcp_stream("127.0.0.1", agent.registry_port)
        async with stream:
            await stream.send_all(
                f"GET /v2/team/pinned/blobs/{first.digest} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
            )
            with trio.fail_after(10):
                received = await stream.receive_some(1024)
            await client.get(f"/v2/team/pinned/blobs/{third.digest}")
            await wait_until(lambda: agent.store.has(Digest.parse(third.digest)))
            assert agent.store.has(Digest.parse(first.digest)), "pinned blob was evicted"
            assert not agent.store.has(Digest.parse(second.digest))
            _, _, body = received.partition(b"\r\n\r\n")
            with trio.fail_after(10):
                while len(body) < first.size:
                    body += await stream.receive_some(1 << 20)
        assert body == first.path.read_bytes()


def _spawn_agent(port: int, upstream: str, data_dir: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "p2preg",
            "agent",
            "--registry-addr",
            f"127.0.0.1:{port}",
            "--upstream",
            upstream,
            "--data-dir",
            str(data_dir),
            "--log-level",
            "warning",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
    if process.stderr:
        process.stderr.close()


async def _wait_ready(url: str) -> None:
    async with httpx.AsyncClient(timeout=1) as client:
        with trio.fail_after(20):
            while True:
                try:
                    if (await client.get(f"{url}/v2/")).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                await trio.sleep(0.05)


@pytest.mark.slow
async def test_restart_after_sigkill_mid_download_is_consistent(
    origin, image_factory, nursery, tmp_path
) -> None:
    image = image_factory("team/sigkill")
    layer = image.layers[2]
    proxy = await nursery.start(run_fault_proxy, origin.url)
    # The origin stalls after 8 MiB: the agent is killed while the blob is half downloaded.
    proxy.add_fault(Fault("stall", f"/blobs/{layer.digest}", after_bytes=8 * MiB, stall_seconds=30))
    data_dir = tmp_path / "data"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = _spawn_agent(port, proxy.url, data_dir)
    try:
        await _wait_ready(url)
        # A raw client reads the first 4 MiB of the blob, proving the download is under way.
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            request = f"GET /v2/team/sigkill/blobs/{layer.digest} HTTP/1.1\r\nHost: x\r\n\r\n"
            await stream.send_all(request.encode())
            got = 0
            with trio.fail_after(20):
                while got < 4 * MiB:
                    got += len(await stream.receive_some(1 << 20))
            partials = list((data_dir / "partial").iterdir())
            assert len(partials) == 1 and partials[0].stat().st_size >= 4 * MiB
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=10)
    finally:
        _stop(process)

    # What a restarted agent finds: no partial file, no entry for the interrupted blob.
    store = ContentStore.open(data_dir, 1 << 30)
    assert not store.has(Digest.parse(layer.digest))
    assert list((data_dir / "partial").iterdir()) == []
    proxy.clear_faults()
    process = _spawn_agent(port, proxy.url, data_dir)
    try:
        await _wait_ready(url)
        async with httpx.AsyncClient(timeout=30) as client:
            response = await client.get(f"{url}/v2/team/sigkill/blobs/{layer.digest}")
            assert response.content == layer.path.read_bytes()
            blob_path = data_dir / "blobs" / "sha256" / layer.digest[7:9] / layer.digest[7:]
            await wait_until(blob_path.exists)
            assert blob_path.read_bytes() == layer.path.read_bytes()
    finally:
        _stop(process)
    assert os.listdir(data_dir / "partial") == []
