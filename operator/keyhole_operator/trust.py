"""Each namespace's CA and what agents need to trust it, as pure functions of what exists now.

- Secret ``keyhole-ca`` (``kubernetes.io/tls``): the CA sidecars sign leaves with, plus
  ``previous.crt`` holding CAs that were replaced but have not expired.
- ConfigMap ``keyhole-ca-bundle``: ``ca.crt`` (current + previous CAs), ``ca-bundle.crt``
  (public roots from certifi + those CAs), ``wgetrc``, and ``truststore.p12`` for Java.

Rotation with overlap, in two steps, because the kubelet delivers the Secret (to sidecars) and
the ConfigMap (to agents) independently, each on its own sync:

1. 30 days before the CA expires, the next CA is made and *published*: ``next.crt`` joins every
   bundle while the current CA keeps signing.
2. ``promote_after`` later (longer than any kubelet takes to deliver the bundle), the next CA
   becomes the current one and signs; the old one stays in every bundle until it expires.

So an agent always trusts the CA its sidecar signs with. Found on the real node: promoting at
once left agents failing TLS until the kubelet's next sync delivered the new bundle.
"""

from __future__ import annotations

import datetime as dt
import re
import warnings
from dataclasses import dataclass

import certifi
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.utils import CryptographyDeprecationWarning

from keyhole_common.ca import CertificateAuthority
from keyhole_operator import layout

CA_VALIDITY = dt.timedelta(days=365)
ROTATE_BEFORE = dt.timedelta(days=30)
PROMOTE_AFTER = dt.timedelta(minutes=10)
PREVIOUS_KEY = "previous.crt"
NEXT_CERT, NEXT_KEY, NEXT_PUBLISHED = "next.crt", "next.key", "next.published"


@dataclass(frozen=True)
class CAPlan:
    data: dict[str, bytes]
    """The ``keyhole-ca`` Secret's data (raw bytes, not base64)."""
    changed: bool
    reason: str
    """Why it changed, for an Event: created, next-published, rotated, replaced-invalid,
    replaced-expired, pruned or unchanged."""


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _still_valid(pem: bytes, now: dt.datetime) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(pem) if pem.strip() else []
    except ValueError:
        return []
    return [c for c in certs if c.not_valid_after_utc > now]


def _pem(certs: list[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def _fresh(namespace: str) -> CertificateAuthority:
    return CertificateAuthority.generate(common_name=f"keyhole CA for namespace {namespace}",
                                         validity=CA_VALIDITY)


def _key_pem(ca: CertificateAuthority) -> bytes:
    return ca.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())


def _secret_data(ca: CertificateAuthority, previous: list[x509.Certificate]) -> dict[str, bytes]:
    data = {"tls.crt": ca.cert_pem, "tls.key": _key_pem(ca)}
    if previous:
        data[PREVIOUS_KEY] = _pem(previous)
    return data


def _next_ca(existing: dict[str, bytes], now: dt.datetime
             ) -> tuple[x509.Certificate, dt.datetime] | None:
    """The published next CA and when it was published, if there is a usable one."""
    try:
        cert = x509.load_pem_x509_certificates(existing[NEXT_CERT])[0]
        serialization.load_pem_private_key(existing[NEXT_KEY], password=None)
        published = dt.datetime.fromisoformat(existing[NEXT_PUBLISHED].decode())
    except (KeyError, ValueError, IndexError, TypeError):
        return None
    return (cert, published) if cert.not_valid_after_utc > now else None


def plan_ca(namespace: str, existing: dict[str, bytes] | None, now: dt.datetime | None = None,
            promote_after: dt.timedelta = PROMOTE_AFTER) -> CAPlan:
    """What the namespace's ``keyhole-ca`` Secret should hold."""
    now = now or _now()
    if not existing:
        return CAPlan(_secret_data(_fresh(namespace), []), True, "created")
    try:
        cert = x509.load_pem_x509_certificates(existing.get("tls.crt", b""))[0]
        serialization.load_pem_private_key(existing.get("tls.key", b""), password=None)
    except (ValueError, IndexError, TypeError):
        return CAPlan(_secret_data(_fresh(namespace), []), True, "replaced-invalid")
    previous = _still_valid(existing.get(PREVIOUS_KEY, b""), now)
    upcoming = _next_ca(existing, now)
    data = {k: v for k, v in existing.items() if k in ("tls.crt", "tls.key")}
    if previous:
        data[PREVIOUS_KEY] = _pem(previous)
    if upcoming:
        data.update({k: existing[k] for k in (NEXT_CERT, NEXT_KEY, NEXT_PUBLISHED)})
    if cert.not_valid_after_utc <= now:  # expired: nothing left to overlap with
        if upcoming:
            return CAPlan(_promoted(existing, previous), True, "replaced-expired")
        return CAPlan(_secret_data(_fresh(namespace), previous), True, "replaced-expired")
    if cert.not_valid_after_utc - now > ROTATE_BEFORE:
        return CAPlan(data, data != existing, "pruned" if data != existing else "unchanged")
    if upcoming is None:
        following = _fresh(namespace)
        data.update({NEXT_CERT: following.cert_pem, NEXT_KEY: _key_pem(following),
                     NEXT_PUBLISHED: now.isoformat().encode()})
        return CAPlan(data, True, "next-published")
    if now - upcoming[1] < promote_after:
        return CAPlan(data, data != existing, "pruned" if data != existing else "unchanged")
    return CAPlan(_promoted(existing, [cert, *previous]), True, "rotated")


def _promoted(existing: dict[str, bytes], previous: list[x509.Certificate]) -> dict[str, bytes]:
    """The published next CA signs from now on."""
    data = {"tls.crt": existing[NEXT_CERT], "tls.key": existing[NEXT_KEY]}
    if previous:
        data[PREVIOUS_KEY] = _pem(previous)
    return data


def trusted_cas(secret_data: dict[str, bytes], now: dt.datetime | None = None
                ) -> list[x509.Certificate]:
    """The CAs agents must trust: the current one first, then the published next one, then
    those still overlapping."""
    now = now or _now()
    current = x509.load_pem_x509_certificates(secret_data["tls.crt"])[:1]
    upcoming = _still_valid(secret_data.get(NEXT_CERT, b""), now)[:1]
    return current + upcoming + _still_valid(secret_data.get(PREVIOUS_KEY, b""), now)


_PEM_BLOCK = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----\n?", re.S)


def public_roots() -> list[tuple[bytes, x509.Certificate | None]]:
    """certifi's roots, each as (PEM, parsed or None). A few old roots have serial numbers that
    ``cryptography`` warns about (and may one day refuse); they stay in the PEM bundle, which
    OpenSSL reads, and are left out of the Java trust store only if they cannot be parsed."""
    roots = []
    for block in _PEM_BLOCK.findall(certifi.contents().encode()):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CryptographyDeprecationWarning)
            try:
                roots.append((block, x509.load_pem_x509_certificate(block)))
            except ValueError:
                roots.append((block, None))
    return roots


def bundle_data(secret_data: dict[str, bytes], truststore_password: str, upstream_ca: str = "",
                channel_ca: str = "") -> tuple[dict[str, str], dict[str, bytes]]:
    """The ``keyhole-ca-bundle`` ConfigMap: (data, binaryData). ``upstream_ca`` (the
    operator's ``--sidecar-upstream-ca``) and ``channel_ca`` (the CA of the operator
    channel's certificate) ride along for the sidecars to mount."""
    cas = trusted_cas(secret_data)
    roots = public_roots()
    ca_pem = _pem(cas)
    store = pkcs12.serialize_java_truststore(
        [pkcs12.PKCS12Certificate(c, f"keyhole-{i}".encode()) for i, c in enumerate(cas)]
        + [pkcs12.PKCS12Certificate(c, f"public-{i}".encode())
           for i, (_, c) in enumerate(roots) if c is not None],
        serialization.BestAvailableEncryption(truststore_password.encode()),
    )
    data = {
        layout.CA_CERT: ca_pem.decode(),
        layout.CA_BUNDLE: (b"".join(pem if pem.endswith(b"\n") else pem + b"\n"
                                    for pem, _ in roots) + ca_pem).decode(),
        layout.WGETRC: f"ca_certificate = {layout.TRUST_DIR}/{layout.CA_BUNDLE}\n",
    }
    if upstream_ca:
        data[layout.UPSTREAM_CA] = upstream_ca
    if channel_ca:
        data[layout.CHANNEL_CA] = channel_ca
    return data, {layout.TRUSTSTORE: store}


def read_pem_certificates(path, flag: str) -> str:
    """The PEM certificates in the file given as ``flag`` (public material: an upstream CA,
    the channel's CA), checked; ValueError names the flag and the file."""
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"{flag} {path}: cannot read it ({exc.strerror})") from None
    try:
        certs = x509.load_pem_x509_certificates(text)
    except ValueError:
        raise ValueError(f"{flag} {path}: not a PEM bundle of certificates "
                         "(-----BEGIN CERTIFICATE----- blocks)") from None
    return _pem(certs).decode()
