"""The agent process: wires the store, the origin client, downloads, the registry endpoint and,
with a peer address, the peer server, the tracker client and the swarm coordinator; with
``--discovery mdns`` also mDNS discovery, which feeds the tracker client discovered trackers and
the peer directory discovered peers (docs/discovery.md)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import trio

from agent.blob_downloads import BlobDownloads, Download
from agent.content_store import ContentStore
from agent.discovery import Discovery
from agent.docker_config import load_docker_config
from agent.incoming_pieces import IncomingPieces
from agent.manifest_service import ManifestService
from agent.origin_client import OriginClient
from agent.peer_directory import PeerDirectory
from agent.peer_link import PeerIdentity, load_peer_id
from agent.peer_server import PeerServer
from agent.registry_api import RegistryEndpoint
from agent.swarm_coordinator import SwarmCoordinator
from p2preg.cluster_auth import parse_cluster_secret
from p2preg.config import AgentConfig, TrackerConfig
from p2preg.errors import ConfigError
from p2preg.http_server import bound_port, serve_http
from p2preg.token_bucket import RateLimiter
from tracker.client import TrackerClient
from tracker.server import run_tracker

log = logging.getLogger(__name__)


@dataclass(slots=True)
class RunningAgent:
    """What a caller (the CLI, a test) can see of a started agent."""

    config: AgentConfig
    registry_port: int
    store: ContentStore
    downloads: BlobDownloads
    origin: OriginClient
    peer_id: bytes = b""
    peer_port: int = 0
    peer_server: PeerServer | None = None
    coordinator: SwarmCoordinator | None = None
    embedded_tracker_url: str = ""

    @property
    def registry_url(self) -> str:
        return f"http://{self.config.registry_host}:{self.registry_port}"


def read_cluster_secret(path: str | None) -> bytes:
    if path is None:
        raise ConfigError("peer-to-peer needs --cluster-secret-file")
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cluster-secret-file {path}: {exc.strerror}") from None
    return parse_cluster_secret(data, f"cluster-secret-file {path}")


async def run_agent(
    config: AgentConfig,
    *,
    task_status: trio.TaskStatus[RunningAgent] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the agent until cancelled. Reports a RunningAgent once every listener is up."""
    credentials = {}
    if config.docker_config:
        credentials.update(load_docker_config(config.docker_config))
    credentials.update(config.credentials)
    secret = read_cluster_secret(config.cluster_secret_file) if config.p2p_enabled else b""
    store = await trio.to_thread.run_sync(
        ContentStore.open, Path(config.data_dir), config.cache_size
    )
    log.info(
        "store %s: %d blobs, %d of %d bytes used",
        config.data_dir,
        len(store.digests()),
        store.used_bytes,
        config.cache_size,
    )
    origin = OriginClient(config, credentials)
    tracker: TrackerClient | None = None
    peer_server: PeerServer | None = None
    try:
        async with trio.open_nursery() as nursery:
            coordinator: SwarmCoordinator | None = None
            peer_id, peer_port, embedded_url = b"", 0, ""
            if config.p2p_enabled:
                assert config.peer_host is not None
                peer_id = load_peer_id(config.data_dir)
                upload = RateLimiter(config.upload_limit)
                download = RateLimiter(config.download_limit)
                peer_server = PeerServer(peer_id, secret, store, upload, download)
                listeners = await nursery.start(
                    peer_server.serve, config.peer_host, config.peer_port
                )
                peer_port = bound_port(listeners)
                advertise = config.peer_advertise_addr or f"{config.peer_host}:{peer_port}"
                log.info(
                    "peer server on %s:%d (advertised as %s)",
                    config.peer_host,
                    peer_port,
                    advertise,
                )
                tracker_urls = list(config.trackers)
                if config.embedded_tracker:
                    embedded = await nursery.start(
                        run_tracker,
                        TrackerConfig(
                            cluster_secret=secret,
                            host=config.peer_host,
                            port=config.embedded_tracker_port,
                        ),
                    )
                    log.info("embedded tracker on %s", embedded.url)
                    embedded_url = embedded.url
                    tracker_urls.append(embedded.url)
                mdns = config.discovery == "mdns"
                if tracker_urls or mdns:
                    incoming = IncomingPieces()
                    nursery.start_soon(incoming.run)
                    identity = PeerIdentity(peer_id, secret, upload, download, incoming)
                    tracker = TrackerClient(tracker_urls, peer_id, secret, discovery=mdns)
                    nursery.start_soon(tracker.keep_sessions)
                    directory = None
                    if mdns:
                        directory = PeerDirectory(identity, f"{config.peer_host}:{peer_port}")
                    coordinator = SwarmCoordinator(
                        config, tracker, identity, advertise, peer_server, directory=directory
                    )
                if mdns:
                    assert tracker is not None and directory is not None
                    discovery = Discovery(
                        config.peer_host,
                        config.cluster_name,
                        instance=peer_id.hex(),
                        on_trackers=tracker.set_discovered,
                        on_peers=directory.set_peers,
                    )
                    await nursery.start(discovery.run)
                    discovery.register_peer(peer_port)
                    if embedded_url:
                        discovery.register_tracker(embedded_url)

            async def committed(completed: Download) -> None:
                if coordinator is not None:
                    await coordinator.completed(completed)

            downloads = BlobDownloads(
                store,
                origin,
                config,
                nursery,
                on_committed=committed,
                on_piece=peer_server.piece_available if peer_server is not None else None,
            )
            if coordinator is not None and peer_server is not None:
                downloads.coordinator = coordinator
                peer_server.set_active_sources(
                    lambda digest: coordinator.active_source(downloads, digest)
                )
                nursery.start_soon(coordinator.seed_forever, store.digests, store.read_metainfo)
            manifests = ManifestService(config, store, origin)
            if coordinator is not None:
                manifests.downloads = downloads
            endpoint = RegistryEndpoint(config, store, origin, downloads, manifests)
            listeners = await nursery.start(
                serve_http, config.registry_host, config.registry_port, endpoint.handle
            )
            port = bound_port(listeners)
            log.info("registry endpoint listening on http://%s:%d", config.registry_host, port)
            task_status.started(
                RunningAgent(
                    config,
                    port,
                    store,
                    downloads,
                    origin,
                    peer_id,
                    peer_port,
                    peer_server,
                    coordinator,
                    embedded_url,
                )
            )
    finally:
        if peer_server is not None:
            log.info(
                "peer server: served %d pieces (%d bytes), refused %d (super-seeding), "
                "%d HAVEs not sent (the peer held the piece)",
                peer_server.pieces_served,
                peer_server.bytes_served,
                peer_server.refusals,
                peer_server.haves_skipped,
            )
        with trio.CancelScope(shield=True):
            await origin.aclose()
            if tracker is not None:
                await tracker.aclose()
