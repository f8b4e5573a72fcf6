"""https:// with a self-signed CA made in the test: trusted when the client is given the CA
(--ca or SNAPSHIP_CA), refused at once (no retrying) when it is not."""

from __future__ import annotations

import datetime as dt
import ipaddress
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from snapship.errors import StorageError
from tests.clihelp import (
    CHUNK,
    assert_one_line_error,
    describe,
    image_bytes,
    sha256_file,
    write_image,
)
from tests.serverproc import (
    ServerProc,
    create_repo_fast_kdf,
    http_storage,
    run_cli_env,
    running_server,
    token_files,
)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca_and_server_cert(directory: Path) -> tuple[Path, Path, Path]:
    """(CA certificate, server certificate, server key) as PEM files; the server certificate
    is for 127.0.0.1 and localhost."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name("snapship test CA"))
          .issuer_name(_name("snapship test CA")).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(minutes=5))
          .not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(_name("127.0.0.1"))
            .issuer_name(ca.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
                critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    directory.mkdir(parents=True, exist_ok=True)
    ca_path, cert_path, key_path = (directory / n for n in ("ca.pem", "cert.pem", "key.pem"))
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return ca_path, cert_path, key_path


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[tuple[ServerProc, dict[str, str], Path]]:
    tmp = tmp_path_factory.mktemp("tls")
    ca, cert, key = make_ca_and_server_cert(tmp / "pki")
    with running_server(tmp / "srv", tls=(cert, key)) as (server, tokens):
        assert server.base_url.startswith("https://127.0.0.1:")
        yield server, tokens, ca


def test_https_backup_and_restore_with_the_ca_given(
        tls_server: tuple[ServerProc, dict[str, str], Path], tmp_path: Path) -> None:
    server, tokens, ca = tls_server
    files = token_files(tmp_path / "tokens", tokens)
    create_repo_fast_kdf(http_storage(server, "tls1", tokens["db1-backup"], ca=ca))
    img = tmp_path / "disk.img"
    sha = write_image(img, image_bytes(40 * CHUNK + 99, seed=11, zero_chunks=[3, 4]))
    url = server.url("tls1")
    r = run_cli_env("backup", "--repo", url, img, "--volume", "disk", "--ca", ca,
                    "--token-file", files["db1-backup"])
    assert r.returncode == 0, describe(r)
    out = tmp_path / "out.img"
    r = run_cli_env("restore", "--repo", url, "disk", out,
                    env={"SNAPSHIP_CA": str(ca), "SNAPSHIP_TOKEN": tokens["restorer"]})
    assert r.returncode == 0, describe(r)
    assert sha256_file(out) == sha
    # Objects bigger than one TLS record and than the server's streaming piece.
    s = http_storage(server, "tls1", tokens["ops"], ca=ca)
    big = bytes(range(256)) * (5 * 4096 + 7)
    s.put("big/object", big)
    assert s.get("big/object") == big


def test_untrusted_certificate_is_refused_at_once(
        tls_server: tuple[ServerProc, dict[str, str], Path], tmp_path: Path) -> None:
    server, tokens, _ca = tls_server
    started = time.monotonic()
    r = run_cli_env("versions", "--repo", server.url("tls1"),
                    env={"SNAPSHIP_TOKEN": tokens["restorer"], "SNAPSHIP_RETRY_TIME": "30"})
    assert_one_line_error(r, server.url("tls1"), "certificate", "--ca")
    assert time.monotonic() - started < 10  # not retried for the 30 s allowed
    with pytest.raises(StorageError, match="CERTIFICATE_VERIFY_FAILED"):
        http_storage(server, "tls1", tokens["restorer"]).get("config")
    other_ca, _c, _k = make_ca_and_server_cert(tmp_path / "other")
    with pytest.raises(StorageError, match="CERTIFICATE_VERIFY_FAILED"):
        http_storage(server, "tls1", tokens["restorer"], ca=other_ca).get("config")


def test_plain_http_to_the_tls_port_fails_cleanly(
        tls_server: tuple[ServerProc, dict[str, str], Path]) -> None:
    server, tokens, _ca = tls_server
    url = server.url("tls1").replace("https://", "http://")
    r = run_cli_env("versions", "--repo", url,
                    env={"SNAPSHIP_TOKEN": tokens["restorer"], "SNAPSHIP_RETRY_TIME": "1"})
    assert_one_line_error(r, url, "this server speaks https")
