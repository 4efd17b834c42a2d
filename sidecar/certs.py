"""The CA that intercepted TLS is signed with, and the leaf certificates minted from it.

Leaves are ECDSA P-256 (cheap to sign and to verify), carry the subject and authority key
identifiers that strict verifiers (Python 3.13+, Go) require, live a short time and are
cached with their ``ssl.SSLContext`` so a TLS handshake costs one lookup.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import ssl
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

log = logging.getLogger("keyhole.certs")

CA_CERT_FILE = "tls.crt"
CA_KEY_FILE = "tls.key"
LEAF_VALIDITY = dt.timedelta(hours=24)
LEAF_RENEW_BEFORE = dt.timedelta(hours=1)
CLOCK_SKEW = dt.timedelta(minutes=5)


class CAError(ValueError):
    """The CA files are missing, unreadable or not a usable CA."""


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True)
class CertificateAuthority:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @classmethod
    def generate(cls, common_name: str = "keyhole local CA",
                 validity: dt.timedelta = dt.timedelta(days=365)) -> CertificateAuthority:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "keyhole"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ])
        now = _now()
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name).issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW).not_valid_after(now + validity)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(ski, critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                           critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(cert, key)

    @classmethod
    def load(cls, ca_dir: Path) -> CertificateAuthority:
        """Load ``tls.crt``/``tls.key``; the first certificate in ``tls.crt`` signs."""
        try:
            cert_pem = (ca_dir / CA_CERT_FILE).read_bytes()
            key_pem = (ca_dir / CA_KEY_FILE).read_bytes()
        except OSError as exc:
            raise CAError(f"cannot read the CA in {ca_dir}: {exc.strerror}: {exc.filename}") from None
        try:
            cert = x509.load_pem_x509_certificates(cert_pem)[0]
            key = serialization.load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError, IndexError) as exc:
            raise CAError(f"the CA in {ca_dir} is not a PEM certificate and unencrypted key: "
                          f"{exc}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise CAError(f"the CA key in {ca_dir} must be an EC key (P-256)")
        if cert.public_key().public_numbers() != key.public_key().public_numbers():
            raise CAError(f"{ca_dir / CA_KEY_FILE} is not the key of {ca_dir / CA_CERT_FILE}")
        try:
            constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            constraints = None
        if constraints is None or not constraints.ca:
            raise CAError(f"{ca_dir / CA_CERT_FILE} is not a CA certificate (basicConstraints)")
        if cert.not_valid_after_utc <= _now():
            raise CAError(f"the CA in {ca_dir} expired on {cert.not_valid_after_utc:%Y-%m-%d}")
        return cls(cert, key)

    @classmethod
    def load_or_create(cls, ca_dir: Path) -> CertificateAuthority:
        """Standalone use: create a CA on first start, then keep using it."""
        if (ca_dir / CA_CERT_FILE).exists() or (ca_dir / CA_KEY_FILE).exists():
            return cls.load(ca_dir)
        ca = cls.generate()
        ca.save(ca_dir)
        log.info("created a new keyhole CA in %s; clients must trust %s", ca_dir,
                 ca_dir / CA_CERT_FILE)
        return ca

    def save(self, ca_dir: Path) -> None:
        try:
            ca_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            key_pem = self.key.private_bytes(serialization.Encoding.PEM,
                                             serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption())
            key_path = ca_dir / CA_KEY_FILE
            fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(key_pem)
            (ca_dir / CA_CERT_FILE).write_bytes(self.cert_pem)
        except OSError as exc:
            raise CAError(f"cannot create a CA in {ca_dir}: {exc.strerror}") from None


def ca_fingerprint(ca_dir: Path) -> bytes:
    """What the CA files hold now (Kubernetes swaps them through a ``..data`` symlink)."""
    try:
        return (ca_dir / CA_CERT_FILE).read_bytes() + b"\0" + (ca_dir / CA_KEY_FILE).read_bytes()
    except OSError:
        return b""


def mint_leaf(ca: CertificateAuthority, host: str, key: ec.EllipticCurvePrivateKey,
              validity: dt.timedelta = LEAF_VALIDITY) -> x509.Certificate:
    """A serverAuth certificate for exactly ``host``, signed by ``ca``."""
    now = _now()
    not_after = min(now + validity, ca.cert.not_valid_after_utc)
    try:
        authority = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
            ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value)
    except x509.ExtensionNotFound:  # a CA made without one (RFC 5280 asks, openssl may not)
        authority = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.cert.public_key())
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host[:64])]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW).not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=False, crl_sign=False,
            content_commitment=False, key_encipherment=False, data_encipherment=False,
            key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .add_extension(authority,
                       critical=False)
        .sign(ca.key, hashes.SHA256())
    )


def load_chain_from_memory(context: ssl.SSLContext, cert_pem: bytes, key_pem: bytes) -> None:
    """``SSLContext.load_cert_chain`` reads only files: hand it an anonymous in-memory file.

    On Linux a memfd never touches a disk (pods run with a read-only root filesystem);
    elsewhere a private temporary file is removed right after loading.
    """
    data = cert_pem + key_pem
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("keyhole-leaf", os.MFD_CLOEXEC)
        try:
            os.write(fd, data)
            context.load_cert_chain(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        return
    with tempfile.TemporaryDirectory(prefix="keyhole-") as folder:
        path = Path(folder) / "leaf.pem"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        context.load_cert_chain(str(path))


class LeafCache:
    """Server-side ``SSLContext`` per intercepted host name, minted on first use."""

    def __init__(self, ca: CertificateAuthority, *, max_entries: int = 2048,
                 on_mint: Callable[[], None] | None = None):
        self.ca = ca
        self._key = ec.generate_private_key(ec.SECP256R1())  # one leaf key per process
        self._key_pem = self._key.private_bytes(serialization.Encoding.PEM,
                                                serialization.PrivateFormat.PKCS8,
                                                serialization.NoEncryption())
        self._entries: OrderedDict[str, tuple[ssl.SSLContext, dt.datetime]] = OrderedDict()
        self._max = max_entries
        self._lock = threading.Lock()
        self._on_mint = on_mint

    def context_for(self, host: str) -> ssl.SSLContext:
        now = _now()
        with self._lock:
            entry = self._entries.get(host)
            if entry and entry[1] - LEAF_RENEW_BEFORE > now:
                self._entries.move_to_end(host)
                return entry[0]
        cert = mint_leaf(self.ca, host, self._key)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.set_alpn_protocols(["http/1.1"])  # clients offering h2 fall back cleanly
        # No TLS 1.3 session tickets: minting two per handshake costs ~58 µs of ~356 (measured,
        # docs/performance.md), and agents' HTTP clients (Python, Go) do not resume anyway.
        context.num_tickets = 0
        chain = cert.public_bytes(serialization.Encoding.PEM)
        load_chain_from_memory(context, chain, self._key_pem)
        with self._lock:
            self._entries[host] = (context, cert.not_valid_after_utc)
            self._entries.move_to_end(host)
            while len(self._entries) > self._max:
                self._entries.popitem(last=False)
        if self._on_mint:
            with contextlib.suppress(Exception):
                self._on_mint()
        return context

    def replace_ca(self, ca: CertificateAuthority) -> None:
        """A rotated CA: sign new leaves with it and forget the old ones."""
        with self._lock:
            self.ca = ca
            self._entries.clear()

    def check(self) -> None:
        """Prove the CA can still sign (used by ``/readyz``)."""
        if self.ca.cert.not_valid_after_utc <= _now():
            raise CAError("the keyhole CA has expired")
