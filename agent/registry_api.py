"""The OCI Distribution pull API on the node: routing, upstream choice, blob and manifest replies.

Routes (everything else under /v2/ is answered with an OCI error):
    GET  /v2/                                   API version check
    HEAD|GET /v2/<name>/manifests/<tag|digest>  via ManifestService
    HEAD|GET /v2/<name>/blobs/<digest>          from the store (sendfile) or a shared download
    GET  /v2/<name>/tags/list                   passed through to the origin
    POST|PUT|PATCH|DELETE ...                   UNSUPPORTED (this is a pull mirror)

containerd's mirror mode adds ``?ns=<registry host>`` to every request and that picks the
upstream; Docker's and podman's mirror mode send no ``ns`` and get the default upstream.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

import trio

from agent.blob_downloads import BlobDownloads, Download, DownloadFailed
from agent.content_store import ContentStore, OpenBlob
from agent.manifest_service import ManifestService
from agent.origin_client import OriginClient, OriginRequest
from p2preg.config import AgentConfig, Upstream
from p2preg.digest import Digest
from p2preg.errors import RegistryError, UpstreamUnavailable
from p2preg.http_auth import ByteRange, RangeNotSatisfiable, parse_range
from p2preg.http_server import BodySink, Request, Response
from p2preg.mediatypes import BLOB
from p2preg.reference import (
    DOCKER_HUB_NAMESPACE,
    is_docker_hub,
    normalize_docker_hub_name,
    validate_name,
    validate_tag,
)
from p2preg.units import parse_decimal

log = logging.getLogger(__name__)

API_HEADERS = [("Docker-Distribution-API-Version", "registry/2.0")]
MAX_TAGS_LIST_BYTES = 8 * 1024 * 1024
# The client's headers the agent sends on to the origin (the Accept of a manifest request,
# every request's Authorization): checked to be ASCII before anything is asked of the origin.
_FORWARDED_HEADERS = ("authorization", "accept")


def error_response(error: RegistryError) -> Response:
    entry: dict[str, object] = {"code": error.code, "message": error.message}
    if error.detail is not None:
        entry["detail"] = error.detail
    body = {"errors": [entry]}
    headers = [*API_HEADERS, ("Content-Type", "application/json")]
    headers += list(error.headers.items())
    return Response(error.status, headers, json.dumps(body).encode() + b"\n")


@dataclass(frozen=True, slots=True)
class _Route:
    name: str
    kind: str  # "manifests" | "blobs" | "tags" | "push"
    reference: str


def _route(path: str) -> _Route | None:
    """Split ``/v2/<name>/<kind>/<reference>``; the name may itself contain slashes."""
    if not path.startswith("/v2/"):
        return None
    parts = path[len("/v2/") :].split("/")
    if len(parts) >= 3 and parts[-2] in ("manifests", "blobs"):
        return _Route("/".join(parts[:-2]), parts[-2], parts[-1])
    if len(parts) >= 3 and parts[-2:] == ["tags", "list"]:
        return _Route("/".join(parts[:-2]), "tags", "list")
    if "blobs" in parts and "uploads" in parts:
        cut = parts.index("blobs")
        return _Route("/".join(parts[:cut]), "push", "")
    return None


class RegistryEndpoint:
    def __init__(
        self,
        config: AgentConfig,
        store: ContentStore,
        origin: OriginClient,
        downloads: BlobDownloads,
        manifests: ManifestService,
    ) -> None:
        self._config = config
        self._store = store
        self._origin = origin
        self._downloads = downloads
        self._manifests = manifests

    async def handle(self, request: Request) -> Response:
        try:
            return await self._dispatch(request)
        except RegistryError as exc:
            if exc.status >= 500:
                log.warning("%s %s -> %d %s", request.method, request.target, exc.status, exc)
            return error_response(exc)
        except UpstreamUnavailable as exc:
            log.warning("%s %s: %s", request.method, request.target, exc)
            return error_response(RegistryError("UNAVAILABLE", f"origin unreachable: {exc}"))
        except Exception:
            log.exception("internal error on %s %s", request.method, request.target)
            return error_response(RegistryError("UNAVAILABLE", "internal error", status=500))

    async def _dispatch(self, request: Request) -> Response:
        try:
            url = urlsplit(request.target)
        except ValueError as exc:  # e.g. an absolute-form target naming "[zz]" as its host
            raise RegistryError(
                "UNSUPPORTED", f"malformed request target: {exc}", status=400
            ) from None
        for name in _FORWARDED_HEADERS:
            value = request.header(name)
            if value is not None and not value.isascii():
                # Sent on to the origin, where HTTP allows only ASCII (httpx refuses the rest)
                raise RegistryError(
                    "UNSUPPORTED", f"the {name} header has non-ASCII characters", status=400
                )
        path, query = url.path, parse_qs(url.query)
        if path in ("/v2", "/v2/"):
            if request.method not in ("GET", "HEAD"):
                raise RegistryError("UNSUPPORTED", "this endpoint only serves pulls")
            return Response(200, [*API_HEADERS, ("Content-Type", "application/json")], b"{}")
        route = _route(path)
        if route is None:
            raise RegistryError("UNSUPPORTED", f"no such endpoint: {path[:200]}", status=404)
        if route.kind == "push" or request.method not in ("GET", "HEAD"):
            raise RegistryError(
                "UNSUPPORTED", "p2preg is a pull-through mirror; push to the origin registry"
            )
        namespace = query.get("ns", [None])[0]
        origin_request = self._origin_request(route.name, namespace, request.headers)
        if route.kind == "manifests":
            return await self._manifest(request, origin_request, route.reference)
        if route.kind == "blobs":
            return await self._blob(request, origin_request, Digest.parse(route.reference))
        return await self._tags_list(origin_request, url.query)

    # -- upstream choice -----------------------------------------------------------------------

    def _origin_request(
        self, name: str, namespace: str | None, headers: Mapping[str, str]
    ) -> OriginRequest:
        validate_name(name)
        upstream = self._upstream_for(namespace)
        hub = is_docker_hub(namespace) if namespace else is_docker_hub(upstream.host)
        repository = normalize_docker_hub_name(name) if hub else name
        return OriginRequest(upstream, validate_name(repository), headers.get("authorization"))

    def _upstream_for(self, namespace: str | None) -> Upstream:
        if namespace is None:
            if self._config.default_upstream is None:
                raise RegistryError("NAME_UNKNOWN", "no default upstream is configured")
            return self._config.default_upstream
        namespace = namespace.lower()
        configured = self._config.namespace_upstreams.get(namespace)
        if configured is not None:
            return configured
        if self._config.mirror_all and _plausible_host(namespace):
            host = "registry-1.docker.io" if namespace == DOCKER_HUB_NAMESPACE else namespace
            return Upstream(f"https://{host}")
        # 404 makes containerd fall back to the next host in its hosts.toml.
        raise RegistryError("NAME_UNKNOWN", f"no upstream is configured for registry {namespace}")

    # -- manifests -----------------------------------------------------------------------------

    async def _manifest(
        self, request: Request, origin_request: OriginRequest, reference: str
    ) -> Response:
        if not Digest.is_digest(reference):
            validate_tag(reference)
        accept = request.header("accept")
        if request.method == "HEAD":
            head = await self._manifests.resolve(origin_request, reference, accept)
            headers = self._manifest_headers(str(head.digest), head.media_type)
            return Response(200, headers, b"", content_length=head.size)
        manifest = await self._manifests.get(origin_request, reference, accept)
        headers = self._manifest_headers(str(manifest.digest), manifest.media_type)
        return Response(200, headers, manifest.data)

    @staticmethod
    def _manifest_headers(digest: str, media_type: str) -> list[tuple[str, str]]:
        return [
            *API_HEADERS,
            ("Content-Type", media_type),
            ("Docker-Content-Digest", digest),
            ("ETag", f'"{digest}"'),
        ]

    # -- blobs ---------------------------------------------------------------------------------

    async def _blob(
        self, request: Request, origin_request: OriginRequest, digest: Digest
    ) -> Response:
        cached = self._store.acquire(digest)
        if cached is not None:
            if request.method == "HEAD":
                cached.release()
                return self._blob_response(digest, cached.size, None, None)
            return self._ranged_blob(request, digest, cached.size, _CachedBody(cached))
        if request.method == "HEAD":
            active = self._downloads.active(digest)
            if active is not None and active.size is not None:
                return self._blob_response(digest, active.size, None, None)
            response = await self._origin.head_blob(origin_request, digest)
            size = parse_decimal(response.headers.get("content-length"))
            return self._blob_response(digest, size, None, None)
        return await self._streamed_blob(request, origin_request, digest)

    def _ranged_blob(self, request: Request, digest: Digest, size: int, body: _Body) -> Response:
        try:
            byte_range = parse_range(request.header("range"), size)
        except BaseException as exc:
            # The body is never sent: close it, or it holds its file open and the blob pinned.
            body.close()
            if not isinstance(exc, RangeNotSatisfiable):
                raise
            raise RegistryError(
                "RANGE_INVALID",
                f"range {request.header('range')} is outside the blob's {size} bytes",
                headers={"Content-Range": f"bytes */{size}"},
            ) from None
        body.byte_range = byte_range or ByteRange(0, size - 1) if size else None
        return self._blob_response(digest, size, byte_range, body)

    def _blob_response(
        self, digest: Digest, size: int | None, byte_range: ByteRange | None, body: _Body | None
    ) -> Response:
        headers = [
            *API_HEADERS,
            ("Content-Type", BLOB),
            ("Docker-Content-Digest", str(digest)),
            ("ETag", f'"{digest}"'),
            ("Accept-Ranges", "bytes"),
            ("Cache-Control", "max-age=31536000"),
        ]
        status, length = 200, size
        if byte_range is not None:
            status, length = 206, byte_range.length
            headers.append(("Content-Range", f"bytes {byte_range.start}-{byte_range.end}/{size}"))
        return Response(status, headers, body if body is not None else b"", content_length=length)

    async def _streamed_blob(
        self, request: Request, origin_request: OriginRequest, digest: Digest
    ) -> Response:
        """Join (or start) the origin download and stream the blob as it lands."""
        download = self._downloads.start(digest, origin_request)
        # Opened now, synchronously, while the partial file surely exists: it stays readable
        # after the download renames (commits) or unlinks (fails) it.
        body = _DownloadBody(download, os.open(download.partial.path, os.O_RDONLY | os.O_CLOEXEC))
        try:
            with trio.fail_after(self._config.request_timeout):
                await download.wait_headers()
        except trio.TooSlowError:
            body.close()
            raise RegistryError("UNAVAILABLE", "the origin did not answer in time") from None
        except BaseException as exc:
            body.close()
            if isinstance(exc, (RegistryError, UpstreamUnavailable)):
                raise
            if isinstance(exc, Exception):
                raise RegistryError("UNAVAILABLE", f"download failed: {exc}") from exc
            raise
        if download.size is None:
            body.byte_range = None
            return self._blob_response(digest, None, None, body)
        return self._ranged_blob(request, digest, download.size, body)

    async def _tags_list(self, origin_request: OriginRequest, query: str) -> Response:
        suffix = f"?{query}" if query else ""
        response = await self._origin.get_json(
            origin_request,
            f"/v2/{origin_request.repository}/tags/list{suffix}",
            MAX_TAGS_LIST_BYTES,
        )
        headers = [*API_HEADERS, ("Content-Type", "application/json")]
        if "link" in response[1].headers:
            headers.append(("Link", response[1].headers["link"]))
        return Response(200, headers, response[0])


def _plausible_host(namespace: str) -> bool:
    return "." in namespace or ":" in namespace or namespace == "localhost"


class _Body:
    """A blob response body (a BodyWriter) that owns a file descriptor until it is sent."""

    byte_range: ByteRange | None = None

    def close(self) -> None:
        raise NotImplementedError

    async def write_to(self, sink: BodySink) -> None:
        raise NotImplementedError


class _CachedBody(_Body):
    """A committed blob, pinned in the store until the response is sent: zero-copy."""

    def __init__(self, blob: OpenBlob) -> None:
        self.blob = blob

    def close(self) -> None:
        self.blob.release()

    async def write_to(self, sink: BodySink) -> None:
        try:
            if self.byte_range is not None:
                await sink.send_file(self.blob.fd, self.byte_range.start, self.byte_range.length)
        finally:
            self.close()


class _DownloadBody(_Body):
    """A blob still arriving: send each verified-on-disk stretch as soon as it is written."""

    def __init__(self, download: Download, fd: int) -> None:
        self.download = download
        self.fd = fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    async def write_to(self, sink: BodySink) -> None:
        download = self.download
        try:
            if self.byte_range is None:
                position, end = 0, None  # unknown size: until the download ends
            else:
                position, end = self.byte_range.start, self.byte_range.end + 1
            while end is None or position < end:
                await download.wait_beyond(position)
                if download.error is not None:
                    raise DownloadFailed(f"download of {download.digest} failed: {download.error}")
                limit = download.available if end is None else min(end, download.available)
                if not download.verified and download.size is not None:
                    # The blob's last byte goes out only after its digest checked out, so a
                    # client of a corrupt download sees a truncated response and retries.
                    limit = min(limit, download.size - 1)
                    if limit <= position:
                        await download.wait_verdict()
                        continue
                if limit > position:
                    await sink.send_file(self.fd, position, limit - position)
                    position = limit
                elif download.done:
                    if end is None:
                        break
                    raise DownloadFailed(f"download of {download.digest} ended early")
            # The digest gates the end of the response: wait for the verdict before finishing.
            await download.wait_verdict()
            if download.error is not None:
                raise DownloadFailed(f"download of {download.digest} failed: {download.error}")
        finally:
            self.close()
