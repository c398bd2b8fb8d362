"""Decides where a blob comes from: peers first, the origin as the last resort.

For each blob download, with a tracker configured:

1. Ask the tracker for the blob's metainfo and for the origin-fetch lease.
2. Lease granted (the first node to ask): fetch from the origin, publishing the size at once and
   piece hashes as they arrive (every ``PUBLISH_INTERVAL``), renewing the lease meanwhile. Pieces
   are served to peers as soon as they are on disk and hashed.
3. Lease held by another node: wait for the metainfo (the size comes within milliseconds), then
   download pieces from peers (agent/swarm.py), announcing progress to get more peers. If nothing
   arrives for ``swarm_stall_timeout`` and the lease can be had (its holder died or stalled, so it
   expired), fetch the rest from the origin from the first missing byte.
4. Tracker unreachable: the origin, as a plain pull-through cache would.

With discovery on (``--discovery mdns``) and no tracker known or answering, the peers found on
the LAN stand in for the tracker (agent/peer_directory.py): ask them who holds the blob, take the
metainfo from a holder and download from the holders; if nobody holds it, or the swarm stalls,
the origin (without a lease: nobody hands one out). Without discovery nothing here changes.

A blob whose sha256 fails after it was assembled from published hashes is reported; the tracker
drops that metainfo and the publisher's leases, so the next attempt starts clean.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable

import trio

from agent.blob_downloads import BlobDownloads, Download
from agent.origin_client import OriginRequest
from agent.peer_directory import PeerDirectory
from agent.peer_link import PeerIdentity
from agent.peer_server import PeerServer, PieceSource
from agent.swarm import Swarm
from p2preg.announce_pacing import ANNOUNCE_INTERVAL
from p2preg.config import AgentConfig
from p2preg.digest import Digest
from p2preg.errors import RegistryError, TrackerUnavailable
from p2preg.metainfo import MetaInfo
from p2preg.peer_rotation import rotations_at_answer
from tracker.client import AnnounceResult, TrackerClient

log = logging.getLogger(__name__)

PUBLISH_INTERVAL = 0.2
METAINFO_POLL = 0.1
# Stored blobs are looked at this often for a re-announce due (SwarmCoordinator.seed_forever).
SEED_ROUND = 10.0


class SwarmCoordinator:
    def __init__(
        self,
        config: AgentConfig,
        tracker: TrackerClient,
        identity: PeerIdentity,
        advertise_addr: str,
        peer_server: PeerServer,
        *,
        directory: PeerDirectory | None = None,
    ) -> None:
        self._config = config
        self._tracker = tracker
        # Peers found by discovery: asked instead of the tracker when there is none (or it is down).
        self._directory = directory
        self._identity = identity
        self._addr = advertise_addr
        self._peer_server = peer_server
        self.banned: set[bytes] = set()
        self._publishers: dict[Digest, bytes] = {}
        # Blobs this agent is fetching from the origin for the swarm right now.
        self._origin_fetches: set[Digest] = set()

    # -- what peers may fetch from us while we download ---------------------------------------

    def active_source(self, downloads: BlobDownloads, digest: Digest) -> PieceSource | None:
        download = downloads.active(digest)
        if download is None or download.assembly is None:
            return None
        assembly = download.assembly
        partial = download.partial

        def open_fd() -> int | None:
            return None if partial.closed else os.dup(partial.fd)

        fetching_from_origin = download.digest in self._origin_fetches
        return PieceSource(assembly.metainfo, assembly.pieces, fetching_from_origin, open_fd)

    # -- fetching ------------------------------------------------------------------------------

    async def fetch(
        self, download: Download, request: OriginRequest, downloads: BlobDownloads
    ) -> None:
        digest = download.digest
        if self._directory is not None and not self._tracker.urls:
            await self._fetch_without_tracker(download, request, downloads)
            return
        try:
            # The metainfo, the lease and a first announce in one call. A blob the swarm holds
            # in full comes with no lease: it comes from the seeders (a lease would hand every
            # latecomer an expired one and cost the origin a copy each; a swarm that stalls
            # still takes the lease through the stall path).
            started = await self._tracker.start_pull(
                digest, addr=self._addr, zone=self._config.zone
            )
        except TrackerUnavailable as exc:
            if self._directory is not None:
                log.warning("tracker unavailable (%s); asking discovered peers for %s", exc, digest)
                await self._fetch_without_tracker(download, request, downloads)
                return
            log.warning("tracker unavailable (%s); fetching %s from the origin", exc, digest)
            await downloads.fetch_from_origin(download, request)
            return
        metainfo, lease = started.metainfo, started.lease
        self._peer_server.note_swarm_size(self._others(started.announce), digest)
        if lease is not None and lease.granted:
            # We publish this blob's metainfo: if our own copy fails its digest, report_bad
            # names us, so the tracker drops the hashes we published from bad origin bytes.
            self._publishers[digest] = self._identity.peer_id
            await self._fetch_as_origin_fetcher(download, request, downloads, lease.expires_in)
            return
        if lease is not None:
            self._publishers[digest] = lease.holder
        await self._fetch_from_swarm(
            download, request, downloads, metainfo, first_answer=started.announce
        )

    async def _fetch_without_tracker(
        self, download: Download, request: OriginRequest, downloads: BlobDownloads
    ) -> None:
        """Ask the peers found by discovery who holds the blob; fetch from them, else the origin."""
        assert self._directory is not None
        digest = download.digest
        holders = await self._directory.find_holders(digest, self.banned)
        if not holders.addresses or holders.metainfo is None:
            log.info(
                "none of %d discovered peers holds %s; fetching from the origin",
                holders.asked,
                digest,
            )
            await downloads.fetch_from_origin(download, request)
            return
        log.info("fetching %s from %d discovered peer(s)", digest, len(holders.addresses))
        await self._fetch_from_swarm(
            download, request, downloads, holders.metainfo, holders=holders.addresses
        )

    async def _fetch_as_origin_fetcher(
        self,
        download: Download,
        request: OriginRequest,
        downloads: BlobDownloads,
        lease_seconds: float = 10.0,
    ) -> None:
        log.info("fetching %s from the origin for the swarm", download.digest)
        self._origin_fetches.add(download.digest)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._publish_while_fetching, download, lease_seconds)
                try:
                    await downloads.fetch_from_origin(download, request)
                finally:
                    nursery.cancel_scope.cancel()
        except BaseException:
            self._origin_fetches.discard(download.digest)
            # Let the next node try at once instead of waiting for the lease to expire.
            with (
                trio.CancelScope(shield=True),
                trio.move_on_after(2),
                contextlib.suppress(TrackerUnavailable),
            ):
                await self._tracker.release_lease(download.digest)
            raise
        else:
            # Bytes all here: while verifying and committing, serve pieces to anyone.
            self._origin_fetches.discard(download.digest)

    async def _publish_while_fetching(
        self, download: Download, lease_seconds: float = 10.0
    ) -> None:
        """Publish the size, then new piece hashes, renew the lease, announce progress."""
        await download.headers_known.wait()
        published_once = False
        last_renew = trio.current_time()
        last_announce = -ANNOUNCE_INTERVAL
        pace = ANNOUNCE_INTERVAL
        while True:
            assembly = download.assembly
            if assembly is not None:
                fresh = assembly.take_unpublished()
                now = trio.current_time()
                try:
                    if fresh or not published_once:
                        await self._tracker.put_metainfo(assembly.metainfo)
                        published_once = True
                    if now - last_announce >= pace:
                        last_announce = now
                        pieces = len(assembly.pieces)
                        result = await self._announce(download.digest, assembly.metainfo, pieces)
                        pace = result.downloading_interval
                    # Renew at a third of the lease, so one lost renewal never lets it lapse.
                    if now - last_renew >= max(0.2, lease_seconds / 3):
                        last_renew = now
                        await self._tracker.acquire_lease(download.digest)
                except TrackerUnavailable as exc:
                    log.info("tracker unavailable while publishing %s: %s", download.digest, exc)
            await trio.sleep(PUBLISH_INTERVAL)

    async def _fetch_from_swarm(
        self,
        download: Download,
        request: OriginRequest,
        downloads: BlobDownloads,
        metainfo: MetaInfo | None,
        *,
        holders: list[str] | None = None,
        first_answer: AnnounceResult | None = None,
    ) -> None:
        """Download from peers. ``holders``: peers found without a tracker; then nothing is
        announced and a stalled swarm falls back to the origin without asking for a lease.
        ``first_answer``: the tracker's answer to the announce the pull started with."""
        digest = download.digest
        if holders is None:
            metainfo = await self._wait_for_metainfo(digest, metainfo)
        if metainfo is None:
            # Nobody published a size in time (the lease holder died before its first byte):
            # take the lease if it is free now, else fetch from the origin regardless.
            log.warning("no metainfo for %s from the swarm; using the origin", digest)
            await downloads.fetch_from_origin(download, request)
            return
        assembly = downloads.prepare(
            download, MetaInfo.empty(digest, metainfo.size, metainfo.piece_length)
        )
        swarm = Swarm(
            digest,
            assembly,
            self._identity,
            self.banned,
            piece_timeout=self._config.piece_timeout,
        )
        swarm.learn_metainfo(metainfo)
        if holders:
            swarm.note_swarm_size(len(holders))
            swarm.add_addresses(holders)
        download.piece_listeners.append(swarm.local_piece)
        self._peer_server.watch_holdings(digest, swarm.pieces_of)
        try:
            await self._run_swarm(
                download, request, downloads, swarm, metainfo, holders, first_answer
            )
        finally:
            self._peer_server.unwatch_holdings(digest, swarm.pieces_of)
        download.bytes_from_peers = swarm.bytes_from_peers
        incoming = self._identity.incoming
        log.info(
            "swarm for %s done: %s; busy messages sent by this agent so far: %d",
            digest,
            ", ".join(f"{key} {value}" for key, value in sorted(swarm.stats.items())),
            incoming.messages_sent if incoming is not None else 0,
        )

    async def _run_swarm(
        self,
        download: Download,
        request: OriginRequest,
        downloads: BlobDownloads,
        swarm: Swarm,
        metainfo: MetaInfo,
        holders: list[str] | None,
        first_answer: AnnounceResult | None = None,
    ) -> None:
        """Run ``swarm`` until the blob is whole: announce (``first_answer``: the start's,
        taken as the first), learn hashes, and fall back to the origin when the swarm
        stalls."""
        digest = download.digest
        assembly = swarm.assembly
        origin_started = False
        async with trio.open_nursery() as nursery:
            nursery.start_soon(swarm.run)
            last_progress_at, last_available = trio.current_time(), -1
            next_announce = 0.0
            while len(assembly.pieces) < metainfo.num_pieces:
                now = trio.current_time()
                if now >= next_announce and holders is None:
                    # Without peers yet (the fetcher may not have announced when we first
                    # asked), ask again soon; after that, at the tracker's pace (once a second
                    # unless it tracks more peers than it answers that often).
                    has_peers = bool(swarm.peers)
                    next_announce = now + (ANNOUNCE_INTERVAL if has_peers else METAINFO_POLL * 2)
                    pace = await self._refresh(download, swarm, first_answer)
                    first_answer = None
                    if pace is not None and has_peers:
                        next_announce = now + pace
                progress = len(assembly.pieces) * metainfo.piece_length + assembly.available
                if progress != last_available:
                    last_available, last_progress_at = progress, now
                elif (
                    not origin_started
                    and now - last_progress_at > self._config.swarm_stall_timeout
                    # Requests out to a busy seeder that are not overdue are not a stall.
                    and not swarm.waiting_on_peers()
                ):
                    if holders is None:
                        origin_started = await self._take_over_origin(
                            nursery, download, request, downloads
                        )
                    else:
                        self._fetch_rest_from_origin(nursery, download, request, downloads)
                        origin_started = True
                    last_progress_at = now
                elif origin_started and now - last_progress_at > self._config.request_timeout:
                    # Neither the peers nor the origin delivered anything for a whole request
                    # timeout: fail the download (clients get an error, not an endless wait).
                    raise RegistryError(
                        "UNAVAILABLE", f"no peer and not the origin could deliver {digest}"
                    )
                with trio.move_on_after(0.1):
                    await download.wait_beyond(assembly.available)
            nursery.cancel_scope.cancel()

    async def _take_over_origin(
        self,
        nursery: trio.Nursery,
        download: Download,
        request: OriginRequest,
        downloads: BlobDownloads,
    ) -> bool:
        """The swarm stalled: fetch the rest from the origin if the lease can be had."""
        try:
            lease = await self._tracker.acquire_lease(download.digest)
        except TrackerUnavailable:
            lease = None
        if lease is not None and not lease.granted:
            log.info("swarm for %s stalled; lease held by %s", download.digest, lease.holder.hex())
            return False
        self._fetch_rest_from_origin(nursery, download, request, downloads)
        nursery.start_soon(self._publish_while_fetching, download)
        return True

    def _fetch_rest_from_origin(
        self,
        nursery: trio.Nursery,
        download: Download,
        request: OriginRequest,
        downloads: BlobDownloads,
    ) -> None:
        assert download.assembly is not None
        start = download.assembly.available
        log.warning(
            "swarm for %s stalled; fetching from byte %d from the origin", download.digest, start
        )

        async def fetch() -> None:
            try:
                await downloads.fetch_from_origin(download, request, start)
            except RegistryError as exc:
                log.warning("origin fallback for %s failed: %s", download.digest, exc)

        nursery.start_soon(fetch)

    async def _refresh(
        self, download: Download, swarm: Swarm, answered: AnnounceResult | None = None
    ) -> float | None:
        """Announce progress (getting peers back, rotating one in where the swarm's size
        calls for it; ``answered``: an announce made already, the start's) and learn newly
        published piece hashes. Seconds until the next announce, at the tracker's pace (None:
        no tracker answered)."""
        assembly = download.assembly
        assert assembly is not None
        try:
            result = answered or await self._announce(
                download.digest, assembly.metainfo, len(assembly.pieces)
            )
            swarm.note_swarm_size(self._others(result))
            handout = [
                p.addr
                for p in result.peers
                if p.peer_id != self._identity.peer_id and p.peer_id not in self.banned
            ]
            swarm.add_addresses(handout)
            # At the answer only, not from an older one between paced answers: the peers it
            # lists first are the least handed out now, and the nodes that rotated to an
            # answer 10 s old piled onto peers many others had been sent to since (simulated:
            # p99 1.39x against 1.33x; docs/simulator.md, finding 14).
            await swarm.rotate(handout, rotations_at_answer(result.downloading_interval))
            # (Only when hashes hold us up: peers send theirs when asked, and a tracker call
            # costs the agent 1.2-1.4 ms of CPU, measured.)
            if not assembly.metainfo.complete and (not swarm.peers or swarm.lacks_hashes()):
                published = await self._tracker.get_metainfo(download.digest)
                if published is not None:
                    swarm.learn_metainfo(published)
        except TrackerUnavailable as exc:
            log.info("tracker unavailable while downloading %s: %s", download.digest, exc)
            return None
        return result.downloading_interval

    async def _wait_for_metainfo(
        self, digest: Digest, metainfo: MetaInfo | None
    ) -> MetaInfo | None:
        with trio.move_on_after(self._config.request_timeout):
            while metainfo is None:
                await trio.sleep(METAINFO_POLL)
                try:
                    metainfo = await self._tracker.get_metainfo(digest)
                    if metainfo is None:
                        lease = await self._tracker.acquire_lease(digest)
                        if lease.granted:
                            return None  # the holder died before publishing: ours now
                except TrackerUnavailable:
                    return None
        return metainfo

    async def _announce(self, digest: Digest, metainfo: MetaInfo, pieces: int) -> AnnounceResult:
        result = await self._tracker.announce(
            digest,
            addr=self._addr,
            zone=self._config.zone,
            complete=pieces == metainfo.num_pieces,
            pieces=pieces,
        )
        self._peer_server.note_swarm_size(self._others(result), digest)
        return result

    def _others(self, result: AnnounceResult) -> int:
        """How many other peers the blob's swarm has, by the tracker's count (an older tracker
        that does not count: the peers it listed)."""
        if result.swarm is not None:
            return max(0, result.swarm - 1)  # (the count includes us: we just announced)
        return sum(1 for p in result.peers if p.peer_id != self._identity.peer_id)

    # -- after a download and at startup -------------------------------------------------------

    async def completed(self, download: Download) -> None:
        """Publish the full metainfo and announce as a seeder."""
        assembly = download.assembly
        if assembly is None or not self._tracker.urls:
            return
        try:
            # Always: the origin fetcher's last hashes are computed after its fetch loop ended,
            # and a verified blob's full metainfo can only fill gaps (merges never conflict).
            await self._tracker.put_metainfo(assembly.metainfo)
            await self._announce(download.digest, assembly.metainfo, assembly.metainfo.num_pieces)
        except TrackerUnavailable as exc:
            log.info("could not announce %s: %s", download.digest, exc)

    async def report_bad(self, digest: Digest) -> None:
        publisher = self._publishers.get(digest)
        if publisher is None:
            return
        try:
            await self._tracker.report_bad(digest, publisher)
        except TrackerUnavailable as exc:
            log.info("could not report %s: %s", digest, exc)

    async def seed_forever(
        self,
        store_digests: Callable[[], list[Digest]],
        metainfo_of: Callable[[Digest], MetaInfo | None],
        round_seconds: float = SEED_ROUND,
    ) -> None:
        """Re-announce every stored blob (after a restart too) so peers find the seeders, each
        when the tracker's last answer for it said (``interval``: it paces seeders by how
        many records it holds, p2preg/announce_pacing.py), a blob not announced yet at once."""
        due: dict[Digest, float] = {}
        while True:
            now = trio.current_time()
            stored = store_digests()
            for digest in stored:
                if due.get(digest, now) > now:
                    continue
                metainfo = metainfo_of(digest)
                if metainfo is None:
                    continue
                try:
                    result = await self._announce(digest, metainfo, metainfo.num_pieces)
                except TrackerUnavailable:
                    break  # (the others are tried again at the next round)
                due[digest] = trio.current_time() + max(round_seconds, result.interval)
            for gone in due.keys() - set(stored):
                del due[gone]  # deleted from the store (garbage-collected)
            await trio.sleep(round_seconds)
