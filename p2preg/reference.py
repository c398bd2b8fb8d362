"""Repository names and tags, validated against the OCI Distribution Spec's grammar.

A validated name never contains ``..``, a leading ``/`` or any character outside
``[a-z0-9._/-]``, so it cannot escape a directory even if someone later uses it in a path.
"""

from __future__ import annotations

import re

from p2preg.errors import RegistryError

_NAME_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_NAME_RE = re.compile(rf"{_NAME_COMPONENT}(?:/{_NAME_COMPONENT})*")
_TAG_RE = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}")
# distribution limits the whole name to 255 characters; so do we.
MAX_NAME_LENGTH = 255

DOCKER_HUB_NAMESPACE = "docker.io"
DOCKER_HUB_REGISTRY = "registry-1.docker.io"


def validate_name(name: str) -> str:
    if len(name) > MAX_NAME_LENGTH or not _NAME_RE.fullmatch(name):
        raise RegistryError("NAME_INVALID", f"invalid repository name {name[:300]!r}")
    return name


def validate_tag(tag: str) -> str:
    if not _TAG_RE.fullmatch(tag):
        raise RegistryError("MANIFEST_INVALID", f"invalid tag {tag[:200]!r}", status=400)
    return tag


def is_docker_hub(namespace_or_host: str) -> bool:
    host = namespace_or_host.lower()
    return host in (DOCKER_HUB_NAMESPACE, DOCKER_HUB_REGISTRY, "index.docker.io")


def normalize_docker_hub_name(name: str) -> str:
    """Docker Hub's official images live under ``library/``: ``alpine`` is ``library/alpine``."""
    return name if "/" in name else f"library/{name}"
