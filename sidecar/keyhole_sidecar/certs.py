"""The leaf certificates minted from the CA for intercepted hosts.

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
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from keyhole_common.ca import CLOCK_SKEW, CAError, CertificateAuthority, utc_now

log = logging.getLogger("keyhole.certs")

LEAF_VALIDITY = dt.timedelta(hours=24)
LEAF_RENEW_BEFORE = dt.timedelta(hours=1)


def mint_leaf(ca: CertificateAuthority, host: str, key: ec.EllipticCurvePrivateKey,
              validity: dt.timedelta = LEAF_VALIDITY) -> x509.Certificate:
    """A serverAuth certificate for exactly ``host``, signed by ``ca``."""
    now = utc_now()
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
        now = utc_now()
        with self._lock:
            entry = self._entries.get(host)
            if entry and entry[1] - LEAF_RENEW_BEFORE > now:
                self._entries.move_to_end(host)
                return entry[0]
        cert = mint_leaf(self.ca, host, self._key)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.set_alpn_protocols(["h2", "http/1.1"])  # the client picks
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
        if self.ca.cert.not_valid_after_utc <= utc_now():
            raise CAError("the keyhole CA has expired")
