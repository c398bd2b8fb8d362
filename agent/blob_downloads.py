"""Single-flight blob downloads that stream to every waiting client while they land on disk.

One ``Download`` per digest runs in the agent's service nursery, not in a client's request, so a
client that disconnects never cancels what others wait on. Bytes travel:

    origin socket -> event loop -> SequentialWriter thread (pwrite) -> partial file
                                                                          |  mmap
                                             PrefixHasher thread: sha256 + xxh3 per piece
    every waiting client: os.sendfile(partial file, [sent, available)) <--+

The event loop only receives; the writer and hasher threads run beside it (agent/disk_pipeline.py).
When the origin drops the connection, the download resumes with ``Range: bytes=N-``.
The blob's sha256 gates the commit: on a mismatch every waiting client's response is aborted (so
it retries) and nothing is cached.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

import httpx
import trio

from agent.assembly import BlobAssembly
from agent.content_store import ContentStore, PartialBlob
from agent.origin_client import OriginClient, OriginRequest, body_of
from p2preg.config import AgentConfig
from p2preg.digest import Digest
from p2preg.errors import DigestMismatch, P2PRegError, RegistryError, UpstreamUnavailable
from p2preg.mediatypes import MAX_MANIFEST_BYTES
from p2preg.metainfo import MetaInfo, piece_length_for
from p2preg.units import parse_decimal

log = logging.getLogger(__name__)

MAX_RESUMES = 5


class DownloadFailed(P2PRegError):
    """The download ended without a verified blob; waiting responses must be aborted."""


class Coordinator(Protocol):
    async def fetch(
        self, download: Download, request: OriginRequest, downloads: BlobDownloads
    ) -> None: ...

    async def report_bad(self, digest: Digest) -> None: ...


class Download:
    """One blob being fetched. Its state has one writer: the task running ``_run``."""

    def __init__(
        self, digest: Digest, partial: PartialBlob, manifest_accept: str | None = None
    ) -> None:
        self.digest = digest
        self.partial = partial
        # Set for a manifest fetched by digest (the origin serves those from another endpoint).
        self.manifest_accept = manifest_accept
        self.content_type: str | None = None  # the origin's, when it came from the origin
        self.size: int | None = None  # from the origin's Content-Length, once known
        self.assembly: BlobAssembly | None = None
        self.done = False
        self.verified = False  # the whole blob matched its digest
        self.error: BaseException | None = None
        self.origin_requests = 0
        self.bytes_from_origin = 0
        self.bytes_from_peers = 0
        self.reserved = 0
        self.piece_listeners: list[Callable[[int], None]] = []
        self.headers_known = trio.Event()
        self._progress = trio.Event()

    @property
    def available(self) -> int:
        """Bytes from the start of the blob that are on disk (readable by clients)."""
        return self.assembly.available if self.assembly is not None else 0

    def notify(self) -> None:
        self._progress.set()
        self._progress = trio.Event()

    async def wait_beyond(self, offset: int) -> None:
        """Return once more than ``offset`` bytes are available, or the download ended."""
        while self.available <= offset and not self.done:
            await self._progress.wait()

    async def wait_verdict(self) -> None:
        """Return once the digest check passed or the download failed."""
        while not self.verified and not self.done:
            await self._progress.wait()

    async def wait_committed(self) -> None:
        """Return once the download ended (committed to the store, or failed)."""
        while not self.done:
            await self._progress.wait()

    async def wait_headers(self) -> None:
        await self.headers_known.wait()
        if self.error is not None and self.size is None:
            raise self.error


class BlobDownloads:
    """Owns every blob download of the agent; callers join an existing one by digest."""

    def __init__(
        self,
        store: ContentStore,
        origin: OriginClient,
        config: AgentConfig,
        nursery: trio.Nursery,
        on_committed: Callable[[Download], Awaitable[None]] | None = None,
        on_piece: Callable[[Digest, int], None] | None = None,
    ) -> None:
        self._store = store
        self._origin = origin
        self._config = config
        self._nursery = nursery
        self._active: dict[Digest, Download] = {}
        self._on_committed = on_committed
        self._on_piece = on_piece
        # Fetches a blob some other way than straight from the origin (the swarm); None: origin.
        self.coordinator: Coordinator | None = None
        self.origin_requests = 0

    def active(self, digest: Digest) -> Download | None:
        return self._active.get(digest)

    def start(
        self, digest: Digest, request: OriginRequest, manifest_accept: str | None = None
    ) -> Download:
        """Join the download of ``digest`` or start one. Never blocks."""
        download = self._active.get(digest)
        if download is None:
            download = Download(digest, self._store.new_partial(digest), manifest_accept)
            self._active[digest] = download
            self._nursery.start_soon(self._run, download, request)
        return download

    async def _run(self, download: Download, request: OriginRequest) -> None:
        try:
            if self.coordinator is not None:
                await self.coordinator.fetch(download, request, self)
            else:
                await self.fetch_from_origin(download, request)
            assembly = download.assembly
            assert assembly is not None
            if not await assembly.verify():
                raise DigestMismatch(str(download.digest), assembly.actual_digest())
            download.verified = True
            download.notify()  # waiting clients may finish now; durability is our business
            partial = download.partial
            await trio.to_thread.run_sync(partial.sync)
            # The reservation becomes the entry: release it first so it is not counted twice.
            self._store.release(download.reserved)
            download.reserved = 0
            partial.written = download.size or 0
            self._store.commit(partial)
            self._store.put_metainfo(assembly.metainfo)
            log.info(
                "cached %s (%d bytes; %d from the origin)",
                download.digest,
                download.size,
                download.bytes_from_origin,
            )
            if self._on_committed is not None:
                await self._on_committed(download)
        except BaseException as raised:
            exc = _single_leaf(raised)
            if not download.verified:  # after the verdict, clients already have good bytes
                download.error = exc
            if download.assembly is not None:
                await download.assembly.abort()
            self._store.discard(download.partial)
            if isinstance(exc, DigestMismatch):
                log.error("content for %s failed verification: %s", download.digest, exc)
                if self.coordinator is not None:
                    with trio.CancelScope(shield=True), trio.move_on_after(5):
                        await self.coordinator.report_bad(download.digest)
            elif isinstance(exc, Exception):
                log.warning("download of %s failed: %s", download.digest, exc)
            if not isinstance(raised, Exception):
                raise
        finally:
            self._store.release(download.reserved)
            download.done = True
            download.headers_known.set()
            download.notify()
            del self._active[download.digest]

    async def fetch_from_origin(
        self, download: Download, request: OriginRequest, start: int = 0
    ) -> None:
        """Receive the blob from the origin from byte ``start`` (a piece boundary) to its end,
        resuming after dropped connections."""
        resumes = 0
        offset = start
        while True:
            try:
                offset = await self._stream_once(download, request, offset)
                return
            except (httpx.TransportError, UpstreamUnavailable) as exc:
                resumes += 1
                if resumes > MAX_RESUMES or download.assembly is None:
                    raise
                log.info("download of %s interrupted (%s); resuming", download.digest, exc)
                offset = download.assembly.available

    async def _stream_once(self, download: Download, request: OriginRequest, offset: int) -> int:
        """One origin GET from ``offset``; returns the offset reached (the blob's end)."""
        self.origin_requests += 1
        download.origin_requests += 1
        async with self._origin.stream_blob(
            request, download.digest, offset, download.manifest_accept
        ) as response:
            download.content_type = response.headers.get("content-type")
            if download.assembly is None:
                self._prepare(download, response)
            assembly = download.assembly
            assert assembly is not None and download.size is not None
            writer = assembly.origin_writer(offset)
            try:
                body = body_of(response)
                while chunk := await body.receive():
                    download.bytes_from_origin += len(chunk)
                    if writer.offset + len(chunk) > download.size:
                        raise UpstreamUnavailable("origin sent more bytes than the blob's size")
                    await writer.put(chunk)
            except (httpx.TransportError, UpstreamUnavailable):
                # The stream broke: what arrived is good and paid for. Write it out, so the
                # resume starts after it, not after what the disk thread had caught up with
                # (a loaded machine lost 210 KB of a 7 MB prefix to an abort here).
                await writer.join()
                raise
            except BaseException:
                await writer.abort()
                raise
            await writer.join()
            if writer.offset != download.size:
                raise UpstreamUnavailable(f"origin sent {writer.offset} of {download.size} bytes")
            return writer.offset

    def _prepare(self, download: Download, response: httpx.Response) -> None:
        size = _total_size(response)
        if size is None:
            raise RegistryError(
                "UNAVAILABLE", "the origin sent the blob without a Content-Length", status=502
            )
        if download.manifest_accept is not None and size > MAX_MANIFEST_BYTES:
            raise RegistryError("MANIFEST_INVALID", f"origin sent a manifest of {size} bytes")
        piece_length = self._config.piece_length or piece_length_for(size)
        self.prepare(download, MetaInfo.empty(download.digest, size, piece_length))

    def prepare(self, download: Download, metainfo: MetaInfo) -> BlobAssembly:
        """The blob's size is known: reserve room, lay out the partial file, let clients in."""
        size = metainfo.size
        download.size = size
        if size > self._store.capacity:
            log.warning("%s is larger than the cache; it will not be kept", download.digest)
        else:
            self._store.reserve(size)
            download.reserved = size

        def on_piece(index: int) -> None:
            download.notify()
            if self._on_piece is not None:
                self._on_piece(download.digest, index)
            for listener in download.piece_listeners:
                listener(index)

        download.assembly = BlobAssembly(download.partial, metainfo, download.notify, on_piece)
        download.headers_known.set()
        return download.assembly


def _total_size(response: httpx.Response) -> int | None:
    """The blob's full size from a 200's Content-Length or a 206's Content-Range."""
    if response.status_code == 206:
        total = response.headers.get("content-range", "").rpartition("/")[2]
        return parse_decimal(total)
    return parse_decimal(response.headers.get("content-length"))


def _single_leaf(exc: BaseException) -> BaseException:
    """Nurseries wrap errors in groups; a waiting client wants the one error that happened."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc
