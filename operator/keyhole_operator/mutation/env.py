"""The variables every agent container gets, and how they merge with the container's own.

Why each variable (measured client by client; see docs/operator.md):
- ``HTTP(S)_PROXY`` and ``http(s)_proxy``: curl and wget read only the lower case for http,
  some clients only the upper case. No ``ALL_PROXY``: it would send non-HTTP traffic too.
- ``NO_PROXY``/``no_proxy``: local and in-cluster names go direct; merged with the container's.
- ``NODE_USE_ENV_PROXY=1``: Node >= 22.21 and 24 then honour the proxy variables in fetch.
- ``SSL_CERT_FILE``, ``REQUESTS_CA_BUNDLE``, ``CURL_CA_BUNDLE``, ``GIT_SSL_CAINFO``: each
  *replaces* the client's roots, so they point at public roots + the namespace CA.
- ``NODE_EXTRA_CA_CERTS``: *adds* to Node's roots, so it points at the namespace CA alone.
- ``WGETRC``: a wgetrc with ``ca_certificate`` (wget reads no CA variable).
- ``JAVA_TOOL_OPTIONS``: the JVM reads no proxy variables; proxy properties and a PKCS12 trust
  store (JDK roots + our CA) are appended to whatever the container already has.
``NODE_OPTIONS`` is left alone: the only flag that would help (``--use-env-proxy``) makes older
Node refuse to start when it appears there.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from keyhole_operator import layout
from keyhole_operator.settings import Settings

ALWAYS_NO_PROXY = ("localhost", "127.0.0.1", "::1", ".svc", ".cluster.local")
PLACEHOLDER_VALUE = "keyhole-placeholder-not-a-secret"
PROXY_NAMES = ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")
NO_PROXY_NAMES = ("NO_PROXY", "no_proxy")
CA_VARIABLES = {
    "SSL_CERT_FILE": layout.CA_BUNDLE,
    "REQUESTS_CA_BUNDLE": layout.CA_BUNDLE,
    "CURL_CA_BUNDLE": layout.CA_BUNDLE,
    "GIT_SSL_CAINFO": layout.CA_BUNDLE,
    "NODE_EXTRA_CA_CERTS": layout.CA_CERT,
    "WGETRC": layout.WGETRC,
}


def java_options(settings: Settings) -> str:
    """Proxy properties and the trust store, in the JVM's own syntax (``*.svc``, no CIDRs)."""
    port = settings.proxy_port
    hosts = []
    for entry in (*ALWAYS_NO_PROXY, *settings.no_proxy):
        if "/" in entry or entry == "::1":
            continue  # the JVM has no CIDR or bare IPv6 syntax here
        hosts.append(f"*{entry}" if entry.startswith(".") else entry)
    return (f"-Dhttp.proxyHost=127.0.0.1 -Dhttp.proxyPort={port} "
            f"-Dhttps.proxyHost=127.0.0.1 -Dhttps.proxyPort={port} "
            f"-Dhttp.nonProxyHosts={'|'.join(hosts)} "
            f"-Djavax.net.ssl.trustStore={layout.TRUST_DIR}/{layout.TRUSTSTORE} "
            f"-Djavax.net.ssl.trustStorePassword={settings.java_truststore_password} "
            "-Djavax.net.ssl.trustStoreType=PKCS12")


@dataclass
class EnvPlan:
    """What one container's env becomes, with the warnings it earned."""

    env: list[dict]
    warnings: list[str] = field(default_factory=list)


def _index(env: list[dict]) -> dict[str, int]:
    return {item.get("name"): i for i, item in enumerate(env)}


def _set(env: list[dict], name: str, value: str) -> dict | None:
    """Set ``name`` in place (keeping its position) or append; return the previous entry."""
    positions = _index(env)
    if name in positions:
        previous = env[positions[name]]
        env[positions[name]] = {"name": name, "value": value}
        return previous
    env.append({"name": name, "value": value})
    return None


def merge_no_proxy(existing: list[str], extra: tuple[str, ...]) -> str:
    entries: list[str] = []
    for entry in [*existing, *ALWAYS_NO_PROXY, *extra]:
        entry = entry.strip()
        if entry and entry not in entries:
            entries.append(entry)
    return ",".join(entries)


def plan_env(container: dict, settings: Settings, agent_env: list[tuple[str, str, str]]
             ) -> EnvPlan:
    """The env of one agent container after injection.

    ``agent_env`` holds (variable, value, injection name) from the matching injections.
    """
    name = container.get("name", "?")
    env = [dict(item) for item in container.get("env") or []]
    plan = EnvPlan(env)
    proxy = f"http://127.0.0.1:{settings.proxy_port}"
    for var in PROXY_NAMES:
        previous = _set(env, var, proxy)
        if previous and previous.get("value") != proxy:
            plan.warnings.append(
                f"container {name!r}: {var} was {_describe(previous)}; keyhole replaced it with "
                f"its own proxy (chaining to another proxy is not supported)")

    positions = _index(env)
    existing: list[str] = []
    for var in NO_PROXY_NAMES:
        if var in positions:
            item = env[positions[var]]
            if "value" in item:
                existing.extend((item.get("value") or "").split(","))
            else:
                plan.warnings.append(f"container {name!r}: {var} comes from {_describe(item)}; "
                                     "keyhole replaced it (it cannot merge a reference)")
    merged = merge_no_proxy(existing, settings.no_proxy)
    for var in NO_PROXY_NAMES:
        _set(env, var, merged)
    _set(env, "NODE_USE_ENV_PROXY", "1")

    positions = _index(env)
    for var, file in CA_VARIABLES.items():
        ours = f"{layout.TRUST_DIR}/{file}"
        if var in positions and env[positions[var]].get("value") != ours:
            plan.warnings.append(
                f"container {name!r} sets {var} ({_describe(env[positions[var]])}); keyhole left it, "
                f"so that client will not trust the keyhole CA until {layout.TRUST_DIR}/"
                f"{layout.CA_CERT} is added to its bundle")
            continue
        _set(env, var, ours)

    options = java_options(settings)
    positions = _index(env)
    if "JAVA_TOOL_OPTIONS" in positions:
        item = env[positions["JAVA_TOOL_OPTIONS"]]
        current = item.get("value")
        if current is None:
            plan.warnings.append(f"container {name!r}: JAVA_TOOL_OPTIONS comes from "
                                 f"{_describe(item)}; keyhole could not append its options")
        elif options not in current:
            _set(env, "JAVA_TOOL_OPTIONS", f"{current} {options}".strip())
    else:
        _set(env, "JAVA_TOOL_OPTIONS", options)

    for var, value, injection in agent_env:
        previous = _set(env, var, value)
        if previous and previous.get("value") != value:
            plan.warnings.append(
                f"container {name!r}: {var} was {_describe(previous)}; injection {injection!r} "
                f"replaced it with {'a placeholder' if value == PLACEHOLDER_VALUE else value}"
                " (agents must not hold the key)")
    return plan


def _describe(item: dict) -> str:
    """How a warning refers to an env entry without quoting anything that might be secret."""
    source = item.get("valueFrom") or {}
    if "secretKeyRef" in source:
        ref = source["secretKeyRef"]
        return f"from Secret {ref.get('name')!r} key {ref.get('key')!r}"
    if "configMapKeyRef" in source:
        return f"from ConfigMap {source['configMapKeyRef'].get('name')!r}"
    if source:
        return "a reference"
    value = item.get("value") or ""
    return f"{value!r}" if value.startswith("/") and len(value) <= 120 else "set by the container"
