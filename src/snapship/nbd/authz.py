"""Which volumes a TLS client certificate may reach: the authorization file (version 1), the
certificate's identities, and the rule joining them, all without I/O.

A certificate's identities are its subject's common names and its subjectAltName DNS names
(the TLS layer has already checked it was signed by the client CA). A client may use every
export name of a volume (`VOLUME`, `VOLUME@VERSION`) granted to one of its identities, and
nothing else. The handshake applies the rule (`handshake.Handshake`); docs/nbd.md, "TLS",
specifies the file.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

FORMAT = "snapship nbd tls authz"
VERSION = 1
ANY_VOLUME = "*"


class AuthzError(ValueError):
    """The authorization file is not one this version understands; the text says why."""


@dataclass(frozen=True)
class Authz:
    grants: Mapping[str, frozenset[str]]
    """Identity -> the volumes it may reach (`ANY_VOLUME`: every one)."""

    def volumes(self, identities: Iterable[str]) -> frozenset[str]:
        out: frozenset[str] = frozenset()
        for identity in identities:
            out |= self.grants.get(identity, frozenset())
        return out


def export_volume(name: str) -> str:
    """The volume an export name belongs to (`VOLUME` or `VOLUME@VERSION`)."""
    return name.partition("@")[0]


def may_use(volumes: frozenset[str], name: str) -> bool:
    """Whether a client granted `volumes` may use export `name` (the empty name is decided on
    the volume it resolves to, by the caller)."""
    return ANY_VOLUME in volumes or export_volume(name) in volumes


def parse(text: str) -> Authz:
    """The authorization file's content, or AuthzError naming what is wrong."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise AuthzError(f"not JSON: {e}") from None
    if not isinstance(doc, dict):
        raise AuthzError("not a JSON object")
    if doc.get("format") != FORMAT:
        raise AuthzError(f"format is {doc.get('format')!r}, not {FORMAT!r}")
    if doc.get("version") != VERSION:
        raise AuthzError(f"version {doc.get('version')!r} is not supported (only {VERSION})")
    unknown = set(doc) - {"format", "version", "clients"}
    if unknown:
        raise AuthzError(f"unknown key {sorted(unknown)[0]!r}")
    clients = doc.get("clients")
    if not isinstance(clients, list):
        raise AuthzError("'clients' must be a list")
    grants: dict[str, frozenset[str]] = {}
    for i, entry in enumerate(clients):
        where = f"clients[{i}]"
        if not isinstance(entry, dict) or set(entry) != {"client", "volumes"}:
            raise AuthzError(f"{where} must be an object with exactly 'client' and 'volumes'")
        client, volumes = entry["client"], entry["volumes"]
        if not isinstance(client, str) or not client:
            raise AuthzError(f"{where}.client must be a non-empty string")
        if client in grants:
            raise AuthzError(f"{where}: client {client!r} is listed twice")
        if not isinstance(volumes, list) or not all(
                isinstance(v, str) and v and "@" not in v for v in volumes):
            raise AuthzError(f"{where}.volumes must be a list of volume names (or \"*\")")
        grants[client] = frozenset(volumes)
    return Authz(grants)


def identities(peercert: Mapping[str, object] | None) -> frozenset[str]:
    """A verified peer certificate's identities, from `ssl.SSLSocket.getpeercert()`'s form:
    the subject's commonName values and the subjectAltName DNS entries."""
    if not peercert:
        return frozenset()
    out: set[str] = set()
    subject = peercert.get("subject", ())
    assert isinstance(subject, tuple)
    for rdn in subject:
        for key, value in rdn:
            if key == "commonName":
                out.add(value)
    san = peercert.get("subjectAltName", ())
    assert isinstance(san, tuple)
    for kind, value in san:
        if kind == "DNS":
            out.add(value)
    return frozenset(out)
