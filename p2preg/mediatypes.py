"""Media types of the manifests a pull-through registry must pass through untouched."""

from __future__ import annotations

import json

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
# What we ask the origin for when the client did not say: every modern manifest type.
DEFAULT_MANIFEST_ACCEPT = ", ".join(
    (OCI_INDEX, OCI_MANIFEST, DOCKER_MANIFEST_LIST, DOCKER_MANIFEST, "*/*;q=0.1")
)
BLOB = "application/octet-stream"
MAX_MANIFEST_BYTES = 4 * 1024 * 1024  # distribution's limit too


def manifest_media_type(content_type: str | None, body: bytes | None) -> str:
    """The media type to serve a manifest with: the origin's, else the one the JSON declares."""
    if content_type:
        media_type = content_type.split(";")[0].strip()
        if media_type and media_type not in ("application/json", "text/plain"):
            return media_type
    if body:
        try:
            declared = json.loads(body).get("mediaType")
        except (ValueError, AttributeError):
            declared = None
        if isinstance(declared, str) and declared:
            return declared
    return content_type.split(";")[0].strip() if content_type else OCI_MANIFEST


def normalize_accept(accept: str | None) -> str:
    """A canonical Accept value so equivalent headers share one tag-cache entry."""
    if not accept:
        return DEFAULT_MANIFEST_ACCEPT
    items = sorted({part.strip() for part in accept.split(",") if part.strip()})
    return ", ".join(items) if items else DEFAULT_MANIFEST_ACCEPT
