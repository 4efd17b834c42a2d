"""The CA that signs keyhole's TLS leaves: generated, loaded from the ``kubernetes.io/tls``
layout (``tls.crt`` + ``tls.key``), saved. The sidecar signs leaves with it; the operator
makes each namespace's and the webhook's."""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

log = logging.getLogger("keyhole.certs")

CA_CERT_FILE = "tls.crt"
CA_KEY_FILE = "tls.key"
CLOCK_SKEW = dt.timedelta(minutes=5)


class CAError(ValueError):
    """The CA files are missing, unreadable or not a usable CA."""


def utc_now() -> dt.datetime:
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
        now = utc_now()
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
        if cert.not_valid_after_utc <= utc_now():
            raise CAError(f"the CA in {ca_dir} expired on {cert.not_valid_after_utc:%Y-%m-%d}")
        return cls(cert, key)

    @classmethod
    def load_or_create(cls, ca_dir: Path) -> CertificateAuthority:
        """Standalone use: create a CA on first start, then keep using it."""
        if (ca_dir / CA_CERT_FILE).exists() or (ca_dir / CA_KEY_FILE).exists():
            return cls.load(ca_dir)
        ca = cls.generate()
        ca.save(ca_dir)
        der = ca.cert.public_bytes(serialization.Encoding.DER)
        # WARNING, not INFO: a typo in --ca-dir makes a CA no client trusts yet.
        log.warning("created a new keyhole CA in %s (sha256 %s…); clients must trust %s",
                    ca_dir.resolve(), hashlib.sha256(der).hexdigest()[:16],
                    (ca_dir / CA_CERT_FILE).resolve())
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


