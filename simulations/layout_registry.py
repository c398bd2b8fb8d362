"""A read-only OCI registry serving a directory: the demo's origin when docker-registry is not
installed. ``python -m simulations.layout_registry --addr 127.0.0.1:PORT --root DIR``.

DIR holds ``blobs/sha256/<hex>`` (manifests, configs, layers) and ``tags.json`` mapping
``repo:tag`` to a manifest digest. Manifests and blobs are served by digest (with Range) and tags
resolved, with the headers pull clients rely on; it is as small as a registry can be and still be
pulled from, and it reuses the agent's HTTP server (sendfile included).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import trio

from p2preg.digest import Digest
from p2preg.errors import RegistryError
from p2preg.http_auth import RangeNotSatisfiable, parse_range
from p2preg.http_server import BodySink, Request, Response, serve_http


class _FileBody:
    def __init__(self, path: Path, offset: int, length: int) -> None:
        self.path, self.offset, self.length = path, offset, length

    async def write_to(self, sink: BodySink) -> None:
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            await sink.send_file(fd, self.offset, self.length)
        finally:
            os.close(fd)


class LayoutRegistry:
    def __init__(self, root: Path) -> None:
        self.root = root

    def _tags(self) -> dict[str, str]:
        try:
            tags = json.loads((self.root / "tags.json").read_text())
        except (OSError, ValueError):
            return {}
        return tags if isinstance(tags, dict) else {}

    async def handle(self, request: Request) -> Response:
        try:
            return self._handle(request)
        except RegistryError as exc:
            body = json.dumps({"errors": [{"code": exc.code, "message": exc.message}]}).encode()
            return Response(exc.status, [("Content-Type", "application/json")], body)

    def _handle(self, request: Request) -> Response:
        path = request.target.split("?", 1)[0]
        if path in ("/v2", "/v2/"):
            return Response(200, [("Content-Type", "application/json")], b"{}")
        parts = path.removeprefix("/v2/").split("/")
        if request.method not in ("GET", "HEAD") or len(parts) < 3:
            raise RegistryError("UNSUPPORTED", "read-only registry")
        name, kind, reference = "/".join(parts[:-2]), parts[-2], parts[-1]
        if kind == "manifests" and not Digest.is_digest(reference):
            resolved = self._tags().get(f"{name}:{reference}")
            if resolved is None:
                raise RegistryError("MANIFEST_UNKNOWN")
            reference = resolved
        if kind not in ("manifests", "blobs"):
            raise RegistryError("UNSUPPORTED", "read-only registry")
        digest = Digest.parse(reference)
        blob = self.root / "blobs" / digest.algorithm / digest.hex
        if not blob.is_file():
            raise RegistryError("MANIFEST_UNKNOWN" if kind == "manifests" else "BLOB_UNKNOWN")
        size = blob.stat().st_size
        headers = [("Docker-Content-Digest", str(digest)), ("Accept-Ranges", "bytes")]
        if kind == "manifests":
            media = json.loads(blob.read_bytes()).get("mediaType", "application/json")
            headers.append(("Content-Type", media))
        else:
            headers.append(("Content-Type", "application/octet-stream"))
        try:
            byte_range = parse_range(request.header("range"), size)
        except RangeNotSatisfiable:
            raise RegistryError(
                "RANGE_INVALID", headers={"Content-Range": f"bytes */{size}"}
            ) from None
        if request.method == "HEAD":
            return Response(200, headers, b"", content_length=size)
        if byte_range is None:
            return Response(200, headers, _FileBody(blob, 0, size), content_length=size)
        headers.append(("Content-Range", f"bytes {byte_range.start}-{byte_range.end}/{size}"))
        body = _FileBody(blob, byte_range.start, byte_range.length)
        return Response(206, headers, body, content_length=byte_range.length)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="layout_registry")
    parser.add_argument("--addr", required=True, help="HOST:PORT")
    parser.add_argument("--root", required=True, type=Path)
    args = parser.parse_args(argv)
    host, _, port = args.addr.rpartition(":")
    registry = LayoutRegistry(args.root)
    try:
        trio.run(serve_http, host, int(port), registry.handle)
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
