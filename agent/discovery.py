"""Zero-config discovery on the LAN with mDNS / DNS-SD (zeroconf), behind a small trio interface.

What is advertised (docs/discovery.md):

- a tracker as ``<instance>._p2preg-tracker._tcp.local.``: its address and port (the agent uses
  ``http://ADDRESS:PORT``);
- an agent's peer server as ``<instance>._p2preg-peer._tcp.local.``: its address and port.

Both carry the TXT properties ``cluster=<cluster name>``, ``v=1`` and ``id=<instance>``; a
browser ignores services of other clusters and its own. The cluster name only keeps clusters on
one LAN apart: it is not a credential. A discovered tracker is used only after its session
handshake proved it knows the cluster secret (tracker/client.py), a discovered peer only after
the peer handshake (agent/peer_link.py).

zeroconf has no trio API. Its sync API runs its own threads (an asyncio loop, a browser thread);
here it is used from trio worker threads (``trio.to_thread``), and the browser's callbacks only
post the name of what changed back into trio (``TrioToken.run_sync_soon``). Everything else, the
current trackers and peers included, lives in trio and changes only there: one writer. Resolving
a name to an address happens in trio's resolver task, in a worker thread, with a deadline.

``Discovery.run`` reports readiness at once and opens zeroconf in the background, so discovery
never delays startup; if the interface is not usable yet it retries. On cancellation it sends
goodbye packets (other nodes forget us at once) and closes, bounded by ``CLOSE_TIMEOUT``.
mDNS binds to the one interface whose IPv4 address it is given, never to every interface.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import secrets
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import trio
from zeroconf import IPVersion, ServiceBrowser, ServiceInfo, ServiceStateChange, Zeroconf

from p2preg.config import TrackerConfig
from tracker.server import RunningTracker, run_tracker

log = logging.getLogger(__name__)

TRACKER_SERVICE = "_p2preg-tracker._tcp.local."
PEER_SERVICE = "_p2preg-peer._tcp.local."
PROTOCOL_VERSION = "1"
# TTL of our records. A node that vanishes without a goodbye (SIGKILL, power loss) is forgotten
# by the others this long after; meanwhile the tracker client and the swarm skip it on failure.
RECORD_TTL = 120
RESOLVE_TIMEOUT_MS = 3000
RESOLVE_RETRIES = 3
RETRY_DELAY = 2.0
REGISTER_RETRY = 10.0
OPEN_RETRY_MAX = 30.0
CLOSE_TIMEOUT = 3.0
MAX_SERVICES = 1024  # services remembered per kind; more on one LAN is not a small cluster

Listener = Callable[[list[str]], None]


class Discovery:
    """Advertise this node's tracker and peer server, and follow the others' on one interface.

    ``on_trackers`` / ``on_peers`` get the full current list (tracker URLs, peer ``host:port``)
    in the trio thread whenever it changes; without a listener that kind is not browsed.
    """

    def __init__(
        self,
        interface_ip: str,
        cluster_name: str,
        *,
        instance: str | None = None,
        on_trackers: Listener | None = None,
        on_peers: Listener | None = None,
    ) -> None:
        self._ip = interface_ip
        self._cluster = cluster_name
        self._instance = instance or secrets.token_hex(8)
        self._listeners: dict[str, Listener] = {}
        if on_trackers is not None:
            self._listeners[TRACKER_SERVICE] = on_trackers
        if on_peers is not None:
            self._listeners[PEER_SERVICE] = on_peers
        # service type -> mDNS name -> what it resolved to (a tracker URL or a peer address)
        self._found: dict[str, dict[str, str]] = {kind: {} for kind in self._listeners}
        self._wanted: list[ServiceInfo] = []  # not registered yet
        self._pending: dict[tuple[str, str], bool] = {}  # (type, name) -> present
        self._retries: dict[tuple[str, str], tuple[int, float]] = {}  # -> (attempts, not before)
        self._registration_wanted = trio.Event()
        self._changed = trio.Event()
        self._token: trio.lowlevel.TrioToken | None = None

    # -- trio-side interface ---------------------------------------------------------------------

    @property
    def tracker_urls(self) -> list[str]:
        return sorted(self._found.get(TRACKER_SERVICE, {}).values())

    @property
    def peer_addresses(self) -> list[str]:
        return sorted(self._found.get(PEER_SERVICE, {}).values())

    def register_tracker(self, url: str) -> None:
        """Advertise the tracker at ``url`` (its port, on this interface's address)."""
        port = urlsplit(url).port
        if port is None:
            raise ValueError(f"tracker URL without a port: {url}")
        self._advertise(TRACKER_SERVICE, f"p2preg-{self._instance}-tracker", port)

    def register_peer(self, port: int) -> None:
        """Advertise this agent's peer server listening on ``port`` at this interface."""
        self._advertise(PEER_SERVICE, f"p2preg-{self._instance}", port)

    def _advertise(self, service: str, label: str, port: int) -> None:
        info = ServiceInfo(
            service,
            f"{label}.{service}",
            port=port,
            properties={"cluster": self._cluster, "v": PROTOCOL_VERSION, "id": self._instance},
            server=f"p2preg-{self._instance}.local.",
            host_ttl=RECORD_TTL,
            other_ttl=RECORD_TTL,
            parsed_addresses=[self._ip],
        )
        self._wanted.append(info)
        self._registration_wanted.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled. Ready at once: zeroconf starts in the background."""
        self._token = trio.lowlevel.current_trio_token()
        task_status.started()
        zeroconf: Zeroconf | None = None
        browser: ServiceBrowser | None = None
        try:
            zeroconf = await self._open()
            if self._listeners:
                browser = await trio.to_thread.run_sync(
                    functools.partial(
                        ServiceBrowser,
                        zeroconf,
                        list(self._listeners),
                        handlers=[self._on_state_change],
                    )
                )
            log.info(
                "mDNS discovery on %s for cluster %r (%s)",
                self._ip,
                self._cluster,
                "browsing and advertising" if self._listeners else "advertising",
            )
            await self._serve(zeroconf)
        except Exception as exc:
            # The agent works without discovery (trackers it was given, the origin): keep it up.
            log.error("mDNS discovery stopped: %r", exc, exc_info=exc)
            for service_type, found in self._found.items():
                if found:
                    found.clear()
                    self._listeners[service_type]([])
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
                await trio.to_thread.run_sync(_close, zeroconf, browser, abandon_on_cancel=True)

    # -- zeroconf's threads -> trio ----------------------------------------------------------------

    def _on_state_change(
        self,
        zeroconf: Zeroconf,
        service_type: str,
        name: str,
        state_change: ServiceStateChange,
    ) -> None:
        """Runs in zeroconf's browser thread: hand the name to trio, nothing more."""
        present = state_change is not ServiceStateChange.Removed
        assert self._token is not None
        with contextlib.suppress(trio.RunFinishedError):  # the agent is shutting down
            self._token.run_sync_soon(self._note, service_type, name, present)

    def _note(self, service_type: str, name: str, present: bool) -> None:
        """In trio: remember what changed (the latest state wins) and wake the resolver."""
        if service_type not in self._found:
            return
        key = (service_type, name)
        if present and key not in self._pending and len(self._pending) >= MAX_SERVICES:
            log.warning(
                "more than %d mDNS services changing at once; ignoring %s", MAX_SERVICES, name
            )
            return
        self._pending[key] = present
        self._retries.pop(key, None)
        self._changed.set()

    # -- the background work (trio) ----------------------------------------------------------------

    async def _open(self) -> Zeroconf:
        delay = 1.0
        while True:
            try:
                return await trio.to_thread.run_sync(
                    functools.partial(Zeroconf, interfaces=[self._ip], ip_version=IPVersion.V4Only)
                )
            except OSError as exc:
                log.warning(
                    "mDNS discovery on %s is not available (%s); retrying in %.0fs",
                    self._ip,
                    exc,
                    delay,
                )
                await trio.sleep(delay)
                delay = min(delay * 2, OPEN_RETRY_MAX)

    async def _serve(self, zeroconf: Zeroconf) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._register_forever, zeroconf)
            await self._resolve_forever(zeroconf)

    async def _register_forever(self, zeroconf: Zeroconf) -> None:
        """Register what is wanted (probing takes zeroconf about 2 s per service)."""
        while True:
            self._registration_wanted = trio.Event()
            for info in list(self._wanted):
                try:
                    await trio.to_thread.run_sync(
                        functools.partial(zeroconf.register_service, info, allow_name_change=True),
                        abandon_on_cancel=True,
                    )
                except Exception as exc:  # zeroconf raises its own types (NonUniqueName, ...)
                    log.warning("could not advertise %s over mDNS: %s; retrying", info.name, exc)
                    continue
                self._wanted.remove(info)
                log.info("advertising %s on %s:%d over mDNS", info.name, self._ip, info.port)
            with trio.move_on_after(REGISTER_RETRY if self._wanted else math.inf):
                await self._registration_wanted.wait()

    async def _resolve_forever(self, zeroconf: Zeroconf) -> None:
        """Resolve every name the browser reported; retry the ones that did not answer."""
        while True:
            self._changed = trio.Event()
            pending, self._pending = self._pending, {}
            for (service_type, name), present in pending.items():
                await self._update(zeroconf, service_type, name, present)
            now = trio.current_time()
            for key, (_, at) in list(self._retries.items()):
                if at <= now and key not in self._pending:
                    await self._update(zeroconf, *key, True)
            if self._pending:
                continue
            next_retry = min((at for _, at in self._retries.values()), default=math.inf)
            with trio.move_on_at(next_retry):
                await self._changed.wait()

    async def _update(
        self, zeroconf: Zeroconf, service_type: str, name: str, present: bool
    ) -> None:
        found = self._found[service_type]
        value: str | None = None
        if present:
            info = await trio.to_thread.run_sync(
                functools.partial(
                    zeroconf.get_service_info, service_type, name, RESOLVE_TIMEOUT_MS
                ),
                abandon_on_cancel=True,
            )
            if info is None:
                self._retry_later(service_type, name)
                return
            self._retries.pop((service_type, name), None)
            value = self._value_of(service_type, info)
        before = found.get(name)
        if value == before:
            return
        if value is None:
            del found[name]
            log.info("mDNS: %s %s went away", _kind(service_type), before)
        else:
            if len(found) >= MAX_SERVICES and name not in found:
                log.warning("ignoring %s: more than %d known", name, MAX_SERVICES)
                return
            found[name] = value
            log.info("discovered %s %s (mDNS %s)", _kind(service_type), value, name)
        self._listeners[service_type](sorted(set(found.values())))

    def _retry_later(self, service_type: str, name: str) -> None:
        key = (service_type, name)
        attempts = self._retries.get(key, (0, 0.0))[0] + 1
        if attempts > RESOLVE_RETRIES:
            self._retries.pop(key, None)
            log.info("mDNS: could not resolve %s; ignoring it until it changes", name)
            return
        self._retries[key] = (attempts, trio.current_time() + RETRY_DELAY)

    def _value_of(self, service_type: str, info: ServiceInfo) -> str | None:
        """The URL or address a resolved service stands for; None if it is not for us."""
        properties: dict[str, Any] = info.decoded_properties
        if properties.get("cluster") != self._cluster:
            log.debug("mDNS: %s belongs to cluster %r", info.name, properties.get("cluster"))
            return None
        if properties.get("id") == self._instance:
            return None  # ourselves
        addresses = info.parsed_addresses(IPVersion.V4Only)
        if not addresses or not info.port:
            return None
        if service_type == TRACKER_SERVICE:
            return f"http://{addresses[0]}:{info.port}"
        return f"{addresses[0]}:{info.port}"


def _kind(service_type: str) -> str:
    return "tracker" if service_type == TRACKER_SERVICE else "peer"


def _close(zeroconf: Zeroconf | None, browser: ServiceBrowser | None) -> None:
    """In a worker thread: stop browsing, send goodbyes for our services, close the sockets."""
    if browser is not None:
        browser.cancel()
    if zeroconf is not None:
        zeroconf.close()


async def run_advertised_tracker(
    config: TrackerConfig,
    *,
    task_status: trio.TaskStatus[RunningTracker] = trio.TASK_STATUS_IGNORED,
) -> None:
    """A tracker (tracker/server.py) that also advertises itself over mDNS (``--discovery``)."""
    async with trio.open_nursery() as nursery:
        discovery = Discovery(config.host, config.cluster_name)
        await nursery.start(discovery.run)
        running: RunningTracker = await nursery.start(run_tracker, config)
        discovery.register_tracker(running.url)
        task_status.started(running)
