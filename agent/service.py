"""The agent process: wires the store, the origin client, downloads and the registry endpoint."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import trio

from agent.blob_downloads import BlobDownloads
from agent.content_store import ContentStore
from agent.docker_config import load_docker_config
from agent.manifest_service import ManifestService
from agent.origin_client import OriginClient
from agent.registry_api import RegistryEndpoint
from p2preg.config import AgentConfig
from p2preg.http_server import bound_port, serve_http

log = logging.getLogger(__name__)


@dataclass(slots=True)
class RunningAgent:
    """What a caller (the CLI, a test) can see of a started agent."""

    config: AgentConfig
    registry_port: int
    store: ContentStore
    downloads: BlobDownloads
    origin: OriginClient

    @property
    def registry_url(self) -> str:
        return f"http://{self.config.registry_host}:{self.registry_port}"


async def run_agent(
    config: AgentConfig,
    *,
    task_status: trio.TaskStatus[RunningAgent] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the agent until cancelled. Reports a RunningAgent once the endpoint listens."""
    credentials = {}
    if config.docker_config:
        credentials.update(load_docker_config(config.docker_config))
    credentials.update(config.credentials)
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
    try:
        async with trio.open_nursery() as nursery:
            downloads = BlobDownloads(store, origin, config, nursery)
            manifests = ManifestService(config, store, origin)
            endpoint = RegistryEndpoint(config, store, origin, downloads, manifests)
            listeners = await nursery.start(
                serve_http, config.registry_host, config.registry_port, endpoint.handle
            )
            port = bound_port(listeners)
            log.info("registry endpoint listening on http://%s:%d", config.registry_host, port)
            task_status.started(RunningAgent(config, port, store, downloads, origin))
    finally:
        with trio.CancelScope(shield=True):
            await origin.aclose()
