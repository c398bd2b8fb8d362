"""Real pull clients (skopeo, podman, containerd) pull through the agent, byte for byte.

Each test pushes a fresh image to the real origin (docker-registry), starts an in-process agent in
front of it, runs the client as a subprocess, and checks what the client ended up with against
the bytes that were pushed: every blob by digest for skopeo's OCI layout and containerd's content
store, the manifest digest and the layers' diff_ids for podman's storage.

Loopback only, by two fences (see tests/support/clients.py): every client gets an environment and
config files of its own, and HTTP(S)_PROXY point at an egress trap on 127.0.0.1 that refuses and
records anything a client tries to send to a non-loopback host. Every test asserts the trap saw
nothing; for the mirror tests that also proves the client never fell back to docker.io.

A missing client skips its test locally and fails it under CI=true (``require_tool``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from agent.service import RunningAgent
from p2preg.config import Upstream
from p2preg.digest import Digest
from tests.support.clients import (
    EgressTrap,
    Podman,
    Skopeo,
    require_root,
    run_containerd,
    run_egress_trap,
)
from tests.support.oci_image import TestImage
from tests.support.origin import OriginRegistry
from tests.support.tools import require_tool

pytestmark = [pytest.mark.real_client, pytest.mark.timeout(180)]

KiB = 1024
MiB = 1024 * KiB
# Per platform; the 5 MiB layer spans 6 pieces of 1 MiB (piece_length_for).
MULTIARCH_LAYER_SIZES = (1 * MiB + 5, 40 * KiB, 5 * MiB + 1)
_REF_NAME = "org.opencontainers.image.ref.name"

ImageFactory = Callable[..., TestImage]


@pytest.fixture
async def egress_trap(nursery: trio.Nursery) -> EgressTrap:
    trap: EgressTrap = await nursery.start(run_egress_trap)
    return trap


# The tool checks run in plain (sync) fixtures: a skip raised inside a trio test loses its reason
# on the way out of the test's nursery, and the skip should name the missing tool.


@pytest.fixture
def skopeo_installed() -> None:
    require_tool("skopeo")


@pytest.fixture
def podman_installed() -> None:
    require_tool("podman")
    require_root("podman")


@pytest.fixture
def containerd_installed() -> None:
    require_tool("containerd")
    require_tool("ctr")
    require_root("containerd")


def _agent_host(agent: RunningAgent) -> str:
    return f"127.0.0.1:{agent.registry_port}"


def _diff_ids(image: TestImage) -> list[str]:
    diff_ids: list[str] = json.loads(image.config.read_bytes())["rootfs"]["diff_ids"]
    return diff_ids


def assert_layout_identical(layout: Path, image: TestImage) -> None:
    """The OCI layout skopeo wrote holds exactly the pushed blobs, byte for byte, and the tag."""
    index = json.loads((layout / "index.json").read_text())
    tagged = [m for m in index["manifests"] if m.get("annotations", {}).get(_REF_NAME) == image.tag]
    assert len(tagged) == 1, f"{layout}/index.json has no single entry for {image.tag}: {index}"
    assert tagged[0]["digest"] == image.tag_digest
    assert tagged[0]["mediaType"] == image.tag_media_type

    expected = {blob.digest: blob for blob in image.all_blobs()}
    pulled = {"sha256:" + path.name: path for path in (layout / "blobs" / "sha256").iterdir()}
    assert sorted(pulled) == sorted(expected), "pulled blobs differ from the pushed ones"
    for digest, path in pulled.items():
        data = path.read_bytes()
        source = expected[digest].read_bytes()
        assert data == source, (
            f"{digest}: pulled {len(data)} bytes differ from the {len(source)} bytes pushed"
        )


def assert_podman_image(
    found: dict[str, Any], image: TestImage, reference: str, image_id: str
) -> None:
    """podman stored the pushed image: same manifest digest, config (ID) and layer diff_ids."""
    config_hex = image.config.digest.removeprefix("sha256:")
    assert image_id == config_hex, f"podman pull printed {image_id!r}"
    assert found["Id"] == config_hex
    assert found["Digest"] == image.manifest.digest
    repository = reference.rpartition(":")[0]
    assert f"{repository}@{image.manifest.digest}" in found["RepoDigests"], found["RepoDigests"]
    assert reference in found["RepoTags"], found["RepoTags"]
    # containers/storage checks each layer's uncompressed digest against these while it applies
    # the layer, so equal diff_ids mean every layer arrived intact.
    assert found["RootFS"]["Layers"] == _diff_ids(image)
    assert (found["Os"], found["Architecture"]) == ("linux", "amd64")


# --- skopeo ------------------------------------------------------------------------------------


async def test_skopeo_copy_single_platform(
    skopeo_installed: None,
    origin: OriginRegistry,
    image_factory: ImageFactory,
    start_agent: Any,
    egress_trap: EgressTrap,
    tmp_path: Path,
) -> None:
    image = image_factory("rc/skopeo-single")
    agent = await start_agent(origin.url)
    skopeo = Skopeo(tmp_path / "skopeo", egress_trap)
    layout = tmp_path / "pulled"
    await skopeo.copy_to_oci(f"{_agent_host(agent)}/rc/skopeo-single:v1", layout, "v1")
    assert_layout_identical(layout, image)
    egress_trap.assert_untouched()


async def test_skopeo_copy_all_platforms(
    skopeo_installed: None,
    origin: OriginRegistry,
    image_factory: ImageFactory,
    start_agent: Any,
    egress_trap: EgressTrap,
    tmp_path: Path,
) -> None:
    image = image_factory("rc/skopeo-multi", layer_sizes=MULTIARCH_LAYER_SIZES, multiarch=True)
    assert image.index is not None and len(image.platforms) == 2
    agent = await start_agent(origin.url)
    skopeo = Skopeo(tmp_path / "skopeo", egress_trap)
    layout = tmp_path / "pulled"
    await skopeo.copy_to_oci(
        f"{_agent_host(agent)}/rc/skopeo-multi:v1", layout, "v1", all_platforms=True
    )
    # The index, both platforms' manifests and configs, and every layer of both platforms.
    assert_layout_identical(layout, image)
    egress_trap.assert_untouched()


async def test_skopeo_second_pull_with_origin_stopped(
    skopeo_installed: None,
    origin: OriginRegistry,
    image_factory: ImageFactory,
    start_agent: Any,
    egress_trap: EgressTrap,
    tmp_path: Path,
) -> None:
    image = image_factory("rc/skopeo-offline")
    # tag_ttl=0: the second pull's tag lookup goes to the origin again and finds it down, so
    # what is tested is the agent's fallback to the last known answer, not a still-fresh tag.
    agent = await start_agent(origin.url, tag_ttl=0.0)
    skopeo = Skopeo(tmp_path / "skopeo", egress_trap)
    source = f"{_agent_host(agent)}/rc/skopeo-offline:v1"
    await skopeo.copy_to_oci(source, tmp_path / "first", "v1")
    assert_layout_identical(tmp_path / "first", image)

    origin.stop()  # the origin fixture is shared by the session: it is started again below
    try:
        assert not origin.running
        await skopeo.copy_to_oci(source, tmp_path / "second", "v1")
    finally:
        origin.start()
    assert_layout_identical(tmp_path / "second", image)
    egress_trap.assert_untouched()


# --- podman ------------------------------------------------------------------------------------


async def test_podman_pull(
    podman_installed: None,
    origin: OriginRegistry,
    image_factory: ImageFactory,
    start_agent: Any,
    egress_trap: EgressTrap,
    tmp_path: Path,
) -> None:
    image = image_factory("rc/podman")
    agent = await start_agent(origin.url)
    reference = f"{_agent_host(agent)}/rc/podman:v1"
    with Podman(tmp_path / "podman", egress_trap) as podman:
        image_id = await podman.pull(reference, tls_verify=False)  # the agent speaks plain HTTP
        assert_podman_image(await podman.inspect(reference), image, reference, image_id)
    egress_trap.assert_untouched()


async def test_podman_pull_through_docker_io_mirror(
    podman_installed: None,
    origin: OriginRegistry,
    image_factory: ImageFactory,
    start_agent: Any,
    egress_trap: EgressTrap,
    tmp_path: Path,
) -> None:
    # Podman sends no ns parameter to a mirror: the agent's default upstream (the origin) serves
    # the docker.io image, pushed there under its Docker Hub name.
    image = image_factory("library/rc-podman-mirror")
    agent = await start_agent(origin.url)
    registries_conf = (
        "[[registry]]\n"
        'prefix = "docker.io"\n'
        'location = "docker.io"\n'
        "[[registry.mirror]]\n"
        f'location = "{_agent_host(agent)}"\n'
        "insecure = true\n"
    )
    reference = "docker.io/library/rc-podman-mirror:v1"
    with Podman(tmp_path / "podman", egress_trap, registries_conf=registries_conf) as podman:
        # Should the mirror fail, podman falls back to docker.io; the trap refuses that at once
        # (a fast failure with podman's stderr, no hang, nothing sent off the machine).
        image_id = await podman.pull(reference)
        assert_podman_image(await podman.inspect(reference), image, reference, image_id)
    # It came through the agent, and podman never tried docker.io itself.
    for blob in image.all_blobs():
        assert agent.store.has(Digest.parse(blob.digest)), f"{blob.digest} not in the agent"
    egress_trap.assert_untouched()


# --- containerd --------------------------------------------------------------------------------


async def test_containerd_pull_through_docker_io_mirror(
    containerd_installed: None,
    origin: OriginRegistry,
    image_factory: ImageFactory,
    start_agent: Any,
    egress_trap: EgressTrap,
) -> None:
    image = image_factory("library/rc-containerd")
    # containerd adds ?ns=docker.io to every mirror request; that selects the origin here, and
    # there is no default upstream, so only the ns routing can make this pull work.
    agent = await start_agent(None, namespace_upstreams={"docker.io": Upstream(origin.url)})
    reference = "docker.io/library/rc-containerd:v1"
    async with run_containerd(egress_trap) as containerd:
        # If the mirror fails, containerd falls back to `server`. Docker Hub's real address would
        # send the pull off the machine, so the server is https://127.0.0.1:1 instead: nothing
        # listens on port 1 of loopback, and a broken mirror fails the pull at once.
        containerd.mirror("docker.io", f"http://{_agent_host(agent)}", "https://127.0.0.1:1")
        await containerd.ctr(
            "image",
            "pull",
            "--hosts-dir",
            str(containerd.hosts_dir),
            # The test image is linux/amd64 whatever the machine is; unpacking needs a match.
            "--platform",
            "linux/amd64",
            # native copies files, so unpacking needs no overlayfs (which a CI container may not
            # offer). Unpacking checks every layer's uncompressed digest against the diff_ids.
            "--snapshotter",
            "native",
            reference,
        )

        listed = (await containerd.ctr("image", "ls")).stdout.decode()
        rows = {line.split()[0]: line.split() for line in listed.splitlines()[1:] if line.strip()}
        assert reference in rows, listed
        assert rows[reference][2] == image.manifest.digest, listed

        content = set((await containerd.ctr("content", "ls", "--quiet")).stdout.decode().split())
        for blob in (image.manifest, image.config, *image.layers):
            assert blob.digest in content, f"{blob.digest} missing from containerd:\n{content}"
            data = (await containerd.ctr("content", "get", blob.digest)).stdout
            assert data == blob.read_bytes(), f"{blob.digest}: containerd holds other bytes"

        snapshots = await containerd.ctr("snapshots", "--snapshotter", "native", "ls")
        assert len(snapshots.stdout.decode().strip().splitlines()) - 1 == len(image.layers), (
            snapshots.stdout.decode()
        )
    egress_trap.assert_untouched()
