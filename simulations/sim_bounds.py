"""Closed-form lower bounds on a rollout's completion time (see docs/simulator.md).

Kumar & Ross (2006): distributing a file of F bytes from one server with upload ``u_origin`` to N
peers with uploads ``u_i`` and downloads ``d_i`` takes at least

    T >= max(F / u_origin, F / d_min, N * F / (u_origin + sum u_i))

The zone-aware bound adds what the links between zones let through. Model: K zones, the origin
outside all of them (its upload is its only limit), and each ordered pair of zones (a -> b) joined
by a link of capacity C (full duplex: a -> b and b -> a are separate C each). Then, over a rollout
of length T:

* every zone must take in each piece at least once from outside (origin or another zone): with
  x_z origin bytes into zone z, ``sum x_z <= u_origin T`` and ``F - x_z <= (K - 1) C T``, hence
  ``T >= K F / (u_origin + K (K - 1) C)``;
* the n_z nodes of zone z need n_z F bytes, which only the zone's own uploads U_z, the origin and
  the K - 1 links into z can supply: ``T >= n_z F / (U_z + u_origin + (K - 1) C)``.

Both are lower bounds (they ignore that a zone cannot forward what it has not received yet), so the
zone-aware bound is the max of these and the Kumar & Ross bound.
"""

from __future__ import annotations

from collections.abc import Sequence


def kumar_ross_bound(
    blob_bytes: int, origin_upload: float, uploads: Sequence[float], downloads: Sequence[float]
) -> float:
    """max(F/u_o, F/d_min, N F/(u_o + sum u)); 0 for an empty fleet or an empty blob."""
    if not uploads or blob_bytes <= 0:
        return 0.0
    n = len(uploads)
    return max(
        blob_bytes / origin_upload,
        blob_bytes / min(downloads),
        n * blob_bytes / (origin_upload + sum(uploads)),
    )


def zone_bound(
    blob_bytes: int,
    origin_upload: float,
    uploads: Sequence[float],
    downloads: Sequence[float],
    zones: Sequence[int],
    inter_zone: float | None,
) -> float:
    """The Kumar & Ross bound tightened by per-pair inter-zone capacity ``inter_zone`` (None:
    unlimited, which is the Kumar & Ross bound itself). ``zones[i]`` is node i's zone."""
    base = kumar_ross_bound(blob_bytes, origin_upload, uploads, downloads)
    k = len(set(zones))
    if inter_zone is None or k <= 1 or blob_bytes <= 0:
        return base
    into_zone = (k - 1) * inter_zone
    bound = max(base, k * blob_bytes / (origin_upload + k * into_zone))
    members: dict[int, list[int]] = {}
    for node, zone in enumerate(zones):
        members.setdefault(zone, []).append(node)
    for nodes in members.values():
        zone_upload = sum(uploads[i] for i in nodes)
        bound = max(bound, len(nodes) * blob_bytes / (zone_upload + origin_upload + into_zone))
    return bound
