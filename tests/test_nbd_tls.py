"""TLS: STARTTLS with libnbd's nbds:// and qemu's tls-creds-x509, the 'require' and 'allow'
modes, and client certificates. The test makes its own CA (tests/tlshelp.py)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from snapship.nbd import protocol as p
from tests.clihelp import assert_one_line_error, run_cli
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


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`server/` holds the server's certificate, `client/` a client's with its certificate,
    `anon/` a client's with only the CA (tests/tlshelp.py)."""
    return make_pki(tmp_path_factory.mktemp("pki"), {"client": ("nbd client", ())})


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> NbdRepo:
    return make_test_repo(tmp_path_factory.mktemp("nbd-tls"),
                          [("disk", bytes(image_data(3 << 20, 31))),
                           ("disk", bytes(image_data(3 << 20, 32)))])  # fmt: skip


def tls_args(pki: Path, *extra: str) -> list[str]:
    return server_args(pki, *extra)


def nbds(server: Server, export: str, certs: Path) -> str:
    return f"{server.uri(export, 'nbds')}?tls-certificates={certs}"


@pytest.fixture(scope="module")
def required(repo: NbdRepo, pki: Path, tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[Server]:
    with serve(repo.path, *tls_args(pki), log_dir=tmp_path_factory.mktemp("tls-req")) as s:
        yield s
        s.assert_alive()


def test_required_tls_refuses_plain_clients(repo: NbdRepo, required: Server) -> None:
    assert required.info["tls"] == "require"
    for argv in (["--list", required.uri()], [required.uri("disk")]):
        r = run_tool("nbdinfo", *argv, check=False)
        assert r.returncode != 0 and b"server replied with error" in r.stderr, r.stderr
    c = RawClient(required.port)
    c.greet()
    assert [t for t, _ in c.option(p.OPT_LIST)] == [p.REP_ERR_TLS_REQD]
    assert [t for t, _ in c.option(99)] == [p.REP_ERR_TLS_REQD]
    c.sock.sendall(p.encode_option(p.OPT_EXPORT_NAME, b"disk"))
    assert c.closed_by_server()


def test_libnbd_over_tls_lists_and_copies(repo: NbdRepo, pki: Path, required: Server) -> None:
    listing = json.loads(run_tool("nbdinfo", "--list", "--json",
                                  nbds(required, "", pki / "anon")).stdout)
    assert listing["TLS"] is True
    assert {e["export-name"] for e in listing["exports"]} == {v.name for v in repo.versions}
    for v in repo.versions:
        assert tool_stdout_sha("nbdcopy", nbds(required, v.name, pki / "anon"), "-")[0] == v.sha


def test_qemu_img_over_tls(repo: NbdRepo, pki: Path, required: Server, tmp_path: Path) -> None:
    out = tmp_path / "out.raw"
    v = repo.versions[0]
    run_tool("qemu-img", "convert", "--object",
             f"tls-creds-x509,id=tls0,endpoint=client,dir={pki / 'anon'}", "--image-opts",
             f"driver=nbd,host=127.0.0.1,port={required.port},export={v.name},tls-creds=tls0",
             "-O", "raw", out)  # fmt: skip
    assert out.read_bytes() == v.data


def test_allowed_tls_serves_both(repo: NbdRepo, pki: Path, tmp_path: Path) -> None:
    v = repo.latest("disk")
    with serve(repo.path, *tls_args(pki, "--tls", "allow"), log_dir=tmp_path) as s:
        assert tool_stdout_sha("nbdcopy", s.uri("disk"), "-")[0] == v.sha
        assert tool_stdout_sha("nbdcopy", nbds(s, "disk", pki / "anon"), "-")[0] == v.sha


def test_client_certificates(repo: NbdRepo, pki: Path, tmp_path: Path) -> None:
    v = repo.latest("disk")
    ca = str(pki / "server" / "ca-cert.pem")
    with serve(repo.path, *tls_args(pki, "--tls-client-ca", ca), log_dir=tmp_path) as s:
        r = run_tool("nbdinfo", nbds(s, "disk", pki / "anon"), check=False)
        assert r.returncode != 0  # no client certificate: the TLS handshake fails
        assert tool_stdout_sha("nbdcopy", nbds(s, "disk", pki / "client"), "-")[0] == v.sha
        s.assert_alive()


def test_tls_option_errors(repo: NbdRepo, pki: Path, tmp_path: Path) -> None:
    r = run_cli("nbd", "serve", "--repo", repo.path, "--tls-cert", str(tmp_path / "nope.pem"),
                "--tls-key", str(tmp_path / "nope.key"))
    assert_one_line_error(r, "cannot load the TLS certificate")
    r = run_cli("nbd", "serve", "--repo", repo.path, "--tls", "require")
    assert_one_line_error(r, "--tls", "--tls-cert")
    s = pki / "server"
    r = run_cli("nbd", "serve", "--repo", repo.path, "--tls-cert", s / "server-cert.pem")
    assert_one_line_error(r, "--tls-key")


def test_nbd_client_lists_over_tls(repo: NbdRepo, pki: Path, required: Server) -> None:
    out = run_tool("nbd-client", "-l", "127.0.0.1", str(required.port), "-x",
                   "-A", str(pki / "anon" / "ca-cert.pem")).stdout.decode()
    names = {line.split(":", 1)[0] for line in out.splitlines()[1:] if ":" in line}
    assert names == {"disk"} | {v.name for v in repo.versions}, out


def test_large_writes_over_tls(pki: Path, tmp_path: Path) -> None:
    """32 MiB writes through TLS (the stream reader pauses and resumes the TLS transport),
    committed, then read back over TLS."""
    tr = make_test_repo(tmp_path / "big", [("big", bytes(image_data(64 << 20, 33)))])
    src = tmp_path / "src.img"
    src.write_bytes(bytes(image_data(64 << 20, 34)))
    want = tool_stdout_sha("cat", str(src))[0]
    with serve(tr.path, *tls_args(pki), "--writable", "--commit", log_dir=tmp_path) as s:
        run_tool("nbdcopy", "--request-size=33554432", "--connections=1", src,
                 nbds(s, "big", pki / "anon"))
        deadline = time.monotonic() + 60
        while "committed big@" not in s.log():
            assert time.monotonic() < deadline, s.log()
            time.sleep(0.1)
        assert tool_stdout_sha("nbdcopy", nbds(s, "big", pki / "anon"), "-")[0] == want
        assert tool_stdout_sha("nbdcopy", nbds(s, tr.versions[0].name, pki / "anon"),
                               "-")[0] == tr.versions[0].sha
