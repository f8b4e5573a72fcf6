"""The HTTP API's wire format, version 1 (docs/http-api.md), shared by server and client.

Paths, header names, limits, error codes with their statuses, and the JSON bodies with strict
decoders: a body with a missing, extra or mistyped field is rejected (`WireError`), never
guessed at. No I/O here.
"""

from __future__ import annotations

import ipaddress
import json
from typing import Any

from snapship.formats.json_bounded import load_object

API_VERSION = 1
API_HEADER = "Snapship-API"
API_ROOT = f"/v{API_VERSION}"
REPOS_SEGMENT = "repos"

MAX_MISSING_KEYS = 1000
MAX_LIST_LIMIT = 10000
DEFAULT_MAX_OBJECT_SIZE = 256 << 20
MAX_JSON_BODY = 16 << 20
"""Any JSON body but a maintenance report: a list page of 10000 keys is about 1 MB."""
MAX_REPORT_BODY = 256 << 20
"""A maintenance report names every bad chunk it found, so it may be long."""
JSON_TYPE = "application/json"
OBJECT_TYPE = "application/octet-stream"

# Endpoints below a repository's path.
OBJECTS = "objects"
LIST = "list"
MISSING = "missing"
RENAME = "rename"
FLUSH = "flush"
MAINTENANCE = "maintenance"
MAINTENANCE_TASKS = ("verify", "gc")

# Error codes and the status each is sent with.
BAD_REQUEST = "bad-request"
BAD_KEY = "bad-key"
UNAUTHORIZED = "unauthorized"
FORBIDDEN = "forbidden"
SET_ASIDE = "set-aside"
NOT_FOUND = "not-found"
NO_REPOSITORY = "no-repository"
CONFLICT = "conflict"
UNSUPPORTED_VERSION = "unsupported-api-version"
NO_SUCH_ENDPOINT = "no-such-endpoint"
METHOD_NOT_ALLOWED = "method-not-allowed"
LENGTH_REQUIRED = "length-required"
TOO_LARGE = "too-large"
STORAGE_FAILED = "storage-failed"
INTERNAL = "internal"
BUSY = "busy"

STATUS = {
    BAD_REQUEST: 400,
    BAD_KEY: 400,
    UNAUTHORIZED: 401,
    FORBIDDEN: 403,
    SET_ASIDE: 403,
    NOT_FOUND: 404,
    NO_REPOSITORY: 404,
    CONFLICT: 409,
    UNSUPPORTED_VERSION: 404,
    NO_SUCH_ENDPOINT: 404,
    METHOD_NOT_ALLOWED: 405,
    LENGTH_REQUIRED: 411,
    TOO_LARGE: 413,
    STORAGE_FAILED: 500,
    INTERNAL: 500,
    BUSY: 503,
}

RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
"""Statuses a client retries: the server (or a proxy in front of it) may answer next time."""


class WireError(ValueError):
    """A body or header that is not what this version of the API says it must be."""


def is_loopback(host: str) -> bool:
    """Plain http is only for hosts that cannot be reached from another machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def repo_path(prefix: str, name: str) -> str:
    return f"{prefix}{API_ROOT}/{REPOS_SEGMENT}/{name}"


def api_versions(header: str | None) -> set[int] | None:
    """The versions a `Snapship-API` header lists; None without the header."""
    if header is None:
        return None
    out = set()
    for part in header.split(","):
        part = part.strip()
        if part.isdigit():
            out.add(int(part))
    return out


def _dump(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def _object(body: bytes, what: str, max_bytes: int = MAX_JSON_BODY) -> dict[str, Any]:
    return load_object(body, what, max_bytes, error=WireError)


def _load(body: bytes, fields: dict[str, type | tuple[type, ...]], what: str) -> dict[str, Any]:
    return _checked(_object(body, what), fields, what)


def _checked(obj: dict[str, Any], fields: dict[str, type | tuple[type, ...]], what: str
             ) -> dict[str, Any]:
    missing = [f for f in fields if f not in obj]
    extra = sorted(set(obj) - set(fields))
    if missing or extra:
        raise WireError(f"{what}: " + ", ".join(
            [f"missing field {f!r}" for f in missing] + [f"unknown field {f!r}" for f in extra]))
    for name, kind in fields.items():
        value = obj[name]
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
            raise WireError(f"{what}: field {name!r} has the wrong type")
    return obj


def _strings(value: list[Any], what: str) -> list[str]:
    if not all(isinstance(v, str) for v in value):
        raise WireError(f"{what} must be a list of strings")
    return value


# -- errors ---------------------------------------------------------------------------------


def encode_error(code: str, message: str) -> bytes:
    return _dump({"error": {"code": code, "message": message}})


def decode_error(body: bytes) -> tuple[str, str] | None:
    """(code, message) of an error body; None if the body is not one (e.g. from a proxy)."""
    try:
        outer = _load(body, {"error": dict}, "error body")
        inner = _load(_dump(outer["error"]), {"code": str, "message": str}, "error body")
    except WireError:
        return None
    return inner["code"], " ".join(inner["message"].split())


# -- requests and replies -------------------------------------------------------------------


def encode_whoami(repository: str, token: str, role: str) -> bytes:
    return _dump({"repository": repository, "token": token, "role": role})


def decode_whoami(body: bytes) -> tuple[str, str, str]:
    d = _load(body, {"repository": str, "token": str, "role": str}, "repository reply")
    return d["repository"], d["token"], d["role"]


def encode_list_page(objects: list[tuple[str, int]], after: str | None) -> bytes:
    return _dump({"objects": [[k, n] for k, n in objects], "next": after})


def decode_list_page(body: bytes) -> tuple[list[tuple[str, int]], str | None]:
    d = _load(body, {"objects": list, "next": (str, type(None))}, "list reply")
    out = []
    for item in d["objects"]:
        if (not isinstance(item, list) or len(item) != 2 or not isinstance(item[0], str)
                or not isinstance(item[1], int) or isinstance(item[1], bool) or item[1] < 0):
            raise WireError("list reply: an entry is not [key, size]")
        out.append((item[0], item[1]))
    return out, d["next"]


def encode_missing_request(keys: list[str]) -> bytes:
    return _dump({"keys": keys})


def decode_missing_request(body: bytes) -> list[str]:
    keys = _strings(_load(body, {"keys": list}, "missing request")["keys"], "keys")
    if not 1 <= len(keys) <= MAX_MISSING_KEYS:
        raise WireError(f"missing request: give 1 to {MAX_MISSING_KEYS} keys, not {len(keys)}")
    return keys


def encode_missing_reply(missing: list[str], present: list[tuple[str, int]]) -> bytes:
    return _dump({"missing": missing, "present": [[k, n] for k, n in present]})


def decode_missing_reply(body: bytes) -> tuple[list[str], list[tuple[str, int]]]:
    d = _load(body, {"missing": list, "present": list}, "missing reply")
    present = []
    for item in d["present"]:
        if (not isinstance(item, list) or len(item) != 2 or not isinstance(item[0], str)
                or not isinstance(item[1], int) or isinstance(item[1], bool) or item[1] < 0):
            raise WireError("missing reply: a present entry is not [key, size]")
        present.append((item[0], item[1]))
    return _strings(d["missing"], "missing"), present


def encode_rename(src: str, dst: str) -> bytes:
    return _dump({"from": src, "to": dst})


def decode_rename(body: bytes) -> tuple[str, str]:
    d = _load(body, {"from": str, "to": str}, "rename request")
    return d["from"], d["to"]


def encode_json(obj: dict[str, Any]) -> bytes:
    return _dump(obj)


def decode_options(body: bytes, allowed: dict[str, type | tuple[type, ...]], what: str
                   ) -> dict[str, Any]:
    """A JSON object whose fields are all optional but must be known and well typed."""
    if not body.strip():
        return {}
    obj = _object(body, what)
    if set(obj) - set(allowed):
        raise WireError(f"{what}: unknown field {sorted(set(obj) - set(allowed))[0]!r}")
    return _checked(obj, {k: allowed[k] for k in obj}, what)


def decode_report(body: bytes, what: str) -> dict[str, Any]:
    return _object(body, what, MAX_REPORT_BODY)
