"""Per-export authorization of TLS client certificates, in the sans-I/O core: the file format
(`nbd/authz.py`), a certificate's identities, and the handshake's rule (hypothesis): a client
sees and reaches only the volumes granted to its certificate, and what it may not use is
answered byte for byte as an export that does not exist."""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from snapship.nbd import authz as az
from snapship.nbd import protocol as p
from snapship.nbd.handshake import (
    Close,
    ExportInfo,
    Handshake,
    NeedExport,
    NeedList,
    Reply,
    StartTls,
    Step,
    TlsMode,
    Transmit,
)

VOLUMES = ["root", "home", "db", "root2"]  # "root2" shares a prefix with "root"
IDENTITIES = ["host1", "host2", "backup.example.org", "admin"]


def doc(*clients: dict[str, object], **extra: object) -> str:
    return json.dumps({"format": az.FORMAT, "version": 1, "clients": list(clients), **extra})


def test_the_file_is_parsed_and_what_it_grants() -> None:
    a = az.parse(doc({"client": "host1", "volumes": ["root", "home"]},
                     {"client": "admin", "volumes": ["*"]}))  # fmt: skip
    assert a.volumes(["host1"]) == {"root", "home"}
    assert a.volumes(["host1", "nobody"]) == {"root", "home"}
    assert a.volumes(["nobody"]) == frozenset()
    assert az.may_use(a.volumes(["admin"]), "anything@v1")
    assert az.may_use(a.volumes(["host1"]), "root@20261201-1200")
    assert not az.may_use(a.volumes(["host1"]), "root2")


@pytest.mark.parametrize(("text", "message"), [
    ("{", "not JSON"),
    ("[]", "not a JSON object"),
    (json.dumps({"format": "x", "version": 1, "clients": []}), "format"),
    (json.dumps({"format": az.FORMAT, "version": 2, "clients": []}), "version 2"),
    (doc(extra=1), "unknown key 'extra'"),
    (json.dumps({"format": az.FORMAT, "version": 1, "clients": {}}), "'clients' must be a list"),
    (doc({"client": "a"}), "clients[0] must be an object"),
    (doc({"client": "a", "volumes": [], "x": 1}), "clients[0] must be an object"),
    (doc({"client": "", "volumes": []}), "clients[0].client"),
    (doc({"client": "a", "volumes": "root"}), "clients[0].volumes"),
    (doc({"client": "a", "volumes": ["root@v1"]}), "clients[0].volumes"),
    (doc({"client": "a", "volumes": [""]}), "clients[0].volumes"),
    (doc({"client": "a", "volumes": []}, {"client": "a", "volumes": ["x"]}), "listed twice"),
])  # fmt: skip
def test_files_this_version_does_not_understand_are_refused(text: str, message: str) -> None:
    with pytest.raises(az.AuthzError, match=message.replace("[", r"\[").replace("]", r"\]")):
        az.parse(text)


def test_a_certificates_identities_are_its_common_names_and_dns_names() -> None:
    # ssl.SSLSocket.getpeercert()'s form of a verified certificate
    cert = {"subject": ((("countryName", "DE"),), (("commonName", "host1"),),
                        (("organizationName", "x"),)),
            "subjectAltName": (("DNS", "host1.example.org"), ("IP Address", "10.0.0.1"),
                               ("email", "root@host1"))}  # fmt: skip
    assert az.identities(cert) == {"host1", "host1.example.org"}
    assert az.identities(None) == frozenset()
    assert az.identities({}) == frozenset()


# -- the handshake's rule ---------------------------------------------------------------------


def info(name: str) -> ExportInfo:
    return ExportInfo(name, 1 << 20, False, f"{name}, a test export")


def exports() -> list[tuple[str, str]]:
    return [e for v in VOLUMES for e in [(v, "newest"), (f"{v}@v1", "one"), (f"{v}@v2", "two")]]


def info_request(name: str) -> bytes:
    raw = name.encode()
    return struct.pack(">I", len(raw)) + raw + struct.pack(">H", 0)


def meta_request(name: str) -> bytes:
    raw = name.encode()
    q = p.META_BASE_ALLOCATION.encode()
    return struct.pack(">I", len(raw)) + raw + struct.pack(">II", 1, len(q)) + q


def under_tls(authz: az.Authz | None, identities: frozenset[str]) -> Handshake:
    hs = Handshake(TlsMode.REQUIRE, authz=authz)
    hs.client_flags(struct.pack(">I", p.CLIENT_FIXED_NEWSTYLE))
    assert isinstance(hs.option(p.OPT_STARTTLS, b""), StartTls)
    hs.tls_started(identities)
    assert isinstance(hs.option(p.OPT_STRUCTURED_REPLY, b""), Reply)
    return hs


def ask(hs: Handshake, option: int, name: str, found: bool) -> tuple[Step, bool]:
    """The answer to `option` naming `name`, served by a repository that holds it if `found`;
    and whether the handshake asked the repository at all."""
    data = {p.OPT_EXPORT_NAME: name.encode(), p.OPT_INFO: info_request(name),
            p.OPT_GO: info_request(name), p.OPT_LIST_META_CONTEXT: meta_request(name),
            p.OPT_SET_META_CONTEXT: meta_request(name)}[option]
    step = hs.option(option, data)
    if not isinstance(step, NeedExport):
        return step, False
    return hs.resolved(info(f"{name or VOLUMES[0]}@v1") if found else None), True


grants = st.dictionaries(st.sampled_from(IDENTITIES),
                         st.lists(st.sampled_from([*VOLUMES, "*"]), max_size=3))  # fmt: skip
OPTIONS = [p.OPT_EXPORT_NAME, p.OPT_INFO, p.OPT_GO, p.OPT_LIST_META_CONTEXT,
           p.OPT_SET_META_CONTEXT]


@settings(max_examples=150, deadline=None)
@given(grants, st.frozensets(st.sampled_from([*IDENTITIES, "stranger"])),
       st.sampled_from(OPTIONS), st.sampled_from([*[n for n, _ in exports()], "", "gone"]))
def test_a_client_reaches_only_what_its_certificate_is_granted(
    table: dict[str, list[str]], ids: frozenset[str], option: int, name: str
) -> None:
    authz = az.Authz({k: frozenset(v) for k, v in table.items()})
    granted = {v for i in ids for v in table.get(i, [])}
    allowed = {v for v in VOLUMES if v in granted or "*" in granted}

    hs = under_tls(authz, ids)
    assert hs.option(p.OPT_LIST, b"") == NeedList()
    listed = hs.listed(exports())
    assert isinstance(listed, Reply)
    listed_names = {body[4 : 4 + struct.unpack(">I", body[:4])[0]].decode()
                    for _, t, body in _replies(listed.data) if t == p.REP_SERVER}
    assert listed_names == {n for n, _ in exports() if n.partition("@")[0] in allowed}

    volume = (name or VOLUMES[0]).partition("@")[0]  # the empty name: the only volume's
    exists = name != "gone"
    step, looked_up = ask(under_tls(authz, ids), option, name, exists)
    # The same question to a server that lets everyone in, about an export that is not there.
    absent, _ = ask(under_tls(None, frozenset()), option, name, False)
    if exists and volume in allowed:
        assert looked_up
        assert isinstance(step, Transmit if option in (p.OPT_EXPORT_NAME, p.OPT_GO) else Reply)
        if isinstance(step, Reply):
            assert all(t < p.REP_ERR_UNSUP for _, t, _ in _replies(step.data)), step
    else:
        assert step == absent, (step, absent)  # nothing tells it from a missing export
        if option == p.OPT_EXPORT_NAME:
            assert isinstance(step, Close)
        else:
            assert isinstance(step, Reply)
            assert [t for _, t, _ in _replies(step.data)] == [p.REP_ERR_UNKNOWN]
        if name and not ("*" in granted or volume in granted):
            assert not looked_up  # refused on the name, before the repository is asked


def _replies(data: bytes) -> list[tuple[int, int, bytes]]:
    out = []
    while data:
        opt, rtype, n = p.parse_option_reply_header(data[: p.OPTION_REPLY_HEADER_SIZE])
        out.append((opt, rtype, data[p.OPTION_REPLY_HEADER_SIZE : p.OPTION_REPLY_HEADER_SIZE + n]))
        data = data[p.OPTION_REPLY_HEADER_SIZE + n :]
    return out


def test_an_authorization_needs_tls_required() -> None:
    authz = az.parse(doc())
    for mode in (TlsMode.OFF, TlsMode.ALLOW):
        with pytest.raises(ValueError, match="TLS required"):
            Handshake(mode, authz=authz)
    hs = Handshake(TlsMode.REQUIRE, authz=authz)
    assert not hs.may_use("root")  # before TLS nothing, whatever the grants
