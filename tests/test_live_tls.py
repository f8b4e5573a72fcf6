"""Live exports over TLS with client certificates and per-volume authorization
(`--tls-client-ca --tls-authz`), with real clients: qemu-io writes with FUA and flush through
TLS, the server is SIGKILLed and comes back with every acknowledged write, a checkpoint
restores to what was written; a second certificate is refused the first's volume (it does not
even see it listed) and reaches its own."""

from __future__ import annotations

import hashlib
import json
import ssl
import struct
import subprocess
from contextlib import AbstractContextManager
from pathlib import Path

import pytest

from snapship.nbd import authz as az
from snapship.nbd import protocol as p
from tests.clihelp import assert_one_line_error, ok, run_cli
from tests.nbdhelp import (
    NbdRepo,
    RawClient,
    Server,
    image_data,
    make_test_repo,
    run_tool,
    serve,
    tool_stdout_sha,
)
from tests.tlshelp import make_pki, server_args

MiB = 1 << 20
SIZE = 4 * MiB


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # host2 is named by a DNS subjectAltName only; its CN names nothing in the file.
    return make_pki(tmp_path_factory.mktemp("pki"), {
        "host1": ("host1", ()), "host2": ("unlisted", ["host2.example.org"]),
        "stranger": ("stranger", ())})  # fmt: skip


@pytest.fixture
def repo(tmp_path: Path) -> NbdRepo:
    return make_test_repo(tmp_path, [("disk", bytes(image_data(SIZE, 41))),
                                     ("other", bytes(image_data(SIZE, 42)))])  # fmt: skip


def authz_file(tmp_path: Path) -> Path:
    f = tmp_path / "authz.json"
    f.write_text(json.dumps({"format": az.FORMAT, "version": 1, "clients": [
        {"client": "host1", "volumes": ["disk"]},
        {"client": "host2.example.org", "volumes": ["other"]}]}))  # fmt: skip
    return f


def tls_live(repo: NbdRepo, pki: Path, tmp_path: Path,
             state: Path) -> AbstractContextManager[Server]:  # fmt: skip
    return serve(repo.path, "--writable", "--state-dir", str(state),
                 *server_args(pki, "--tls-client-ca", str(pki / "server" / "ca-cert.pem"),
                              "--tls-authz", str(authz_file(tmp_path))),
                 log_dir=tmp_path)  # fmt: skip


def nbds(server: Server, export: str, certs: Path) -> str:
    return f"{server.uri(export, 'nbds')}?tls-certificates={certs}"


def qemu_io(server: Server, export: str, certs: Path,
            *cmds: str) -> subprocess.CompletedProcess[bytes]:  # fmt: skip
    return run_tool("qemu-io", "--object",
                    f"tls-creds-x509,id=tls0,endpoint=client,dir={certs}", "--image-opts",
                    *[a for c in cmds for a in ("-c", c)],
                    f"driver=nbd,host=127.0.0.1,port={server.port},export={export},"
                    "tls-creds=tls0", check=False)  # fmt: skip


def listed(server: Server, certs: Path) -> set[str]:
    """The names NBD_OPT_LIST gives a client with the certificate in `certs`."""
    c = tls_raw(server, certs)
    replies = c.option(p.OPT_LIST)
    c.close()
    assert replies[-1] == (p.REP_ACK, b""), replies
    return {body[4 : 4 + struct.unpack(">I", body[:4])[0]].decode()
            for t, body in replies if t == p.REP_SERVER}


def nbdinfo_listed(server: Server, certs: Path) -> set[str]:
    """What nbdinfo lists: each export's canonical name (a live export's names all have one)."""
    out = json.loads(run_tool("nbdinfo", "--list", "--json", nbds(server, "", certs)).stdout)
    return {e["export-name"] for e in out["exports"]}


def tls_raw(server: Server, certs: Path) -> RawClient:
    """A raw client past STARTTLS, presenting the certificate in `certs`."""
    c = RawClient(server.port)
    c.greet()
    assert c.option(p.OPT_STARTTLS) == [(p.REP_ACK, b"")]
    ctx = ssl.create_default_context(cafile=str(certs / "ca-cert.pem"))
    ctx.load_cert_chain(str(certs / "client-cert.pem"), str(certs / "client-key.pem"))
    c.sock = ctx.wrap_socket(c.sock, server_hostname="127.0.0.1")
    return c


def go_reply(c: RawClient, name: str) -> list[tuple[int, bytes]]:
    raw = name.encode()
    return c.option(p.OPT_GO, struct.pack(">I", len(raw)) + raw + struct.pack(">H", 0))


def test_a_live_export_over_tls_with_client_certificates(repo: NbdRepo, pki: Path,
                                                         tmp_path: Path) -> None:  # fmt: skip
    state = tmp_path / "state"
    disk, other = repo.latest("disk"), repo.latest("other")
    model = bytearray(disk.data)
    cmds = ["write -P 0xab 100 5000", "write -z 64k 128k", "discard 512k 64k", "flush",
            "write -f -P 0xcd 1M 4k"]
    model[100:5100] = b"\xab" * 5000
    model[64 << 10 : 192 << 10] = bytes(128 << 10)
    model[512 << 10 : 576 << 10] = bytes(64 << 10)
    model[MiB : MiB + 4096] = b"\xcd" * 4096
    want = hashlib.sha256(model).hexdigest()
    with tls_live(repo, pki, tmp_path, state) as server:
        r = qemu_io(server, "disk", pki / "host1", *cmds)
        assert r.returncode == 0 and b"failed" not in r.stdout + r.stderr, r
        server.proc.kill()  # no clean stop: what is on disk is all there is
        server.proc.wait()
    with tls_live(repo, pki, tmp_path, state) as server:
        assert tool_stdout_sha("nbdcopy", nbds(server, "disk", pki / "host1"), "-") == (want,
                                                                                         SIZE)
        # A checkpoint from this machine's shell (the control socket is local: no certificate
        # reaches it), restored equal to what was written.
        cp = json.loads(ok(run_cli("nbd", "checkpoint", "disk", "--state-dir", state,
                                   "--json")).stdout)
        assert cp["changed"] is True
        out = tmp_path / "cp.img"
        ok(run_cli("restore", "--repo", repo.path, cp["ref"], out))
        assert hashlib.sha256(out.read_bytes()).hexdigest() == want

        # Each certificate sees and reaches its own volume only; host2 by its DNS name.
        assert listed(server, pki / "host1") == {"disk", *(v.name for v in repo.versions
                                                           if v.volume == "disk"),
                                                 str(cp["ref"])}
        assert listed(server, pki / "host2") == {"other", other.name}
        assert listed(server, pki / "stranger") == set()
        # nbd-client, the mirror leg's client, lists what its certificate may attach (3.24 knows
        # -certfile and -keyfile, not the -F and -K its help names).
        d = pki / "host2"
        listing = run_tool("nbd-client", "-l", "127.0.0.1", str(server.port), "-x",
                       "-A", d / "ca-cert.pem", "-certfile", d / "client-cert.pem",
                       "-keyfile", d / "client-key.pem").stdout.decode()
        assert {line.split(":", 1)[0] for line in listing.splitlines()[1:] if ":" in line} == \
            {"other", other.name}, listing
        assert nbdinfo_listed(server, pki / "host1") == {str(cp["ref"])}
        assert nbdinfo_listed(server, pki / "host2") == {other.name}
        assert tool_stdout_sha("nbdcopy", nbds(server, "other", pki / "host2"), "-")[0] == \
            other.sha
        for name in ("disk", str(cp["ref"]), disk.name):
            r = run_tool("nbdinfo", nbds(server, name, pki / "host2"), check=False)
            assert r.returncode != 0, r
            r = qemu_io(server, name, pki / "host2", "write -P 0xee 0 4k")
            assert r.returncode != 0 and b"wrote" not in r.stdout, r
        # On the wire: the same answer as for an export that does not exist.
        c = tls_raw(server, pki / "host2")
        refused = go_reply(c, "disk")
        missing = go_reply(c, "nope")
        assert [t for t, _ in refused] == [t for t, _ in missing] == [p.REP_ERR_UNKNOWN]
        assert refused[0][1].replace(b"disk", b"nope") == missing[0][1]
        c.sock.sendall(p.encode_option(p.OPT_EXPORT_NAME, b"disk"))
        assert c.closed_by_server()
        c.close()
        # The empty name stands for the only volume only if there is one: not here, and
        # never a way around the rule.
        assert go_reply(tls_raw(server, pki / "host1"), "")[0][0] == p.REP_ERR_UNKNOWN
        assert "refused export 'disk': the client certificate is not granted" in server.log()
        # Nothing host2 tried changed the export.
        assert tool_stdout_sha("nbdcopy", nbds(server, "disk", pki / "host1"), "-")[0] == want
        server.assert_alive()


def test_tls_authz_option_errors(repo: NbdRepo, pki: Path, tmp_path: Path) -> None:
    ca = str(pki / "server" / "ca-cert.pem")
    good = str(authz_file(tmp_path))
    r = run_cli("nbd", "serve", "--repo", repo.path, *server_args(pki, "--tls-authz", good))
    assert_one_line_error(r, "--tls-authz", "--tls-client-ca")
    r = run_cli("nbd", "serve", "--repo", repo.path,
                *server_args(pki, "--tls-client-ca", ca, "--tls-authz", good, "--tls", "allow"))
    assert_one_line_error(r, "--tls-authz", "--tls require")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": az.FORMAT, "version": 2, "clients": []}))
    r = run_cli("nbd", "serve", "--repo", repo.path,
                *server_args(pki, "--tls-client-ca", ca, "--tls-authz", str(bad)))
    assert_one_line_error(r, str(bad), "version 2")
    r = run_cli("nbd", "serve", "--repo", repo.path,
                *server_args(pki, "--tls-client-ca", ca, "--tls-authz", str(tmp_path / "no")))
    assert_one_line_error(r, "cannot read the TLS authorization file")
