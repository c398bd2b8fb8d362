"""Agent CPU per rollout, two agent source trees side by side, under the emulator.

    python -m simulations.bench_agent_cpu --baseline REV [--candidate DIR] [--runs 3]
        [--nodes 16] [--blob-size 100MiB] [--node-bandwidth 5MiB] [--piece-length 256KiB]
        [--json FILE]

Why: on a test machine every emulated node shares the same few cores, so the agents' CPU per
piece decides whether the emulator measures the policies or the machine (docs/rollouts.md,
"N = 16: where the time goes"). This runs the same emulated rollout (``p2preg emulate``, netns
+ tbf when root, no baselines) with the agents and tracker taken from two source trees, the
baseline and the candidate alternately (B C B C ...), so a slow spell of the machine hits both.
Per run it prints the agents' CPU seconds during the pulls (all agent processes, user + system),
the completion time of the last node and the machine's busy share; at the end the medians side
by side and candidate / baseline.

Pick a node bandwidth low enough that the machine is not saturated (the report warns when the
CPUs were 85% busy or more): a saturated machine batches more work per wakeup, which makes CPU
seconds look better than they are.

``--baseline`` is a directory with agent/, p2preg/ and tracker/, or a git revision of this
checkout (exported with ``git archive`` to a temporary directory). ``--candidate`` defaults to
this checkout. Everything the emulator starts is cleaned up as in ``p2preg emulate``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from p2preg.errors import ConfigError
from simulations import emulator
from simulations.bench_registry import run_until_done

ROOT = Path(__file__).resolve().parent.parent


def export_revision(revision: str, into: Path) -> Path:
    """``git archive`` of ``revision`` of this checkout, unpacked into ``into``."""
    try:
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", revision],
            check=True,
            capture_output=True,
            timeout=60,
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        raise ConfigError(f"cannot export git revision {revision!r}: {exc}") from None
    return into


def source_tree(spec: str, scratch: Path, name: str) -> Path:
    path = Path(spec)
    if path.is_dir():
        return path.resolve()
    target = scratch / name
    target.mkdir()
    return export_revision(spec, target)


def run_once(args: argparse.Namespace, agent_src: Path) -> dict[str, Any]:
    argv = [
        "--nodes",
        str(args.nodes),
        "--blob-size",
        args.blob_size,
        "--node-bandwidth",
        args.node_bandwidth,
        "--piece-length",
        args.piece_length,
        "--baselines",
        "none",
        "--no-simulate",
        "--agent-src",
        str(agent_src),
    ]
    parser = argparse.ArgumentParser()
    emulator.add_arguments(parser)
    options = emulator.options_from_args(parser.parse_args(argv))
    report = emulator.emulate(options)
    result = report.results[0]
    if result.failed:
        raise RuntimeError(f"the emulated rollout failed: {result.failed}")
    stats = result.stats(options.caps)
    return {
        "agent_cpu_s": result.cpu_seconds.get("agents"),
        "max_s": stats["max_s"],
        "ratio_max": stats["ratio_max"],
        "machine_busy": result.cpu_busy,
        "origin_copies": stats["origin_copies"],
    }


def median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def compare(args: argparse.Namespace) -> int:
    scratch = Path(tempfile.mkdtemp(prefix="p2pcpu-"))
    try:
        trees = {
            "baseline": source_tree(args.baseline, scratch, "baseline"),
            "candidate": source_tree(args.candidate, scratch, "candidate"),
        }
        runs: dict[str, list[dict[str, Any]]] = {"baseline": [], "candidate": []}
        for number in range(args.runs):
            for name, tree in trees.items():
                run = run_once(args, tree)
                runs[name].append(run)
                emulator.say(
                    f"run {number + 1} {name}: agents {run['agent_cpu_s']:.1f} CPU s, "
                    f"max {run['max_s']:.2f} s ({run['ratio_max']:.2f}x), "
                    f"machine {run['machine_busy']:.0%} busy"
                )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(
        f"{args.nodes} nodes x {args.blob_size} @ {args.node_bandwidth}/s, "
        f"{args.piece_length} pieces, medians of {args.runs} runs each "
        f"(baseline {args.baseline}, candidate {args.candidate}):"
    )
    print(f"{'':26s}{'baseline':>10s}{'candidate':>11s}{'ratio':>8s}")
    for key, label in (("agent_cpu_s", "agents' CPU seconds"), ("max_s", "last node done (s)")):
        base = median([r[key] for r in runs["baseline"]])
        cand = median([r[key] for r in runs["candidate"]])
        ratio = f"{cand / base:.2f}" if base and cand is not None else "-"
        print(f"{label:26s}{base or 0:10.2f}{cand or 0:11.2f}{ratio:>8s}")
    busy = max(r["machine_busy"] or 0 for rs in runs.values() for r in rs)
    if busy >= 0.85:
        print(
            f"note: the machine was up to {busy:.0%} busy: lower --node-bandwidth for a fair "
            "comparison (a saturated machine batches more work per wakeup)"
        )
    if args.json is not None:
        record = {"args": {k: str(v) for k, v in vars(args).items()}, "runs": runs}
        args.json.write_text(json.dumps(record, indent=2) + "\n")
        print(f"results: {args.json}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m simulations.bench_agent_cpu",
        description="Agent CPU per emulated rollout: two source trees side by side.",
    )
    parser.add_argument("--baseline", required=True, help="source tree or git revision")
    parser.add_argument("--candidate", default=str(ROOT), help="source tree or git revision")
    parser.add_argument("--runs", type=int, default=3, help="runs of each (3)")
    parser.add_argument("--nodes", type=int, default=16, help="(16)")
    parser.add_argument("--blob-size", default="100MiB", help="(100MiB)")
    parser.add_argument("--node-bandwidth", default="5MiB", help="per second (5MiB)")
    parser.add_argument("--piece-length", default="256KiB", help="(256KiB)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write every run here")
    args = parser.parse_args(argv)
    if not 1 <= args.runs <= 20:
        print("bench_agent_cpu: --runs must be between 1 and 20", file=sys.stderr)
        return 2
    try:
        return run_until_done(lambda: compare(args), emulator.say, "bench_agent_cpu")
    except (ConfigError, RuntimeError) as exc:
        print(f"bench_agent_cpu: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
