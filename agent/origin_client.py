"""Talks to origin registries (Docker Hub, GHCR, Harbor, distribution, ...) with httpx on trio.

One ``send`` path does everything a registry client must: anonymous, Basic and Bearer-token auth
(following the ``WWW-Authenticate`` challenge, caching tokens until they expire), redirects to blob
storage without leaking the registry's credentials to another host, retries with backoff on
connection errors and 5xx, and ``Retry-After`` on 429 within the request's deadline.
"""

from __future__ import annotations

import base64
import json
import logging
import random
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from urllib.parse import urlencode, urljoin, urlsplit

import httpx
import trio

from agent.trio_transport import BODY_EXTENSION, ResponseBody, TrioTransport
from p2preg.config import AgentConfig, Credentials, Upstream
from p2preg.digest import Digest
from p2preg.errors import OCI_ERROR_CODES, RegistryError, UpstreamUnavailable
from p2preg.http_auth import Challenge, parse_challenge, parse_retry_after, pull_scope
from p2preg.units import parse_decimal

log = logging.getLogger(__name__)

MAX_REDIRECTS = 5
MAX_429_WAITS = 3
MAX_ATTEMPTS = 5
MAX_ERROR_BODY = 64 * 1024
_REDIRECT_STATUSES = {301, 302, 303, 307, 308}
_DEFAULT_TOKEN_LIFETIME = 60.0


@dataclass(frozen=True, slots=True)
class OriginRequest:
    """Who asks for what: the origin, the repository, and the client's own credentials.

    Keeping the client's Authorization here (rather than dropping it at the endpoint) is what
    lets a later release authorize cached private blobs per client.
    """

    upstream: Upstream
    repository: str
    client_authorization: str | None = None


@dataclass(slots=True)
class _Token:
    value: str
    expires_at: float


def _origin_of(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme, parts.netloc.lower()


class OriginClient:
    def __init__(self, config: AgentConfig, credentials: Mapping[str, Credentials]) -> None:
        self._config = config
        self._credentials = {host.lower(): cred for host, cred in credentials.items()}
        self._tokens: dict[tuple[str, str, str], _Token] = {}
        # Upstreams that answered with a Basic challenge: send credentials up front next time.
        self._basic_upstreams: set[str] = set()
        timeout = httpx.Timeout(
            connect=config.connect_timeout,
            read=config.idle_timeout,
            write=config.idle_timeout,
            pool=config.connect_timeout,
        )
        self._http = httpx.AsyncClient(
            timeout=timeout,
            follow_redirects=False,
            limits=httpx.Limits(max_connections=256, max_keepalive_connections=64),
            trust_env=False,
            transport=TrioTransport(),
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    # -- public operations ---------------------------------------------------------------------

    async def head_manifest(
        self, request: OriginRequest, reference: str, accept: str
    ) -> httpx.Response:
        path = f"/v2/{request.repository}/manifests/{reference}"
        response = await self._send(request, "HEAD", path, {"Accept": accept}, "MANIFEST_UNKNOWN")
        await response.aclose()
        return response

    async def get_manifest(
        self, request: OriginRequest, reference: str, accept: str, max_size: int
    ) -> tuple[bytes, httpx.Response]:
        path = f"/v2/{request.repository}/manifests/{reference}"
        response = await self._send(request, "GET", path, {"Accept": accept}, "MANIFEST_UNKNOWN")
        try:
            body = await _read_bounded(response, max_size)
        finally:
            await response.aclose()
        return body, response

    async def get_json(
        self, request: OriginRequest, path_and_query: str, max_size: int
    ) -> tuple[bytes, httpx.Response]:
        response = await self._send(request, "GET", path_and_query, {}, "NAME_UNKNOWN")
        try:
            body = await _read_bounded(response, max_size)
        finally:
            await response.aclose()
        return body, response

    async def head_blob(self, request: OriginRequest, digest: Digest) -> httpx.Response:
        path = f"/v2/{request.repository}/blobs/{digest}"
        response = await self._send(request, "HEAD", path, {}, "BLOB_UNKNOWN")
        await response.aclose()
        return response

    @asynccontextmanager
    async def stream_blob(
        self,
        request: OriginRequest,
        digest: Digest,
        offset: int = 0,
        manifest_accept: str | None = None,
    ) -> AsyncIterator[httpx.Response]:
        """Open a blob download at ``offset``; the response is 200 (offset 0) or 206.

        With ``manifest_accept`` the content is a manifest, fetched by digest from the manifests
        endpoint (registries keep manifests apart from blobs). Read the body with
        ``body_of(response).receive()`` until it returns b"".
        """
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        if manifest_accept is not None:
            headers["Accept"] = manifest_accept
            path = f"/v2/{request.repository}/manifests/{digest}"
            unknown = "MANIFEST_UNKNOWN"
        else:
            path = f"/v2/{request.repository}/blobs/{digest}"
            unknown = "BLOB_UNKNOWN"
        response = await self._send(request, "GET", path, headers, unknown)
        try:
            if offset and response.status_code != 206:
                raise UpstreamUnavailable(
                    f"origin ignored Range bytes={offset}- (status {response.status_code})"
                )
            yield response
        finally:
            await response.aclose()

    # -- the one request path ------------------------------------------------------------------

    async def _send(
        self,
        request: OriginRequest,
        method: str,
        path: str,
        headers: Mapping[str, str],
        unknown_code: str,
    ) -> httpx.Response:
        """Send with auth, redirects and retries. Returns a streaming 2xx response."""
        deadline = trio.current_time() + self._config.request_timeout
        url = request.upstream.url + path
        attempts = waits_429 = redirects = 0
        auth_retried = False
        while True:
            same_origin = _origin_of(url) == _origin_of(request.upstream.url)
            request_headers = dict(headers)
            if same_origin:
                authorization = self._authorization_for(request)
                if authorization:
                    request_headers["Authorization"] = authorization
            attempts += 1
            try:
                with trio.fail_after(max(0.0, deadline - trio.current_time())):
                    response = await self._http.send(
                        self._http.build_request(method, url, headers=request_headers),
                        stream=True,
                    )
            except (httpx.TransportError, trio.TooSlowError) as exc:
                if attempts < MAX_ATTEMPTS and await self._backoff(attempts, deadline):
                    log.info("origin %s: %s %s failed (%s); retrying", url, method, path, exc)
                    continue
                raise UpstreamUnavailable(
                    f"origin {request.upstream.url} unreachable: {exc!r}"
                ) from exc

            status = response.status_code
            if 200 <= status < 300:
                return response
            if status in _REDIRECT_STATUSES and "location" in response.headers:
                await response.aclose()
                redirects += 1
                if redirects > MAX_REDIRECTS:
                    raise RegistryError("UNAVAILABLE", f"origin redirected {path} too many times")
                url = urljoin(url, response.headers["location"])
                continue
            if (
                status == 401
                and same_origin
                and not auth_retried
                and self._can_authenticate(request)
            ):
                auth_retried = True
                challenge = parse_challenge(response.headers.get("www-authenticate", ""))
                await response.aclose()
                if challenge is not None and await self._answer_challenge(request, challenge):
                    continue
                raise RegistryError(
                    "UNAUTHORIZED",
                    f"origin {request.upstream.host} refused the credentials for "
                    f"{request.repository}",
                    headers=_challenge_header(response),
                )
            if status == 429:
                await response.aclose()
                wait = parse_retry_after(response.headers.get("retry-after"), time.time())
                waits_429 += 1
                if (
                    wait is not None
                    and waits_429 <= MAX_429_WAITS
                    and trio.current_time() + wait < deadline
                ):
                    log.info("origin %s: 429, retrying after %.1fs", request.upstream.url, wait)
                    await trio.sleep(wait)
                    continue
                retry_headers = {}
                if "retry-after" in response.headers:
                    retry_headers["Retry-After"] = response.headers["retry-after"]
                raise RegistryError(
                    "TOOMANYREQUESTS",
                    f"origin {request.upstream.host} is rate limiting pulls",
                    headers=retry_headers,
                )
            if status >= 500:
                await response.aclose()
                if attempts < MAX_ATTEMPTS and await self._backoff(attempts, deadline):
                    log.info("origin %s: %s %s -> %d; retrying", url, method, path, status)
                    continue
                raise UpstreamUnavailable(f"origin {request.upstream.url} answered {status}")
            raise await _error_from_response(response, request, unknown_code)

    async def _backoff(self, attempts: int, deadline: float) -> bool:
        """Sleep before retry ``attempts``; False when the deadline leaves no room."""
        delay = min(5.0, 0.1 * 2 ** (attempts - 1)) * (0.5 + random.random())
        if trio.current_time() + delay >= deadline:
            return False
        await trio.sleep(delay)
        return True

    # -- authentication ------------------------------------------------------------------------

    def _credentials_for(self, upstream: Upstream) -> Credentials | None:
        return self._credentials.get(upstream.host.lower())

    def _identity(self, request: OriginRequest) -> str:
        credentials = self._credentials_for(request.upstream)
        return credentials.username if credentials else ""

    def _can_authenticate(self, request: OriginRequest) -> bool:
        # A client that brought its own Authorization does its own auth dance with the origin:
        # we pass the origin's challenge back to it instead of substituting our credentials.
        return request.client_authorization is None

    def _authorization_for(self, request: OriginRequest) -> str | None:
        if request.client_authorization is not None:
            return request.client_authorization
        key = (request.upstream.url, pull_scope(request.repository), self._identity(request))
        token = self._tokens.get(key)
        if token is not None:
            if token.expires_at > trio.current_time():
                return f"Bearer {token.value}"
            del self._tokens[key]
        credentials = self._credentials_for(request.upstream)
        if credentials is not None and request.upstream.url in self._basic_upstreams:
            return _basic(credentials)
        return None

    async def _answer_challenge(self, request: OriginRequest, challenge: Challenge) -> bool:
        """Prepare credentials for a retry after a 401. False if we have nothing to offer."""
        credentials = self._credentials_for(request.upstream)
        if challenge.scheme == "basic":
            if credentials is None:
                return False
            self._basic_upstreams.add(request.upstream.url)
            return True
        if challenge.scheme != "bearer" or not challenge.realm:
            return False
        scope = challenge.params.get("scope") or pull_scope(request.repository)
        query = {"scope": scope}
        if "service" in challenge.params:
            query["service"] = challenge.params["service"]
        token_url = f"{challenge.realm}{'&' if '?' in challenge.realm else '?'}{urlencode(query)}"
        headers = {"Authorization": _basic(credentials)} if credentials else {}
        try:
            with trio.fail_after(self._config.request_timeout):
                response = await self._http.get(token_url, headers=headers, follow_redirects=True)
        except (httpx.TransportError, trio.TooSlowError) as exc:
            raise UpstreamUnavailable(
                f"token endpoint {challenge.realm} unreachable: {exc!r}"
            ) from exc
        if response.status_code in (401, 403):
            return False
        if response.status_code != 200:
            raise UpstreamUnavailable(
                f"token endpoint {challenge.realm} answered {response.status_code}"
            )
        try:
            body = response.json()
            token = body.get("token") or body.get("access_token")
            lifetime = float(body.get("expires_in") or _DEFAULT_TOKEN_LIFETIME)
        except (ValueError, AttributeError, TypeError):
            token = None
        if not isinstance(token, str) or not token:
            raise UpstreamUnavailable(f"token endpoint {challenge.realm} sent no token")
        # Renew a little early so a token never expires between our check and the origin's.
        expires_at = trio.current_time() + max(1.0, lifetime * 0.9)
        key = (request.upstream.url, pull_scope(request.repository), self._identity(request))
        self._tokens[key] = _Token(token, expires_at)
        return True


def body_of(response: httpx.Response) -> ResponseBody:
    """The transport's own body reader of a streamed response (see ResponseBody)."""
    body = response.extensions.get(BODY_EXTENSION)
    if not isinstance(body, ResponseBody):
        raise TypeError("response was not produced by TrioTransport")
    return body


def _basic(credentials: Credentials) -> str:
    raw = f"{credentials.username}:{credentials.password}".encode()
    return "Basic " + base64.b64encode(raw).decode("ascii")


def _challenge_header(response: httpx.Response) -> dict[str, str]:
    value = response.headers.get("www-authenticate")
    return {"WWW-Authenticate": value} if value else {}


async def _read_bounded(response: httpx.Response, limit: int) -> bytes:
    if (parse_decimal(response.headers.get("content-length")) or 0) > limit:
        raise RegistryError("MANIFEST_INVALID", f"origin sent a manifest over {limit} bytes")
    body = bytearray()
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) > limit:
            raise RegistryError("MANIFEST_INVALID", f"origin sent a manifest over {limit} bytes")
    return bytes(body)


async def _error_from_response(
    response: httpx.Response, request: OriginRequest, unknown_code: str
) -> RegistryError:
    """Translate an origin's 4xx into the error our client sees, keeping the origin's code."""
    try:
        body = await _read_bounded(response, MAX_ERROR_BODY)
    except (RegistryError, httpx.HTTPError):
        body = b""
    finally:
        await response.aclose()
    code, message = None, None
    try:
        errors = json.loads(body).get("errors") if body else None
        if isinstance(errors, list) and errors and isinstance(errors[0], dict):
            code, message = errors[0].get("code"), errors[0].get("message")
    except (ValueError, AttributeError):
        pass
    status = response.status_code
    headers = _challenge_header(response) if status == 401 else {}
    if status == 404:
        code = code if code in ("MANIFEST_UNKNOWN", "BLOB_UNKNOWN", "NAME_UNKNOWN") else None
        return RegistryError(code or unknown_code, message, headers=headers)
    if status == 401:
        return RegistryError("UNAUTHORIZED", message, headers=headers)
    if status == 403:
        return RegistryError("DENIED", message)
    if isinstance(code, str) and code in OCI_ERROR_CODES:
        return RegistryError(code, message, status=status)
    return RegistryError(
        "UNAVAILABLE",
        f"origin {request.upstream.host} answered {status} {message or ''}".strip(),
        status=502,
    )
