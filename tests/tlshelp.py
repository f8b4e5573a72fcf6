"""A throwaway PKI for TLS tests, made with the `cryptography` package: a CA, a server
certificate for 127.0.0.1, and client certificates, under the file names libnbd
(`tls-certificates=DIR`) and qemu (`tls-creds-x509,dir=DIR`) look for."""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Mapping, Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))  # fmt: skip


def _cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name | None,
          issuer_key: ec.EllipticCurvePrivateKey, *, ca: bool = False, server: bool = False,
          dns: Sequence[str] = ()) -> x509.Certificate:  # fmt: skip
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = dt.datetime.now(dt.UTC)
    b = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer or name)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=2))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        b = b.add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False,
                                          False), critical=True)
    else:
        b = b.add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False,
                                          False), critical=True)
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    if server:
        names += [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    if names:
        b = b.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def make_pki(root: Path, clients: Mapping[str, tuple[str, Sequence[str]]]) -> Path:
    """Under `root`: `server/` (the server's certificate and key, and the CA), `anon/` (only
    the CA), and for each `clients` entry DIR -> (common name, DNS names) a directory DIR with
    the CA and a client certificate of that identity. Returns `root`."""
    ca_key = _key()
    ca = _cert("snapship test CA", ca_key, None, ca_key, ca=True)
    ca_pem = ca.public_bytes(serialization.Encoding.PEM)
    for d in ("server", "anon", *clients):
        (root / d).mkdir(parents=True)
        (root / d / "ca-cert.pem").write_bytes(ca_pem)
    server_key = _key()
    _write_key(server_key, root / "server" / "server-key.pem")
    (root / "server" / "server-cert.pem").write_bytes(
        _cert("127.0.0.1", server_key, ca.subject, ca_key, server=True).public_bytes(
            serialization.Encoding.PEM))
    for d, (cn, dns) in clients.items():
        key = _key()
        _write_key(key, root / d / "client-key.pem")
        (root / d / "client-cert.pem").write_bytes(
            _cert(cn, key, ca.subject, ca_key, dns=dns).public_bytes(serialization.Encoding.PEM))
    return root


def server_args(pki: Path, *extra: str) -> list[str]:
    """`nbd serve`'s options for the PKI's server certificate."""
    s = pki / "server"
    return ["--tls-cert", str(s / "server-cert.pem"), "--tls-key", str(s / "server-key.pem"),
            *extra]
