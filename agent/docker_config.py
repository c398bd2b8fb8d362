"""Registry credentials from a docker ``config.json`` (``auths`` entries with ``auth`` or
``username``/``password``). Credential helpers are not run: an agent must not exec programs named
by a file."""

from __future__ import annotations

import base64
import binascii
import json
from pathlib import Path

from p2preg.config import Credentials
from p2preg.errors import ConfigError

_HUB_ALIASES = ("https://index.docker.io/v1/", "index.docker.io", "docker.io")


def load_docker_config(path: str) -> dict[str, Credentials]:
    try:
        data = json.loads(Path(path).read_text("utf-8"))
    except OSError as exc:
        raise ConfigError(f"docker-config {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise ConfigError(f"docker-config {path}: not valid JSON ({exc})") from None
    auths = data.get("auths") if isinstance(data, dict) else None
    if not isinstance(auths, dict):
        return {}
    result: dict[str, Credentials] = {}
    for key, entry in auths.items():
        if not isinstance(entry, dict):
            continue
        credentials = _credentials_of(entry)
        if credentials is None:
            continue
        host = key.removeprefix("https://").removeprefix("http://").split("/")[0].lower()
        result[host] = credentials
        if key in _HUB_ALIASES or host in _HUB_ALIASES:
            result["registry-1.docker.io"] = credentials
    return result


def _credentials_of(entry: dict[str, object]) -> Credentials | None:
    username, password = entry.get("username"), entry.get("password")
    if isinstance(username, str) and isinstance(password, str) and username:
        return Credentials(username, password)
    auth = entry.get("auth")
    if isinstance(auth, str) and auth:
        try:
            decoded = base64.b64decode(auth, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
        user, sep, secret = decoded.partition(":")
        if sep and user:
            return Credentials(user, secret)
    return None
