"""What a sidecar serves, told to people: the admin port's ``/config`` and ``check --verbose``.

Injection names, hosts, rules, limits, credential kinds, the Secret keys read and a short
fingerprint of each value — never a value, never a file path. Pure functions of the route
table and the CA certificate, so both views say the same thing.
"""

from __future__ import annotations

import datetime as dt
import hashlib

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from keyhole_common.spec import SecretInjection
from keyhole_common.spec.model import CREDENTIAL_FIELDS, Limits, WorkloadIdentity
from keyhole_sidecar.limits import describe
from keyhole_sidecar.routes import Route, RouteTable

_CREDENTIAL_KINDS = {kind: field for field, kind in CREDENTIAL_FIELDS.items()}


def credential_kinds(injection: SecretInjection) -> list[str]:
    """The spec fields that make this injection's credential, in spec order."""
    kinds = []
    if injection.headers:
        kinds.append("headers")
    if injection.basic_auth:
        kinds.append("basicAuth")
    if injection.query_params:
        kinds.append("queryParams")
    credential = injection.credential
    if isinstance(credential, WorkloadIdentity):  # which provider, and who it presents as
        kinds.append(f"workloadIdentity: {credential.provider}, audience {credential.audience}")
    elif credential is not None:
        kinds.append(_CREDENTIAL_KINDS[type(credential)])
    return kinds


def _limits(limits: Limits | None) -> str | None:
    return describe(limits) if limits is not None else None


def _llm(injection: SecretInjection) -> dict | None:
    llm = injection.llm
    if llm is None:
        return None
    return {"api": llm.api,
            "budgets": [{"name": b.name, "per": b.per, "tokens": b.tokens, "spend": b.spend,
                         "models": list(b.models) if b.models else None,
                         "for": "injection" if b.shared else "pod"} for b in llm.budgets],
            "prices": [{"model": p.model, "input": p.input, "output": p.output}
                       for p in llm.prices]}


def describe_route(route: Route, problem: str | None = None) -> dict:
    injection = route.injection
    fingerprints = dict(route.fingerprints)
    sets = [h.name for h in injection.headers]
    if injection.basic_auth or injection.credential is not None:
        sets.append("Authorization")
    return {
        "name": injection.name,
        "available": route.unavailable is None,
        "problem": problem,
        "hosts": [str(h) for h in injection.hosts],
        "credential": credential_kinds(injection),
        "sets": {"headers": list(dict.fromkeys(sets)),
                 "queryParams": [q.name for q in injection.query_params]},
        "secrets": [{"secret": ref.name, "key": ref.key,
                     "fingerprint": fingerprints.get(ref)} for ref in injection.secret_refs()],
        "rules": None if injection.rules is None else [
            {"methods": sorted(rule.methods) if rule.methods is not None else None,
             "paths": list(rule.paths) if rule.paths is not None else None,
             "limits": _limits(rule.limits)} for rule in injection.rules],
        "limits": _limits(injection.limits),
        "llm": _llm(injection),
        "mcp": injection.mcp.describe() if injection.mcp is not None else None,
        "stripHeaders": list(injection.strip_headers),
    }


def describe_ca(cert: x509.Certificate, now: dt.datetime | None = None) -> dict:
    now = now or dt.datetime.now(dt.UTC)
    expires = cert.not_valid_after_utc
    der = cert.public_bytes(serialization.Encoding.DER)
    return {"subject": cert.subject.rfc4514_string(),
            "sha256": hashlib.sha256(der).hexdigest(),
            "notAfter": expires.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "expiresInDays": round((expires - now).total_seconds() / 86400, 1)}


def inventory(table: RouteTable, ca: x509.Certificate | None, *, version: str,
              rejected: str | None = None) -> dict:
    """Everything ``/config`` answers. ``rejected``: why the files on disk are not what serves
    (without file names), or None."""
    problems = {u.injection: u.summary for u in table.unusable}
    return {
        "version": version,
        "configuration": {"matchesDisk": rejected is None, "rejected": rejected,
                          "injections": len(table),
                          "available": sum(r.unavailable is None for r in table.routes)},
        "ca": describe_ca(ca) if ca is not None else None,
        "injections": [describe_route(r, problems.get(r.name)) for r in table.routes],
    }


def render_text(described: dict) -> list[str]:
    """``check --verbose``: the inventory as lines a person reads."""
    lines = []
    for entry in described["injections"]:
        status = "ok " if entry["available"] and not entry["problem"] else "!! "
        sets = [*entry["sets"]["headers"], *(f"?{q}" for q in entry["sets"]["queryParams"])]
        lines.append(f"{status} {entry['name']}: {', '.join(entry['hosts'])} ← "
                     f"{', '.join(sets)} ({', '.join(entry['credential'])})")
        if entry["problem"]:
            lines.append(f"    problem: {entry['problem']}")
        for secret in entry["secrets"]:
            lines.append(f"    secret {secret['secret']}/{secret['key']}: "
                         f"{secret['fingerprint'] or 'not read'}")
        if entry["rules"] is None:
            lines.append("    rules: none (every method and path)")
        for index, rule in enumerate(entry["rules"] or ()):
            methods = ",".join(rule["methods"]) if rule["methods"] else "any method"
            paths = " ".join(rule["paths"]) if rule["paths"] else "any path"
            limit = f"; limits {rule['limits']}" if rule["limits"] else ""
            lines.append(f"    rules[{index}]: {methods} {paths}{limit}")
        lines.append(f"    limits: {entry['limits'] or 'none'}")
        if entry["stripHeaders"]:
            lines.append(f"    strips: {', '.join(entry['stripHeaders'])}")
        llm = entry["llm"]
        if llm is not None:
            lines.append(f"    llm: {llm['api']} (usage metered; the client's credential headers "
                         "for this API are dropped)")
            for budget in llm["budgets"]:
                figure = (f"{budget['tokens']} tokens" if budget["tokens"] is not None
                          else f"${budget['spend']:g}")
                models = f" of {', '.join(budget['models'])}" if budget["models"] else ""
                lines.append(f"    budget {budget['name']}: {figure}{models} per UTC "
                             f"{budget['per']}, for each {budget['for']}")
            for price in llm["prices"]:
                lines.append(f"    price {price['model']}: ${price['input']:g} in, "
                             f"${price['output']:g} out per million tokens")
        for line in entry.get("mcp") or ():
            lines.append(f"    mcp {line}")
    ca = described["ca"]
    if ca is not None:
        lines.append(f"CA: {ca['subject']}, sha256 {ca['sha256'][:16]}…, expires "
                     f"{ca['notAfter']} (in {ca['expiresInDays']} days)")
    lines.append(f"keyhole {described['version']}")
    return lines
