"""`formats/json_bounded.py` and its users: JSON from storage or the network is bounded in size
and depth, and anything else is refused with the reader's own error, never a crash."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from snapship.errors import FormatError
from snapship.formats import http_api as api
from snapship.formats.config import decode_config, decode_keyfile
from snapship.formats.constants import MAX_JSON_DEPTH
from snapship.formats.json_bounded import depth, load_object
from snapship.repository import catalog
from snapship.storage.memory import MemoryStorage

DEEP = 100_000

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=30,
)


def nested(levels: int, leaf: str = "1") -> str:
    """An object holding lists `levels` deep in all."""
    return '{"x":' + "[" * (levels - 1) + leaf + "]" * (levels - 1) + "}"


def reference_depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max(map(reference_depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(reference_depth, value), default=0)
    return 0


@given(json_values)
def test_depth_matches_the_recursive_definition(value: Any) -> None:
    assert depth(value) == reference_depth(value)


@given(st.dictionaries(st.text(), json_values, max_size=5))
def test_objects_within_the_limits_load_as_json_loads_them(obj: dict[str, Any]) -> None:
    text = json.dumps(obj)
    assert load_object(text.encode(), "x", len(text.encode()), reference_depth(obj)) == obj


@settings(max_examples=300)
@given(st.binary(max_size=200) | st.text(alphabet="[]{}\":,01 a", max_size=200).map(str.encode))
def test_any_bytes_load_or_raise_the_readers_error(data: bytes) -> None:
    try:
        obj = load_object(data, "x", 100, 3)
    except FormatError as e:
        assert str(e).startswith("x ") and "\n" not in str(e)
    else:
        assert isinstance(obj, dict) and depth(obj) <= 3 and len(data) <= 100


def test_depth_limit_is_exact() -> None:
    assert load_object(nested(5), "x", 1000, 5) == json.loads(nested(5))
    with pytest.raises(FormatError, match="x is nested more than 4 levels deep"):
        load_object(nested(5), "x", 1000, 4)


@pytest.mark.parametrize("kind", ["[", "{\"a\":"])
def test_100000_levels_are_refused_in_one_line(kind: str) -> None:
    text = '{"a":' + kind * DEEP + "1" + ("]" if kind == "[" else "}") * DEEP + "}"
    with pytest.raises(FormatError, match=f"nested more than {MAX_JSON_DEPTH} levels"):
        load_object(text.encode(), "x", 10 << 20)


@pytest.mark.parametrize(("data", "message"), [
    (b"x" * 101, "too large"), (b"[1]", "not a JSON object"), (b"\xff", "not valid JSON"),
    (b'{"a": 1' + b"2" * 5000 + b"}", "not valid JSON"), (b"", "not valid JSON")])
def test_other_refusals(data: bytes, message: str) -> None:
    with pytest.raises(FormatError, match=message):
        load_object(data, "x", 100 if message == "too large" else 10_000)


def test_the_caller_picks_the_error() -> None:
    with pytest.raises(api.WireError, match="body is nested"):
        load_object(nested(50).encode(), "body", 1000, 8, error=api.WireError)


# -- users --------------------------------------------------------------------------------------


def test_config_and_key_file_refuse_deep_and_huge_json() -> None:
    for decode in (decode_config, decode_keyfile):
        with pytest.raises(FormatError, match="nested more than"):
            decode(nested(20_000).encode())  # 40 KB: within the size cap
        with pytest.raises(FormatError, match="too large"):
            decode(b" " * (1 << 20) + b"{}")


HTTP_DECODERS = [
    api.decode_missing_request,
    api.decode_missing_reply,
    api.decode_rename,
    api.decode_whoami,
    api.decode_list_page,
    lambda body: api.decode_options(body, {"deep": bool}, "verify options"),
    lambda body: api.decode_report(body, "verify report"),
]


@pytest.mark.parametrize("decode", HTTP_DECODERS)
def test_http_bodies_nested_100000_levels_are_a_wire_error(decode: Any) -> None:
    with pytest.raises(api.WireError, match="nested more than"):
        decode(nested(DEEP).encode())
    with pytest.raises(api.WireError, match="nested more than"):
        decode(('{"keys":' + nested(DEEP) + "}").encode())


def test_http_bodies_are_bounded_in_size() -> None:
    huge = b'{"keys": ["' + b"k" * api.MAX_JSON_BODY + b'"]}'
    with pytest.raises(api.WireError, match="too large"):
        api.decode_missing_request(huge)


def test_deep_error_body_is_not_an_error_body() -> None:
    assert api.decode_error(nested(DEEP).encode()) is None
    assert api.decode_error(('{"error":' + nested(DEEP) + "}").encode()) is None
    assert api.decode_error(api.encode_error("busy", "try again")) == ("busy", "try again")


def test_a_deep_damage_marker_still_marks_the_version_damaged() -> None:
    storage = MemoryStorage()
    storage.put("damaged/disk/v1", nested(DEEP).encode())
    cat = catalog.Catalog(storage)
    cat.mark_damaged("disk", "v2", ["ab"], deep=False)
    marks = cat.damaged()
    assert marks[("disk", "v1")] == catalog.DamageMark([], True)
    assert marks[("disk", "v2")] == catalog.DamageMark(["ab"], False)
