"""Manifests: immutable by digest (cached in the store), tags resolved at the origin by HEAD.

A tag is resolved with a HEAD (Docker Hub does not count HEADs against its pull limit) and the
answer is kept for ``tag_ttl`` seconds; when the origin cannot be reached the last known answer is
served, however old, because a stale tag beats a failed rollout. The manifest itself is then
fetched by digest, verified against that digest, and kept in the content store.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import trio

from agent.blob_downloads import BlobDownloads
from agent.content_store import ContentStore
from agent.origin_client import OriginClient, OriginRequest
from p2preg.config import AgentConfig
from p2preg.digest import Digest
from p2preg.errors import RegistryError, UpstreamUnavailable
from p2preg.mediatypes import MAX_MANIFEST_BYTES, manifest_media_type, normalize_accept
from p2preg.units import parse_decimal

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Manifest:
    digest: Digest
    media_type: str
    data: bytes


@dataclass(frozen=True, slots=True)
class ManifestHead:
    digest: Digest
    media_type: str
    size: int


@dataclass(frozen=True, slots=True)
class _TagEntry:
    head: ManifestHead
    resolved_at: float


class ManifestService:
    def __init__(self, config: AgentConfig, store: ContentStore, origin: OriginClient) -> None:
        self._config = config
        self._store = store
        self._origin = origin
        # (origin URL, repository, tag, normalized Accept) -> last answer. Bounded below.
        self._tags: dict[tuple[str, str, str, str], _TagEntry] = {}
        self._in_flight: dict[Digest, trio.Event] = {}
        # Set by the agent when manifests may come from peers (BlobDownloads with a swarm).
        self.downloads: BlobDownloads | None = None

    # -- tags ----------------------------------------------------------------------------------

    async def resolve(
        self, request: OriginRequest, reference: str, accept: str | None
    ) -> ManifestHead:
        """Digest, media type and size of a manifest named by tag or digest."""
        if Digest.is_digest(reference):
            manifest = await self.get_by_digest(request, Digest.parse(reference), accept)
            return ManifestHead(manifest.digest, manifest.media_type, len(manifest.data))
        key = (request.upstream.url, request.repository, reference, normalize_accept(accept))
        entry = self._tags.get(key)
        now = trio.current_time()
        if entry is not None and now - entry.resolved_at < self._config.tag_ttl:
            return entry.head
        try:
            head = await self._resolve_at_origin(request, reference, key[3])
        except UpstreamUnavailable as exc:
            if entry is not None:
                log.warning(
                    "origin unreachable (%s); serving last known %s:%s -> %s",
                    exc,
                    request.repository,
                    reference,
                    entry.head.digest,
                )
                return entry.head
            raise RegistryError("UNAVAILABLE", f"origin unreachable: {exc}") from exc
        if len(self._tags) >= 10_000:
            self._tags.pop(next(iter(self._tags)))
        self._tags[key] = _TagEntry(head, now)
        return head

    async def _resolve_at_origin(
        self, request: OriginRequest, tag: str, accept: str
    ) -> ManifestHead:
        response = await self._origin.head_manifest(request, tag, accept)
        digest_header = response.headers.get("docker-content-digest")
        size = parse_decimal(response.headers.get("content-length"))
        if digest_header and size is not None:
            digest = Digest.parse(digest_header)
            media_type = manifest_media_type(response.headers.get("content-type"), None)
            return ManifestHead(digest, media_type, size)
        # The origin's HEAD did not say the digest: fetch the manifest and compute it.
        data, response = await self._origin.get_manifest(request, tag, accept, MAX_MANIFEST_BYTES)
        digest = Digest.of_bytes(data)
        media_type = manifest_media_type(response.headers.get("content-type"), data)
        self._store.put_manifest(digest, data, media_type)
        return ManifestHead(digest, media_type, len(data))

    # -- by digest -----------------------------------------------------------------------------

    async def get(self, request: OriginRequest, reference: str, accept: str | None) -> Manifest:
        if Digest.is_digest(reference):
            return await self.get_by_digest(request, Digest.parse(reference), accept)
        head = await self.resolve(request, reference, accept)
        return await self.get_by_digest(request, head.digest, accept)

    async def get_by_digest(
        self, request: OriginRequest, digest: Digest, accept: str | None
    ) -> Manifest:
        while True:
            stored = self._store.read_manifest(digest, MAX_MANIFEST_BYTES)
            if stored is not None:
                return Manifest(digest, stored[1], stored[0])
            waiting = self._in_flight.get(digest)
            if waiting is None:
                break
            await waiting.wait()  # someone else is fetching it: share their result
        done = self._in_flight[digest] = trio.Event()
        try:
            if self.downloads is not None and self.downloads.coordinator is not None:
                return await self._get_through_swarm(request, digest, accept)
            data, response = await self._origin.get_manifest(
                request, str(digest), normalize_accept(accept), MAX_MANIFEST_BYTES
            )
            actual = Digest.of_bytes(data, digest.algorithm)
            if actual != digest:
                log.error("origin sent manifest %s for %s; not cached", actual, digest)
                raise RegistryError(
                    "UNAVAILABLE",
                    f"origin sent a manifest whose digest is {actual}, not {digest}",
                    status=502,
                )
            media_type = manifest_media_type(response.headers.get("content-type"), data)
            try:
                self._store.put_manifest(digest, data, media_type)
            except OSError as exc:
                log.warning("could not cache manifest %s: %s", digest, exc)
            return Manifest(digest, media_type, data)
        except UpstreamUnavailable as exc:
            raise RegistryError("UNAVAILABLE", f"origin unreachable: {exc}") from exc
        finally:
            del self._in_flight[digest]
            done.set()

    async def _get_through_swarm(
        self, request: OriginRequest, digest: Digest, accept: str | None
    ) -> Manifest:
        """A manifest by digest is content like any blob: fetch it from peers when they have it,
        so a rollout costs the origin one manifest GET, not one per node."""
        assert self.downloads is not None
        download = self.downloads.start(digest, request, manifest_accept=normalize_accept(accept))
        fd = os.open(download.partial.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            with trio.fail_after(self._config.request_timeout):
                await download.wait_headers()
                await download.wait_verdict()
            if download.error is not None:
                error = download.error
                if isinstance(error, RegistryError | UpstreamUnavailable):
                    raise error
                raise RegistryError("UNAVAILABLE", f"manifest download failed: {error}")
            size = download.size or 0
            data = os.pread(fd, size, 0) if size else b""
        except trio.TooSlowError:
            raise RegistryError("UNAVAILABLE", "the manifest did not arrive in time") from None
        finally:
            os.close(fd)
        media_type = manifest_media_type(download.content_type, data)
        try:
            await download.wait_committed()
            self._store.set_media_type(digest, media_type)
        except OSError as exc:
            log.warning("could not record the media type of %s: %s", digest, exc)
        return Manifest(digest, media_type, data)
