"""Local PKI of the embedded atServer: a private CA and the server certificate it signs.

Owns the files ``<state>/ca.pem`` + ``ca.key`` and ``<state>/server.pem`` + ``server.key``:
generated on first start, reused afterwards, the server certificate re-issued when the host it
must name changes or it nears expiry.  Clients trust ``ca.pem`` (our AtClient via ``--ca-file``,
atsdk via ``SSL_CERT_FILE``).  Nothing here opens sockets; :func:`server_ssl_context` only builds
the ``ssl.SSLContext`` the listeners use.

P-256 keys: TLS handshakes with ECDSA cost a fraction of RSA-2048 on this 2-core machine, and
every client we talk to (OpenSSL, Dart, at_c's mbedTLS) accepts them.
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["Pki", "ensure_pki", "server_ssl_context"]

CA_DAYS = 3650
SERVER_DAYS = 825
# Re-issue the server certificate when fewer days than this remain.
RENEW_DAYS = 30
# Names every server certificate carries, whatever --host says, so local clients always work.
ALWAYS_DNS = ("localhost",)
ALWAYS_IP = ("127.0.0.1", "::1")


@dataclass(frozen=True)
class Pki:
    ca_file: Path
    cert_file: Path
    key_file: Path


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def _write_private(path: Path, data: bytes) -> None:
    """Write a secret file with mode 0600 from the start (no window where it is world-readable)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _write_public(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _san_names(host: str) -> tuple[list[str], list[str]]:
    dns = list(ALWAYS_DNS)
    ips = list(ALWAYS_IP)
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        if host and host not in dns:
            dns.append(host)
    else:
        if str(ip) not in ips:
            ips.append(str(ip))
    return dns, ips


def _make_ca(state: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "noports atserver local CA"),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "noports")])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(minutes=5))
        .not_valid_after(now + _dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_private(state / "ca.key", _key_pem(key))
    _write_public(state / "ca.pem", cert.public_bytes(serialization.Encoding.PEM))
    return cert, key


def _load_ca(state: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None:
    try:
        cert = x509.load_pem_x509_certificate((state / "ca.pem").read_bytes())
        key = serialization.load_pem_private_key((state / "ca.key").read_bytes(), None)
    except (OSError, ValueError):
        return None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        return None
    return cert, key


def _server_cert_ok(state: Path, ca: x509.Certificate, host: str) -> bool:
    try:
        cert = x509.load_pem_x509_certificate((state / "server.pem").read_bytes())
        serialization.load_pem_private_key((state / "server.key").read_bytes(), None)
    except (OSError, ValueError):
        return False
    if cert.issuer != ca.subject:
        return False
    if cert.not_valid_after_utc - _now() < _dt.timedelta(days=RENEW_DAYS):
        return False
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    have_dns = set(san.get_values_for_type(x509.DNSName))
    have_ip = {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    dns, ips = _san_names(host)
    return set(dns) <= have_dns and set(ips) <= have_ip


def _make_server_cert(state: Path, ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey,
                      host: str) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    dns, ips = _san_names(host)
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host or "localhost")]))
        .issuer_name(ca.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(minutes=5))
        .not_valid_after(now + _dt.timedelta(days=SERVER_DAYS))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        # clientAuth too: server-to-server connections present this certificate as a client.
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                              ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write_private(state / "server.key", _key_pem(key))
    _write_public(state / "server.pem", cert.public_bytes(serialization.Encoding.PEM))


def ensure_pki(state_dir: str | os.PathLike, host: str) -> Pki:
    """Create (or reuse) the CA and a server certificate naming ``host`` in ``state_dir``."""
    state = Path(state_dir)
    state.mkdir(parents=True, exist_ok=True)
    loaded = _load_ca(state)
    if loaded is None:
        ca, ca_key = _make_ca(state)
    else:
        ca, ca_key = loaded
    if not _server_cert_ok(state, ca, host):
        _make_server_cert(state, ca, ca_key, host)
    return Pki(ca_file=state / "ca.pem", cert_file=state / "server.pem",
               key_file=state / "server.key")


def server_ssl_context(pki: Pki) -> ssl.SSLContext:
    """TLS >= 1.2 server context presenting the server certificate; no client certificate asked.

    (The Dart server requests but does not require one; only server-to-server ``from`` uses it,
    which a later issue adds.)
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(pki.cert_file), str(pki.key_file))
    return ctx
