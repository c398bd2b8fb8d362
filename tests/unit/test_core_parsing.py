"""Pure parsing: digests, names, tags, sizes, durations, Range and WWW-Authenticate."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2preg.digest import Digest
from p2preg.errors import ConfigError, RegistryError
from p2preg.http_auth import (
    ByteRange,
    RangeNotSatisfiable,
    parse_challenge,
    parse_range,
    parse_retry_after,
)
from p2preg.reference import normalize_docker_hub_name, validate_name, validate_tag
from p2preg.units import DECIMAL_CAP, parse_decimal, parse_duration, parse_size

SHA = "sha256:" + "ab" * 32


def test_digest_round_trip() -> None:
    digest = Digest.parse(SHA)
    assert (digest.algorithm, digest.hex, str(digest)) == ("sha256", "ab" * 32, SHA)
    assert Digest.of_bytes(b"") == Digest.parse(
        "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    )


@pytest.mark.parametrize(
    "text",
    [
        "sha256:" + "AB" * 32,  # upper case hex is not canonical
        "sha256:" + "ab" * 31,
        "sha256:" + "ab" * 33,
        "sha256:../../etc/passwd",
        "md5:" + "ab" * 16,
        "sha256",
        ":" + "ab" * 32,
        "sha256:" + "g" * 64,
    ],
)
def test_bad_digests_are_digest_invalid(text: str) -> None:
    with pytest.raises(RegistryError) as info:
        Digest.parse(text)
    assert info.value.code == "DIGEST_INVALID" and info.value.status == 400


@given(st.text(max_size=200))
def test_digest_parse_never_crashes_and_yields_safe_names(text: str) -> None:
    try:
        digest = Digest.parse(text)
    except RegistryError as exc:
        assert exc.code == "DIGEST_INVALID"
    else:
        assert "/" not in digest.hex and "." not in digest.hex


@pytest.mark.parametrize(
    "name", ["alpine", "library/alpine", "a/b/c", "my-org/my_app", "a.b/c__d", "x-----y"]
)
def test_valid_names(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize(
    "name", ["Alpine", "../etc", "a//b", "/a", "a/", "a..b", "-a", "a_", "a" * 256, "a%2fb", ""]
)
def test_invalid_names(name: str) -> None:
    with pytest.raises(RegistryError) as info:
        validate_name(name)
    assert info.value.code == "NAME_INVALID"


def test_tags() -> None:
    assert validate_tag("v1.2.3-rc_1") == "v1.2.3-rc_1"
    for bad in (".hidden", "-x", "a" * 129, "a/b", ""):
        with pytest.raises(RegistryError):
            validate_tag(bad)


def test_docker_hub_library_prefix() -> None:
    assert normalize_docker_hub_name("alpine") == "library/alpine"
    assert normalize_docker_hub_name("bitnami/redis") == "bitnami/redis"


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("20GiB", 20 * 1024**3),
        ("50MiB", 50 * 1024**2),
        ("1048576", 1048576),
        ("1.5KiB", 1536),
        ("2MB", 2_000_000),
        ("3 g", 3 * 1024**3),
        ("50MiB/s", 50 * 1024**2),
        (7, 7),
    ],
)
def test_sizes(text: str | int, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "abc", "-1", "10XB", "1e9", True, None, -5])
def test_bad_sizes(text: object) -> None:
    with pytest.raises(ConfigError):
        parse_size(text)  # type: ignore[arg-type]


def test_durations() -> None:
    assert parse_duration("5s") == 5.0
    assert parse_duration("250ms") == 0.25
    assert parse_duration("2m") == 120.0
    assert parse_duration(3) == 3.0
    with pytest.raises(ConfigError):
        parse_duration("soon")


@pytest.mark.parametrize(
    ("header", "size", "expected"),
    [
        (None, 100, None),
        ("bytes=0-9", 100, ByteRange(0, 9)),
        ("bytes=90-", 100, ByteRange(90, 99)),
        ("bytes=90-200", 100, ByteRange(90, 99)),
        ("bytes=-10", 100, ByteRange(90, 99)),
        ("bytes=-1000", 100, ByteRange(0, 99)),
        ("bytes=0-0,5-6", 100, None),  # several ranges: serve it whole
        ("items=0-1", 100, None),
        ("bytes=9-3", 100, None),
        ("bytes=x-3", 100, None),
        # str.isdigit() is true for these, int() refuses them: not numbers, ignored
        ("bytes=\u00b2-", 100, None),
        ("bytes=0-\u00b9", 100, None),
        ("bytes=\u0663-", 100, None),  # an Arabic-Indic 3
        # more digits than int() reads: well-formed, and longer than any blob
        ("bytes=0-" + "9" * 5000, 100, ByteRange(0, 99)),
        ("bytes=-" + "9" * 5000, 100, ByteRange(0, 99)),
    ],
)
def test_range(header: str | None, size: int, expected: ByteRange | None) -> None:
    assert parse_range(header, size) == expected


@pytest.mark.parametrize(
    ("header", "size"),
    [("bytes=100-", 100), ("bytes=-0", 100), ("bytes=0-", 0), ("bytes=" + "1" * 5000 + "-", 100)],
)
def test_unsatisfiable_range(header: str, size: int) -> None:
    with pytest.raises(RangeNotSatisfiable):
        parse_range(header, size)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("0", 0),
        ("65535", 65535),
        ("007", 7),
        ("9" * 18, 10**18 - 1),
        ("9" * 19, DECIMAL_CAP),
        ("1" * 5000, DECIMAL_CAP),
        ("", None),
        (" 1", None),
        ("+1", None),
        ("-1", None),
        ("1_000", None),
        ("1.5", None),
        ("\u00b2", None),
        ("\u0663", None),
        ("\uff11", None),  # a fullwidth 1
    ],
)
def test_decimal_fields_are_ascii_digits_and_saturate(text: str, value: int | None) -> None:
    assert parse_decimal(text) == value


@given(st.text(alphabet=st.sampled_from("0123456789\u00b2\u0663-= ,"), max_size=30))
def test_range_of_digits_of_any_script_never_raises_but_unsatisfiable(header: str) -> None:
    try:
        result = parse_range("bytes=" + header, 1000)
    except RangeNotSatisfiable:
        return
    if result is not None:
        assert 0 <= result.start <= result.end < 1000


@given(st.text(max_size=50), st.integers(min_value=0, max_value=10**12))
def test_range_result_is_always_inside_the_content(header: str, size: int) -> None:
    try:
        result = parse_range(header, size)
    except RangeNotSatisfiable:
        return
    if result is not None:
        assert 0 <= result.start <= result.end < size


def test_bearer_challenge() -> None:
    challenge = parse_challenge(
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
        'scope="repository:library/alpine:pull"'
    )
    assert challenge is not None and challenge.scheme == "bearer"
    assert challenge.realm == "https://auth.docker.io/token"
    assert challenge.params["scope"] == "repository:library/alpine:pull"
    basic = parse_challenge('Basic realm="Registry Realm"')
    assert basic is not None and basic.scheme == "basic"
    assert parse_challenge("") is None


@given(st.text(max_size=300))
def test_challenge_parser_never_crashes(header: str) -> None:
    parse_challenge(header)


def test_retry_after() -> None:
    assert parse_retry_after("3", 0.0) == 3.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", 1445412470.0) == 10.0
    assert parse_retry_after("whenever", 0.0) is None
    assert parse_retry_after(None, 0.0) is None
