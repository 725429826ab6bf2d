"""Keys and TLS contexts for relocation (specs/relocation.md, section 1).

:func:`keygen` makes a small CA and one TLS directory per host (``ca.pem``,
``cert.pem``, ``key.pem``); :func:`server_context` / :func:`client_context` build TLS 1.3
contexts that require and verify the peer's certificate against that CA and nothing else.
"""
from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from pathlib import Path

CA_CERT, CA_KEY = "ca.pem", "ca-key.pem"
CERT, KEY = "cert.pem", "key.pem"
CA_DAYS, HOST_DAYS = 3650, 730


class TlsError(Exception):
    """A TLS directory or certificate problem, in one line."""


def _name(common_name: str):
    from cryptography import x509
    from cryptography.x509.oid import NameOID
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "hvm-migrate"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(host: str):
    from cryptography import x509
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _write(path: Path, data: bytes, private: bool = False) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _pem_key(key) -> bytes:
    from cryptography.hazmat.primitives import serialization
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def keygen(directory: str | os.PathLike, hosts: list[str]) -> list[Path]:
    """Make (or reuse) the CA in ``directory`` and a TLS directory ``directory/HOST`` for
    each host; returns the host directories."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID

    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_cert_path, ca_key_path = root / CA_CERT, root / CA_KEY
    if ca_cert_path.exists() and ca_key_path.exists():
        ca_cert = x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
        ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), None)
    else:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_cert = (x509.CertificateBuilder()
                   .subject_name(_name("hvm-migrate CA")).issuer_name(_name("hvm-migrate CA"))
                   .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
                   .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                   .add_extension(x509.KeyUsage(False, False, False, False, False, True, True,
                                                False, False), critical=True)
                   .sign(ca_key, hashes.SHA256()))
        _write(ca_key_path, _pem_key(ca_key), private=True)
        _write(ca_cert_path, ca_cert.public_bytes(serialization.Encoding.PEM))
    made = []
    for host in hosts:
        if not host or "/" in host or host.startswith("."):
            raise TlsError(f"invalid host name {host!r}")
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder()
                .subject_name(_name(host)).issuer_name(ca_cert.subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=HOST_DAYS))
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.SubjectAlternativeName([_san(host)]), critical=False)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                      ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .sign(ca_key, hashes.SHA256()))
        out = root / host
        out.mkdir(exist_ok=True)
        _write(out / KEY, _pem_key(key), private=True)
        _write(out / CERT, cert.public_bytes(serialization.Encoding.PEM))
        _write(out / CA_CERT, ca_cert.public_bytes(serialization.Encoding.PEM))
        made.append(out)
    return made


def _context(purpose, tls_dir: str | os.PathLike) -> ssl.SSLContext:
    tls_dir = Path(tls_dir)
    missing = [leaf for leaf in (CA_CERT, CERT, KEY) if not (tls_dir / leaf).is_file()]
    if missing:
        raise TlsError(f"TLS directory {tls_dir} lacks {', '.join(missing)} "
                       "(make one with: hvm host keygen --dir DIR --hosts NAME)")
    ctx = ssl.SSLContext(purpose)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    try:
        ctx.load_cert_chain(tls_dir / CERT, tls_dir / KEY)
        ctx.load_verify_locations(cafile=tls_dir / CA_CERT)     # this CA only, no system roots
    except (ssl.SSLError, OSError) as exc:
        raise TlsError(f"TLS directory {tls_dir}: {exc}") from None
    return ctx


def server_context(tls_dir: str | os.PathLike) -> ssl.SSLContext:
    """The daemon's side: TLS 1.3, a client certificate from the CA required."""
    return _context(ssl.PROTOCOL_TLS_SERVER, tls_dir)


def client_context(tls_dir: str | os.PathLike) -> ssl.SSLContext:
    """The source's side: TLS 1.3, the daemon's certificate from the CA, naming the host."""
    ctx = _context(ssl.PROTOCOL_TLS_CLIENT, tls_dir)
    ctx.check_hostname = True
    return ctx


__all__ = ["TlsError", "client_context", "keygen", "server_context"]
