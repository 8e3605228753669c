"""The data port's TLS: its server context, from the configured files or a self-signed
certificate made at start-up for `server.tls: auto`."""

from __future__ import annotations

import secrets
import ssl
import tempfile
from datetime import UTC, datetime, timedelta
from functools import partial
from ipaddress import ip_address
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from proxy.config import ServerSettings

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

# Event names keep the listener's prefix: the certificate is the data port's.
log = structlog.get_logger("servegate.listener")

SELF_SIGNED_VALIDITY = timedelta(days=365)


class CertificateError(Exception):
    """The data port's certificate cannot be loaded; the message is the line to show."""


def server_tls_context(settings: ServerSettings) -> ssl.SSLContext | None:
    """The data port's TLS context: from cert_file/key_file, or self-signed for `auto`; None
    for `off`. Raises CertificateError when the files cannot be loaded."""
    if settings.tls == "off":
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    # aiohttp speaks HTTP/1.1 only; saying so spares an h2-capable client a guess.
    context.set_alpn_protocols(["http/1.1"])
    if settings.cert_file is not None and settings.key_file is not None:
        try:
            context.load_cert_chain(
                settings.cert_file, settings.key_file, partial(_no_password, settings.key_file)
            )
        except OSError as exc:  # missing file, unreadable, not PEM, key not matching
            raise CertificateError(
                f"cannot load server.cert_file {settings.cert_file} with server.key_file "
                f"{settings.key_file}: {exc.strerror or exc} (both must be PEM, and the key "
                "must be the certificate's)"
            ) from None
        return context
    _load_self_signed(context)
    return context


def _no_password(key_file: Path) -> bytes:
    # Without a callback OpenSSL would prompt on the terminal and hang start-up.
    raise CertificateError(f"server.key_file {key_file} is encrypted: servegate needs it plain")


def _load_self_signed(context: ssl.SSLContext) -> None:
    # cryptography is imported only here, for `server.tls: auto`: loaded, it costs every
    # process about 8 MiB of memory.
    from cryptography.hazmat.primitives import hashes, serialization

    key, certificate = _self_signed()
    # The ssl module loads keys only from files. The file is private (mode 0600), exists only
    # while it is loaded, and holds the key encrypted with a password that never leaves memory.
    password = secrets.token_bytes(32)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(password),
    ) + certificate.public_bytes(serialization.Encoding.PEM)
    with tempfile.NamedTemporaryFile(suffix=".pem") as file:
        file.write(pem)
        file.flush()
        context.load_cert_chain(file.name, password=password)
    log.warning(
        "listener.self_signed_certificate",
        message="server.tls is auto and no cert_file is set: made a self-signed certificate "
        "for this run; HTTPS clients must skip verification or trust this fingerprint",
        sha256=certificate.fingerprint(hashes.SHA256()).hex(":").upper(),
        valid_until=certificate.not_valid_after_utc.isoformat(),
    )


def _self_signed() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """EC P-256, CN servegate, for localhost and the loopback addresses, valid one year."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "servegate")])
    now = datetime.now(UTC)
    names = [x509.DNSName("localhost")] + [
        x509.IPAddress(ip_address(ip)) for ip in ("127.0.0.1", "::1")
    ]
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))  # a client's clock may be a little behind
        .not_valid_after(now + SELF_SIGNED_VALIDITY)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, certificate
