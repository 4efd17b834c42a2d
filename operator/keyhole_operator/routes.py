"""The signed injections document a sidecar obeys, and the per-namespace signing keys.

Keys are derived, not stored: ``HMAC(master, namespace)``. The operator keeps only the master
key (its own Secret) and writes each namespace's derived key into that namespace's
``keyhole-signing-key`` Secret for sidecars to mount; it never needs to read Secrets back to
sign, so the admission path makes no API call.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterable
from dataclasses import dataclass, field

from keyhole_common.spec import API_VERSION, LIST_KIND, SecretInjection, parse_injection, sign


@dataclass(frozen=True)
class Injection:
    """One SecretInjection as the operator holds it: parsed, plus what a sidecar is sent."""

    spec: SecretInjection
    document: dict = field(compare=False, hash=False)

    @property
    def name(self) -> str:
        return self.spec.name

    @classmethod
    def from_object(cls, obj: dict) -> Injection:
        """From a SecretInjection object; raises ValueError naming every problem."""
        meta = obj.get("metadata") or {}
        where = f"{meta['namespace']}/" if meta.get("namespace") else ""
        source = f"{obj.get('kind') or 'SecretInjection'} {where}{meta.get('name')}"
        clean = {k: obj.get(k) for k in ("apiVersion", "kind", "spec")}
        clean["metadata"] = {k: v for k, v in (obj.get("metadata") or {}).items()
                             if k in ("name", "namespace")}
        spec, problems = parse_injection(clean, source)
        if spec is None:
            raise ValueError("; ".join(f"{p.field}: {p.message}" if p.field else p.message
                                       for p in problems))
        return cls(spec=spec, document=injection_document(spec, clean))


def namespace_key(master_key: bytes, namespace: str) -> bytes:
    """The signing key of one namespace (hex, so it survives any file or env handling)."""
    label = f"keyhole.dev/v1 routes signing key for namespace {namespace}".encode()
    return hmac.new(master_key, label, hashlib.sha256).hexdigest().encode()


def injection_document(injection: SecretInjection, raw: dict) -> dict:
    """What a sidecar needs of one injection: its spec without the selectors, and its kind (a
    sidecar receives a cluster injection's values from the operator, not from a mount)."""
    spec = {k: v for k, v in (raw.get("spec") or {}).items()
            if k not in ("podSelector", "namespaceSelector")}
    return {"apiVersion": API_VERSION, "kind": injection.kind,
            "metadata": {"name": injection.name}, "spec": spec}


def signed_routes(injections: Iterable[Injection], namespace: str, key: bytes) -> str:
    """The ``keyhole.dev/injections`` annotation value: compact, canonical, signed JSON."""
    items = sorted((i.document for i in injections), key=lambda d: d["metadata"]["name"])
    document = sign({"apiVersion": API_VERSION, "kind": LIST_KIND, "namespace": namespace,
                     "items": items}, key)
    return json.dumps(document, sort_keys=True, separators=(",", ":"))
