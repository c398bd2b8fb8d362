"""Typed errors shared by every component.

Registry errors carry the OCI error code and the HTTP status the registry endpoint answers with
(the mapping follows the OCI Distribution Spec and distribution's ``registry/api/errcode``), so a
handler raises one and the HTTP layer never has to guess a status.
"""

from __future__ import annotations

from collections.abc import Mapping


class P2PRegError(Exception):
    """Base class of every error p2preg raises on purpose."""


class ConfigError(P2PRegError):
    """Bad flags, environment or config file. The CLI prints it on one line and exits 2."""


class RemoteProtocolError(P2PRegError):
    """A peer or server sent bytes that break the protocol. Decoders raise only this."""


class LocalProtocolError(P2PRegError):
    """Our own code asked a protocol object to do something the protocol forbids right now."""


# code -> (HTTP status, default message). From the OCI Distribution Spec's error code table.
OCI_ERROR_CODES: Mapping[str, tuple[int, str]] = {
    "BLOB_UNKNOWN": (404, "blob unknown to registry"),
    "BLOB_UPLOAD_INVALID": (400, "blob upload invalid"),
    "BLOB_UPLOAD_UNKNOWN": (404, "blob upload unknown to registry"),
    "DIGEST_INVALID": (400, "provided digest did not match uploaded content"),
    "MANIFEST_BLOB_UNKNOWN": (404, "manifest references a manifest or blob unknown to registry"),
    "MANIFEST_INVALID": (400, "manifest invalid"),
    "MANIFEST_UNKNOWN": (404, "manifest unknown to registry"),
    "NAME_INVALID": (400, "invalid repository name"),
    "NAME_UNKNOWN": (404, "repository name not known to registry"),
    "SIZE_INVALID": (400, "provided length did not match content length"),
    "UNAUTHORIZED": (401, "authentication required"),
    "DENIED": (403, "requested access to the resource is denied"),
    "UNSUPPORTED": (405, "the operation is unsupported"),
    "TOOMANYREQUESTS": (429, "too many requests"),
    "RANGE_INVALID": (416, "requested range not satisfiable"),
    "UNAVAILABLE": (503, "service unavailable"),
    "UPSTREAM_ERROR": (502, "the origin registry failed"),
}


class RegistryError(P2PRegError):
    """An error the registry endpoint reports to its client as OCI error JSON."""

    def __init__(
        self,
        code: str,
        message: str | None = None,
        *,
        status: int | None = None,
        detail: object = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        default_status, default_message = OCI_ERROR_CODES[code]
        self.code = code
        self.status = default_status if status is None else status
        self.message = default_message if message is None else message
        self.detail = detail
        self.headers: dict[str, str] = dict(headers or {})
        super().__init__(f"{code}: {self.message}")


class UpstreamUnavailable(P2PRegError):
    """The origin could not be reached (connection refused, timeout, repeated 5xx)."""


class DigestMismatch(P2PRegError):
    """Downloaded bytes do not hash to the digest they were requested by."""

    def __init__(self, expected: str, actual: str) -> None:
        self.expected = expected
        self.actual = actual
        super().__init__(f"content digest {actual} does not match the expected {expected}")


class TrackerUnavailable(P2PRegError):
    """No tracker gave a usable answer (unreachable, timed out, 5xx, refused us). The agent
    carries on without one: peers from local discovery, and the origin."""


class TrackerAuthError(TrackerUnavailable):
    """A tracker refused our cluster credentials, or could not prove it knows the secret."""


class TrackerConflict(TrackerUnavailable):
    """The tracker refused a request because of what it holds: published metainfo whose piece
    hash differs from a known one (HTTP 409), or a publisher quarantined for that blob after a
    bad-data report (403). A TrackerUnavailable too, so code that goes to the origin on any
    tracker trouble handles it."""
