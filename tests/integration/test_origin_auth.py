"""Origin authentication: the Docker token protocol, Basic, docker config.json credentials."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import httpx
import pytest
import trio

from agent.docker_config import load_docker_config
from p2preg.config import Credentials
from p2preg.errors import ConfigError
from p2preg.http_server import Request, Response, bound_port, serve_http
from p2preg.mediatypes import DEFAULT_MANIFEST_ACCEPT
from tests.support.fault_proxy import Fault, run_fault_proxy

pytestmark = pytest.mark.timeout(60)


class TokenServer:
    """A token endpoint as registries run one: GET ?service=&scope= -> {"token", "expires_in"}."""

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.url = ""

    async def handle(self, request: Request) -> Response:
        self.requests.append(request)
        body = json.dumps({"token": f"tok{len(self.requests)}", "expires_in": 300}).encode()
        return Response(200, [("Content-Type", "application/json")], body)


async def test_bearer_token_flow_and_token_reuse(
    origin, image_factory, start_agent, nursery
) -> None:
    image = image_factory("team/tokens")
    tokens = TokenServer()
    listeners = await nursery.start(serve_http, "127.0.0.1", 0, tokens.handle)
    tokens.url = f"http://127.0.0.1:{bound_port(listeners)}/token"
    proxy = await nursery.start(run_fault_proxy, origin.url)
    host = proxy.url.removeprefix("http://")
    agent = await start_agent(proxy.url, credentials={host: Credentials("robot", "s3cret")})
    challenge = (
        f'Bearer realm="{tokens.url}",service="test-registry",scope="repository:team/tokens:pull"'
    )
    proxy.add_fault(
        Fault("status", "/manifests/v1", status=401, headers={"WWW-Authenticate": challenge})
    )
    async with httpx.AsyncClient(base_url=agent.registry_url, timeout=30) as client:
        response = await client.get(
            "/v2/team/tokens/manifests/v1", headers={"Accept": DEFAULT_MANIFEST_ACCEPT}
        )
        assert response.status_code == 200
        response = await client.get(f"/v2/team/tokens/blobs/{image.config.digest}")
        assert response.content == image.config.path.read_bytes()

    assert len(tokens.requests) == 1, "the token is cached and reused"
    token_request = tokens.requests[0]
    assert "scope=repository%3Ateam%2Ftokens%3Apull" in token_request.target
    assert "service=test-registry" in token_request.target
    expected_basic = "Basic " + base64.b64encode(b"robot:s3cret").decode()
    assert token_request.headers["authorization"] == expected_basic
    # After the challenge every request to the registry carries the bearer token.
    later = [r for r in proxy.records("/v2/team/tokens/") if r.fault is None]
    assert later and all(r.headers.get("authorization") == "Bearer tok1" for r in later)


async def test_client_authorization_is_forwarded(
    origin, shared_image, start_agent, nursery
) -> None:
    proxy = await nursery.start(run_fault_proxy, origin.url)
    agent = await start_agent(proxy.url)
    async with httpx.AsyncClient(base_url=agent.registry_url, timeout=30) as client:
        response = await client.head(
            "/v2/team/app/manifests/v1",
            headers={"Accept": DEFAULT_MANIFEST_ACCEPT, "Authorization": "Bearer clients-own"},
        )
        assert response.status_code == 200
    (record,) = proxy.records("/manifests/v1", "HEAD")
    assert record.headers["authorization"] == "Bearer clients-own"


async def test_origin_down_without_cache_is_503(origin, start_agent) -> None:
    agent = await start_agent("http://127.0.0.1:9", connect_timeout=1.0, request_timeout=3.0)
    async with httpx.AsyncClient(base_url=agent.registry_url, timeout=30) as client:
        with trio.fail_after(15):
            response = await client.get("/v2/team/app/manifests/v1")
        assert response.status_code == 503
        assert response.json()["errors"][0]["code"] == "UNAVAILABLE"


def test_docker_config_credentials(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(
        json.dumps(
            {
                "auths": {
                    "https://index.docker.io/v1/": {
                        "auth": base64.b64encode(b"hubuser:hubpass").decode()
                    },
                    "ghcr.io": {"username": "gh", "password": "tok"},
                    "broken.example": {"auth": "!!!"},
                }
            }
        )
    )
    credentials = load_docker_config(str(path))
    assert credentials["registry-1.docker.io"] == Credentials("hubuser", "hubpass")
    assert credentials["ghcr.io"] == Credentials("gh", "tok")
    assert "broken.example" not in credentials
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_docker_config(str(path))
