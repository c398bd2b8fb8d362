"""The ``p2preg`` command: one console script, one subcommand per component.

Bad flags or configuration print one line and exit 2; nothing here prints a traceback for bad
input. The agent's flags map 1:1 to ``P2PREG_<NAME>`` environment variables and TOML keys
(docs/configuration.md); the tracker's flags to ``P2PREG_<NAME>`` variables (docs/tracker.md).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from p2preg.config import (
    AgentConfig,
    TrackerConfig,
    build_agent_config,
    build_tracker_config,
    parse_config_file,
)
from p2preg.errors import ConfigError
from p2preg.units import parse_size


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _agent_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "agent",
        help="run the node agent (local OCI registry endpoint with a pull-through cache)",
        description="Run the node agent. Every flag also reads P2PREG_<NAME> from the "
        "environment and <name> from --config; precedence: flag, environment, file, default.",
    )
    add = parser.add_argument
    add("--registry-addr", metavar="HOST:PORT", help="local OCI endpoint (default 127.0.0.1:5080)")
    add(
        "--upstream",
        action="append",
        metavar="[NS=]URL",
        help="origin registry: a default URL, or NS=URL for containerd's ns parameter "
        "(repeatable; default https://registry-1.docker.io and docker.io=that)",
    )
    add("--data-dir", metavar="DIR", help="content store directory (default ./p2preg-data)")
    add("--cache-size", metavar="SIZE", help="store capacity, e.g. 20GiB (default 10GiB)")
    add("--config", metavar="FILE", help="TOML file with the same keys (registry_addr, ...)")
    add("--docker-config", metavar="FILE", help="docker config.json to read credentials from")
    add(
        "--mirror-all",
        action="store_const",
        const=True,
        help="fetch from https://<ns> for a registry with no configured upstream",
    )
    add("--tag-ttl", metavar="DURATION", help="how long a resolved tag is trusted (default 5s)")
    add("--request-timeout", metavar="DURATION", help="deadline for an origin answer (60s)")
    add("--idle-timeout", metavar="DURATION", help="a download stalled this long is retried (30s)")
    add("--connect-timeout", metavar="DURATION", help="origin connect timeout (10s)")
    add("--log-level", metavar="LEVEL", help="debug, info, warning or error (default info)")
    p2p = parser.add_argument_group("peer to peer (off unless --peer-addr is given)")
    p2p.add_argument("--peer-addr", metavar="HOST:PORT", help="where this agent serves pieces")
    p2p.add_argument(
        "--peer-advertise-addr",
        metavar="HOST:PORT",
        help="address other agents dial (NAT, 0.0.0.0)",
    )
    p2p.add_argument(
        "--tracker", action="append", metavar="URL", help="tracker URL (repeatable; rendezvous)"
    )
    p2p.add_argument(
        "--cluster-secret-file", metavar="FILE", help="shared secret authenticating peers"
    )
    p2p.add_argument("--zone", metavar="NAME", help="this node's zone (same-zone peers first)")
    p2p.add_argument("--upload-limit", metavar="RATE", help="e.g. 50MiB (bytes per second)")
    p2p.add_argument("--download-limit", metavar="RATE", help="e.g. 50MiB (bytes per second)")
    p2p.add_argument(
        "--piece-length", metavar="SIZE", help="piece size for new blobs (default: by size)"
    )
    p2p.add_argument(
        "--swarm-stall-timeout", metavar="DURATION", help="take over the origin after (3s)"
    )
    p2p.add_argument("--piece-timeout", metavar="DURATION", help="drop a peer stalled this long")
    p2p.add_argument(
        "--embedded-tracker",
        action="store_const",
        const=True,
        help="run a tracker in this process too (on the peer host) and use it",
    )
    p2p.add_argument(
        "--embedded-tracker-port", metavar="PORT", help="port of the embedded tracker (0: any)"
    )
    _discovery_arguments(p2p, "find trackers and peers on the LAN, advertise this agent")


def _discovery_arguments(parser: Any, what: str) -> None:
    parser.add_argument(
        "--discovery",
        metavar="MODE",
        help=f"mdns: {what} (multicast on the --peer-addr/--addr interface); off (default)",
    )
    parser.add_argument(
        "--cluster-name", metavar="NAME", help="what mDNS discovery matches (default p2preg)"
    )


def _tracker_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "tracker",
        help="run a tracker (announce, peer handout, metainfo, origin-fetch leases)",
        description="Run a tracker. Every flag also reads P2PREG_<NAME> from the environment "
        "(e.g. P2PREG_PEER_TTL); a flag wins over the environment.",
    )
    add = parser.add_argument
    add("--addr", metavar="HOST:PORT", help="listen address, e.g. 0.0.0.0:5081 (required)")
    add(
        "--cluster-secret-file",
        metavar="FILE",
        help="file holding the cluster's shared secret, 16+ bytes (required)",
    )
    add("--peer-ttl", metavar="DURATION", help="forget a peer that stops announcing (30s)")
    add("--lease-ttl", metavar="DURATION", help="origin-fetch lease lifetime (10s)")
    add("--max-peers", metavar="N", help="peers handed out per announce (50)")
    add(
        "--announce-budget",
        metavar="N",
        help="announces a second to pace downloading agents to (500; docs/tracker.md)",
    )
    add("--log-level", metavar="LEVEL", help="debug, info, warning or error (default info)")
    _discovery_arguments(parser, "advertise this tracker to agents on the LAN")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="p2preg", description="Peer-to-peer container image distribution")
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=_OneLineParser)
    _agent_parser(subparsers)
    _tracker_parser(subparsers)
    _demo_parser(subparsers)
    _simulate_parser(subparsers)
    _emulate_parser(subparsers)
    return parser


def _simulate_parser(subparsers: Any) -> None:
    from simulations.simulator import add_arguments

    parser = subparsers.add_parser(
        "simulate",
        help="simulate a fleet rollout of one blob (flow-level, the real piece/peer policies)",
        description="Discrete-event, flow-level simulation of a rollout of one blob to N nodes, "
        "driven by the agent's piece picker and the tracker's peer handout (docs/simulator.md).",
    )
    add_arguments(parser)


def _emulate_parser(subparsers: Any) -> None:
    from simulations.emulator import add_arguments

    parser = subparsers.add_parser(
        "emulate",
        help="emulate a rollout with real processes on shaped links, against baselines",
        description="A real origin, tracker and N agents (network namespaces with tbf when run "
        "as root, rate limits otherwise) pulling one image at once, against direct pulls and a "
        "BitTorrent swarm on the same links (docs/rollouts.md).",
    )
    add_arguments(parser)


def _demo_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run an origin, a tracker and several agents locally and pull an image through all",
        description="A self-contained demonstration on 127.0.0.1; everything it starts is stopped "
        "and removed at the end.",
    )
    parser.add_argument("--nodes", type=int, default=4, help="number of agents (default 4)")
    parser.add_argument(
        "--node-bandwidth", metavar="RATE", default="40MiB", help="per-node cap (40MiB)"
    )
    parser.add_argument(
        "--origin-bandwidth", metavar="RATE", default="40MiB", help="origin upload cap (40MiB)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory and logs")


def load_agent_config(args: argparse.Namespace, env: dict[str, str]) -> AgentConfig:
    flags = {key: value for key, value in vars(args).items() if key != "command"}
    config_path = flags.pop("config", None) or env.get("P2PREG_CONFIG")
    file_values: dict[str, Any] = {}
    if config_path:
        try:
            text = Path(config_path).read_text("utf-8")
        except OSError as exc:
            raise ConfigError(f"config file {config_path}: {exc.strerror}") from None
        file_values = parse_config_file(text, config_path)
    return build_agent_config(flags, env, file_values)


def _read_secret_file(path: str) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read(64 * 1024)
    except OSError as exc:
        raise ConfigError(f"cluster secret file {path}: {exc.strerror or exc}") from None


def load_tracker_config(args: argparse.Namespace, env: dict[str, str]) -> TrackerConfig:
    flags = {key: value for key, value in vars(args).items() if key != "command"}
    return build_tracker_config(flags, env, _read_secret_file)


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # httpx logs every request at INFO; that is our own log's job.
    logging.getLogger("httpx").setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "agent":
            config = load_agent_config(args, dict(os.environ))
            _configure_logging(config.log_level)
            return _run_agent(config)
        if args.command == "tracker":
            tracker_config = load_tracker_config(args, dict(os.environ))
            _configure_logging(tracker_config.log_level)
            return _run_tracker(tracker_config)
        if args.command == "demo":
            return _run_demo(args)
        if args.command == "simulate":
            from simulations.simulator import run_from_args

            return run_from_args(args)
        if args.command == "emulate":
            from simulations.emulator import run_from_args as emulate_from_args

            return emulate_from_args(args)
    except ConfigError as exc:
        print(f"p2preg: {exc}", file=sys.stderr)
        return 2
    parser.error(f"unknown command {args.command}")


def _run_demo(args: argparse.Namespace) -> int:
    from simulations.demo import DemoOptions
    from simulations.demo import main as demo_main

    if not 1 <= args.nodes <= 32:
        raise ConfigError("--nodes must be between 1 and 32")
    options = DemoOptions(
        nodes=args.nodes,
        node_rate=parse_size(args.node_bandwidth, "--node-bandwidth"),
        origin_rate=parse_size(args.origin_bandwidth, "--origin-bandwidth"),
        keep=args.keep,
    )
    if options.node_rate <= 0 or options.origin_rate <= 0:
        raise ConfigError("bandwidths must be larger than zero")
    return demo_main(options)


def _config_error(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    """The first ConfigError in ``group``, however deeply nested nurseries wrapped it."""
    matched, _ = group.split(ConfigError)
    if matched is None:
        return None
    first: BaseException = matched
    while isinstance(first, BaseExceptionGroup):
        first = first.exceptions[0]
    return first


def _run_service(service: Callable[..., Awaitable[None]], config: object) -> int:
    """Run a long-lived service until SIGINT or SIGTERM, then cancel it so it cleans up
    (mDNS goodbyes, closed connections) and exit 0; configuration errors stay one line."""
    import signal

    import trio

    async def until_signalled() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(service, config)
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    return

    try:
        trio.run(until_signalled)
    except KeyboardInterrupt:
        return 130
    except BaseExceptionGroup as group:
        error = _config_error(group)
        if error is None:
            raise
        raise error from None
    return 0


def _run_agent(config: AgentConfig) -> int:
    from agent.service import run_agent

    return _run_service(run_agent, config)


def _run_tracker(config: TrackerConfig) -> int:
    if config.discovery == "mdns":
        from agent.discovery import run_advertised_tracker

        return _run_service(run_advertised_tracker, config)
    from tracker.server import run_tracker

    return _run_service(run_tracker, config)


if __name__ == "__main__":
    sys.exit(main())
