"""The signed injections document: how the operator vouches for the routes a sidecar obeys.

In a pod the injections arrive through a pod annotation; anyone able to patch the pod could
otherwise point a mounted key at any host. So the operator signs the document with a
per-namespace key that only sidecars mount, and the sidecar refuses anything else.

Format: one JSON (or YAML) document ``{"apiVersion": "keyhole.dev/v1alpha1",
"kind": "SecretInjectionList", "items": [...], ..., "signature": "hmac-sha256:<hex>"}``.
The MAC covers the canonical JSON (sorted keys, no spaces) of the document *without* its
``signature`` field, so the operator may bind more fields (the pod, a generation) later.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

SIGNATURE_FIELD = "signature"
SCHEME = "hmac-sha256:"


class SignatureError(ValueError):
    """The document is unsigned, malformed or signed with another key."""


def canonical_bytes(document: dict[str, Any]) -> bytes:
    """The exact bytes the MAC covers."""
    unsigned = {k: v for k, v in document.items() if k != SIGNATURE_FIELD}
    return json.dumps(unsigned, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def sign(document: dict[str, Any], key: bytes) -> dict[str, Any]:
    """Return a copy of ``document`` carrying a signature made with ``key``."""
    if not key:
        raise ValueError("the signing key is empty")
    mac = hmac.new(key, canonical_bytes(document), hashlib.sha256).hexdigest()
    return {**{k: v for k, v in document.items() if k != SIGNATURE_FIELD},
            SIGNATURE_FIELD: SCHEME + mac}


def verify(document: Any, key: bytes) -> None:
    """Raise :class:`SignatureError` unless ``document`` carries a valid signature by ``key``."""
    if not isinstance(document, dict):
        raise SignatureError("a signed injections document must be one mapping")
    signature = document.get(SIGNATURE_FIELD)
    if not isinstance(signature, str) or not signature.startswith(SCHEME):
        raise SignatureError(
            "the injections document is not signed; in a pod only the keyhole operator may "
            "write it (field 'signature' missing or not 'hmac-sha256:...')"
        )
    expected = hmac.new(key, canonical_bytes(document), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, signature[len(SCHEME):]):
        raise SignatureError(
            "the injections document's signature does not match: it was altered after the "
            "operator signed it, or signed with another namespace's key"
        )
