"""Rollout plots: completion-time CDFs against the lower bound, and the origin's egress over time.

Shared by ``p2preg emulate`` and ``p2preg simulate`` (``--plot FILE.png``). matplotlib is an
optional dependency (``pip install 'p2preg[plot]'``): it is imported only when a plot is asked
for, and its absence is a one-line error, not a traceback.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from p2preg.errors import ConfigError

# One colour per system, stable across plots so p2preg is always the same colour.
_COLOURS = {
    "p2preg": "#1f77b4",
    "direct": "#d62728",
    "bittorrent": "#2ca02c",
    "simulated": "#9467bd",
}
_FALLBACK_COLOURS = ["#ff7f0e", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]


def _colour(label: str, index: int) -> str:
    for name, colour in _COLOURS.items():
        if label.lower().startswith(name):
            return colour
    return _FALLBACK_COLOURS[index % len(_FALLBACK_COLOURS)]


def cdf_points(times: Sequence[float | None]) -> tuple[list[float], list[float]]:
    """Step-CDF coordinates: the fraction of all nodes finished by each completion time.

    A node that never finished (None) stays in the denominator, so the curve stops below 1.
    """
    total = len(times)
    finished = sorted(t for t in times if t is not None and math.isfinite(t))
    if total == 0:
        return [], []
    xs = [0.0]
    ys = [0.0]
    for index, t in enumerate(finished, start=1):
        xs.append(t)
        ys.append(ys[-1])  # the step: flat until t, then up
        xs.append(t)
        ys.append(index / total)
    return xs, ys


def plot_rollout(
    path: Path,
    title: str,
    series: Mapping[str, Sequence[float | None]],
    bound_s: float,
    origin_egress: Mapping[str, Sequence[tuple[float, int]]],
    blob_bytes: int,
) -> None:
    """Write a two-panel PNG: completion-time CDF per system with the bound, origin egress.

    ``series``: label -> every node's completion time in seconds (None: did not finish).
    ``origin_egress``: label -> (seconds, cumulative bytes the origin served) samples; drawn in
    copies of the blob so "about one copy" reads straight off the axis.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only; never a display
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ConfigError(
            "--plot needs matplotlib: pip install 'p2preg[plot]' (or pip install matplotlib)"
        ) from exc

    fig, (ax_cdf, ax_origin) = plt.subplots(1, 2, figsize=(12, 4.8))
    try:
        for index, (label, times) in enumerate(series.items()):
            xs, ys = cdf_points(times)
            if xs:
                ax_cdf.plot(xs, ys, label=label, color=_colour(label, index), linewidth=1.8)
        ax_cdf.axvline(bound_s, color="black", linestyle="--", linewidth=1.2, label="lower bound")
        ax_cdf.axvline(
            1.3 * bound_s, color="grey", linestyle=":", linewidth=1.2, label="1.3 x bound"
        )
        ax_cdf.set_xlabel("completion time (s)")
        ax_cdf.set_ylabel("fraction of nodes finished")
        ax_cdf.set_ylim(0, 1.02)
        ax_cdf.set_xlim(left=0)
        ax_cdf.set_title("completion time CDF")
        ax_cdf.grid(True, alpha=0.3)
        ax_cdf.legend(loc="lower right", fontsize="small")

        copies = max(blob_bytes, 1)
        for index, (label, samples) in enumerate(origin_egress.items()):
            if not samples:
                continue
            ts = [0.0] + [t for t, _ in samples]
            ys = [0.0] + [b / copies for _, b in samples]
            ax_origin.step(ts, ys, where="post", label=label, color=_colour(label, index))
        ax_origin.axhline(1.0, color="black", linestyle="--", linewidth=1.0, label="one copy")
        ax_origin.set_xlabel("time (s)")
        ax_origin.set_ylabel("origin egress (copies of the blob)")
        ax_origin.set_xlim(left=0)
        ax_origin.set_ylim(bottom=0)
        ax_origin.set_title("bytes the origin served")
        ax_origin.grid(True, alpha=0.3)
        ax_origin.legend(loc="upper left", fontsize="small")

        fig.suptitle(title, fontsize="medium")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
