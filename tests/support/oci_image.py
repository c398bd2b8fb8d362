"""Deterministic OCI test images, written with plain Python, and a way to push them to an origin.

Integration tests need images whose every byte they know in advance: to compare what a pull
client received against the source, and to count what the origin served. Building them here (no
container engine exists on the test machines) keeps them small, random (incompressible, so every
byte has to travel) and reproducible: the same seed and sizes give the same digests on a machine.

Layout written (OCI image layout 1.0)::

    LAYOUT/oci-layout
    LAYOUT/index.json              one entry per tag, ref name in an annotation
    LAYOUT/blobs/sha256/<hex>      layers, configs, manifests, image indexes

Several images may share one layout (different tags); blobs are content-addressed so shared
layers are stored once.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import subprocess
import tarfile
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import httpx

from tests.support.tools import require_tool

__all__ = [
    "OCI_CONFIG",
    "OCI_INDEX",
    "OCI_LAYER_TAR",
    "OCI_LAYER_TAR_GZIP",
    "OCI_MANIFEST",
    "Blob",
    "PlatformImage",
    "TestImage",
    "build_image",
    "push_image",
]

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_TAR_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"

_REF_NAME = "org.opencontainers.image.ref.name"
_CHUNK = 1 << 20
_GZIP_LEVEL = 1  # random data does not compress anyway; level 1 keeps big layers fast to build
_MULTIARCH_PLATFORMS = (("linux", "amd64"), ("linux", "arm64"))
_SKOPEO_TIMEOUT = 120.0


@dataclass(frozen=True)
class Blob:
    """One content-addressed file of a layout, with the descriptor fields a registry reports."""

    digest: str
    size: int
    media_type: str
    path: Path

    def read_bytes(self) -> bytes:
        return self.path.read_bytes()

    def descriptor(self) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


@dataclass(frozen=True)
class PlatformImage:
    """The manifest, config and layers of one platform ("linux/amd64")."""

    platform: str
    manifest: Blob
    config: Blob
    layers: tuple[Blob, ...]


@dataclass(frozen=True)
class TestImage:
    """An image written into an OCI layout under ``tag``.

    ``manifest``, ``config`` and ``layers`` describe the image a linux/amd64 client pulls: for a
    single-platform image the only one, for a multi-arch image the amd64 member. A multi-arch image
    also has ``index`` (the OCI image index the tag points at) and ``platform_manifests`` (one per
    platform, in index order); ``platforms`` has the full per-platform breakdown in both cases.
    """

    __test__ = False  # not a pytest test class, despite the name

    layout: Path
    tag: str
    manifest: Blob
    config: Blob
    layers: tuple[Blob, ...]
    index: Blob | None
    platform_manifests: tuple[Blob, ...]
    platforms: tuple[PlatformImage, ...] = ()

    @property
    def tag_digest(self) -> str:
        """The digest the tag resolves to: the image index if there is one, else the manifest."""
        return self.index.digest if self.index is not None else self.manifest.digest

    @property
    def tag_media_type(self) -> str:
        return self.index.media_type if self.index is not None else self.manifest.media_type

    def all_blobs(self) -> tuple[Blob, ...]:
        """Every distinct blob of the image: index, manifests, configs, then layers."""
        ordered: list[Blob] = []
        if self.index is not None:
            ordered.append(self.index)
        platforms = self.platforms or (PlatformImage("", self.manifest, self.config, self.layers),)
        ordered.extend(p.manifest for p in platforms)
        ordered.extend(p.config for p in platforms)
        for p in platforms:
            ordered.extend(p.layers)
        seen: set[str] = set()
        distinct: list[Blob] = []
        for blob in ordered:
            if blob.digest not in seen:
                seen.add(blob.digest)
                distinct.append(blob)
        return tuple(distinct)

    def layer_blobs(self) -> tuple[Blob, ...]:
        """Every distinct layer of every platform."""
        return tuple(b for b in self.all_blobs() if b.media_type.startswith(OCI_LAYER_TAR))


def build_image(
    layout: Path,
    tag: str,
    layer_sizes: Sequence[int],
    *,
    seed: int,
    gzip_layers: Sequence[bool] | None = None,
    multiarch: bool = False,
) -> TestImage:
    """Write an image with one random-data tar layer per entry of ``layer_sizes`` into ``layout``.

    ``layer_sizes`` are the sizes of the random file inside each layer's tar; the blob is a bit
    larger (tar headers; an uncompressed tar is a whole number of 512-byte blocks). Layers are
    gzipped where ``gzip_layers`` says so (default: none). Content depends only on ``seed``, the
    sizes, the compression choices and the platform, so the amd64 member of a multi-arch image
    equals the single-platform image built with the same arguments; the arm64 member has other
    layers. An existing entry for ``tag`` in the layout's index.json is replaced.
    """
    if not layer_sizes:
        raise ValueError("an image needs at least one layer")
    if any(size < 0 for size in layer_sizes):
        raise ValueError(f"layer sizes must be >= 0: {list(layer_sizes)}")
    compress = list(gzip_layers) if gzip_layers is not None else [False] * len(layer_sizes)
    if len(compress) != len(layer_sizes):
        raise ValueError("gzip_layers must have one entry per layer")

    blobs_dir = layout / "blobs" / "sha256"
    blobs_dir.mkdir(parents=True, exist_ok=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')

    platform_list = _MULTIARCH_PLATFORMS if multiarch else _MULTIARCH_PLATFORMS[:1]
    platforms = tuple(
        _build_platform(blobs_dir, os_name, arch, layer_sizes, compress, seed)
        for os_name, arch in platform_list
    )

    index: Blob | None = None
    if multiarch:
        index_doc = {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                {**p.manifest.descriptor(), "platform": _platform_dict(p.platform)}
                for p in platforms
            ],
        }
        index = _write_json_blob(blobs_dir, index_doc, OCI_INDEX)
    top = index if index is not None else platforms[0].manifest
    _set_tag(layout, tag, top)

    first = platforms[0]
    return TestImage(
        layout=layout,
        tag=tag,
        manifest=first.manifest,
        config=first.config,
        layers=first.layers,
        index=index,
        platform_manifests=tuple(p.manifest for p in platforms) if multiarch else (),
        platforms=platforms,
    )


def push_image(image: TestImage, registry: str, repo: str, *, all_platforms: bool = False) -> None:
    """Copy ``image`` to ``registry`` (``HOST:PORT``, plain HTTP) as ``repo:tag`` with skopeo.

    ``--preserve-digests`` stops skopeo from recompressing uncompressed layers; the digest check
    afterwards makes sure nothing was rewritten anyway, because every test compares digests.
    For a multi-arch image without ``all_platforms`` skopeo pushes only the machine's platform.
    """
    skopeo = require_tool("skopeo")
    command = [
        skopeo,
        "--insecure-policy",
        "copy",
        "--preserve-digests",
        "--dest-tls-verify=false",
        "--dest-no-creds",
        "--retry-times=0",
    ]
    if all_platforms:
        command.append("--all")
    command += [f"oci:{image.layout}:{image.tag}", f"docker://{registry}/{repo}:{image.tag}"]
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=_SKOPEO_TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"skopeo copy timed out after {_SKOPEO_TIMEOUT}s: {command}") from exc
    if result.returncode != 0:
        raise RuntimeError(
            f"skopeo copy failed (exit {result.returncode}): {' '.join(command)}\n"
            f"{result.stderr.strip()}"
        )

    reported = _registry_manifest_digest(registry, repo, image.tag)
    expected = {image.manifest.digest} if image.index is None else {image.index.digest}
    if image.index is not None and not all_platforms:
        # skopeo picked one platform; it must still be byte-identical to ours.
        expected = {m.digest for m in image.platform_manifests}
    if reported not in expected:
        raise RuntimeError(
            f"registry reports {reported} for {repo}:{image.tag}, expected one of "
            f"{sorted(expected)}: skopeo rewrote the image"
        )


# --- internals ---------------------------------------------------------------------------------


def _platform_dict(platform: str) -> dict[str, str]:
    os_name, arch = platform.split("/", 1)
    return {"architecture": arch, "os": os_name}


def _build_platform(
    blobs_dir: Path,
    os_name: str,
    arch: str,
    layer_sizes: Sequence[int],
    compress: Sequence[bool],
    seed: int,
) -> PlatformImage:
    layers: list[Blob] = []
    diff_ids: list[str] = []
    for i, (size, gz) in enumerate(zip(layer_sizes, compress, strict=True)):
        # A string seed is hashed with sha512 by random.seed: stable across runs and versions.
        rng = random.Random(f"p2preg-test-layer:{seed}:{os_name}/{arch}:{i}")
        blob, diff_id = _write_layer(blobs_dir, rng, f"layer{i}", size, gz)
        layers.append(blob)
        diff_ids.append(diff_id)

    config_doc = {
        "architecture": arch,
        "os": os_name,
        "created": "1970-01-01T00:00:00Z",
        "config": {"Labels": {"org.p2preg.test.seed": str(seed)}},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [
            {"created": "1970-01-01T00:00:00Z", "created_by": f"p2preg layer {i}"}
            for i in range(len(layers))
        ],
    }
    config = _write_json_blob(blobs_dir, config_doc, OCI_CONFIG)
    manifest_doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config.descriptor(),
        "layers": [layer.descriptor() for layer in layers],
    }
    manifest = _write_json_blob(blobs_dir, manifest_doc, OCI_MANIFEST)
    return PlatformImage(f"{os_name}/{arch}", manifest, config, tuple(layers))


class _Writable(Protocol):
    def write(self, data: bytes, /) -> int: ...


class _HashingFile:
    """A write-only file wrapper that hashes and counts what passes through it."""

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self._raw.write(data)

    def flush(self) -> None:
        self._raw.flush()


def _write_layer(
    blobs_dir: Path, rng: random.Random, name: str, size: int, gz: bool
) -> tuple[Blob, str]:
    """Stream a one-file tar (optionally gzipped) to disk; return its blob and diff_id.

    The tar is framed by hand from ``TarInfo.tobuf`` headers, like Go's archive/tar does (no
    padding to a 10 KiB record), and streamed so large layers never sit in memory.
    """
    fd, tmp_name = tempfile.mkstemp(prefix=".tmp-layer-", dir=blobs_dir)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as raw:
            on_disk = _HashingFile(raw)
            if gz:
                # mtime=0 and no file name make the gzip header, and so the digest, reproducible.
                sink = gzip.GzipFile(
                    filename="", mode="wb", fileobj=on_disk, mtime=0, compresslevel=_GZIP_LEVEL
                )
                with sink:
                    diff_id = _write_tar(sink, rng, name, size)
            else:
                diff_id = _write_tar(on_disk, rng, name, size)
        digest = "sha256:" + on_disk.sha256.hexdigest()
        path = _commit_blob(tmp, blobs_dir, digest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    media_type = OCI_LAYER_TAR_GZIP if gz else OCI_LAYER_TAR
    return Blob(digest, on_disk.size, media_type, path), diff_id


def _write_tar(sink: _Writable, rng: random.Random, name: str, size: int) -> str:
    """Write a tar holding ``name/data.bin`` of ``size`` random bytes; return its sha256 digest."""
    diff_id = hashlib.sha256()

    def emit(data: bytes) -> None:
        diff_id.update(data)
        sink.write(data)

    emit(_tar_header(name + "/", tarfile.DIRTYPE, 0, 0o755))
    emit(_tar_header(f"{name}/data.bin", tarfile.REGTYPE, size, 0o644))
    remaining = size
    while remaining > 0:  # bounded: remaining strictly decreases
        n = min(_CHUNK, remaining)
        emit(rng.randbytes(n))
        remaining -= n
    emit(b"\0" * (-size % tarfile.BLOCKSIZE))
    emit(b"\0" * (2 * tarfile.BLOCKSIZE))  # end-of-archive marker
    return "sha256:" + diff_id.hexdigest()


def _tar_header(name: str, kind: bytes, size: int, mode: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = size
    info.mode = mode
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def _commit_blob(tmp: Path, blobs_dir: Path, digest: str) -> Path:
    final = blobs_dir / digest.removeprefix("sha256:")
    os.replace(tmp, final)  # identical content if it already existed
    return final


def _json_bytes(doc: Any) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def _write_json_blob(blobs_dir: Path, doc: Any, media_type: str) -> Blob:
    data = _json_bytes(doc)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    path = blobs_dir / digest.removeprefix("sha256:")
    path.write_bytes(data)
    return Blob(digest, len(data), media_type, path)


def _set_tag(layout: Path, tag: str, top: Blob) -> None:
    index_path = layout / "index.json"
    if index_path.exists():
        doc = json.loads(index_path.read_text())
    else:
        doc = {"schemaVersion": 2, "manifests": []}
    doc["manifests"] = [
        m for m in doc.get("manifests", []) if m.get("annotations", {}).get(_REF_NAME) != tag
    ]
    doc["manifests"].append({**top.descriptor(), "annotations": {_REF_NAME: tag}})
    index_path.write_bytes(_json_bytes(doc))


def _registry_manifest_digest(registry: str, repo: str, tag: str) -> str:
    """The digest the registry serves for ``repo:tag`` (HEAD, Docker-Content-Digest)."""
    url = f"http://{registry}/v2/{repo}/manifests/{tag}"
    with httpx.Client(trust_env=False, timeout=10.0) as client:
        response = client.head(url, headers={"Accept": f"{OCI_MANIFEST}, {OCI_INDEX}"})
    if response.status_code != 200:
        raise RuntimeError(f"HEAD {url} -> {response.status_code} after push")
    digest: str = response.headers.get("docker-content-digest", "")
    if not digest:
        raise RuntimeError(f"HEAD {url} returned no Docker-Content-Digest")
    return digest
