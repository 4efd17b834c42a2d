"""The standard test configuration: one injection per kind of credential."""

from __future__ import annotations

from tests.support.upstream import TEST_HOSTS

API_TOKEN = "sk-live-ROUTED-0123456789abcdef"
STRIPE_KEY = "sk_test_STRIPE_abcdef123456"
MAPS_KEY = "AIzaMAPSKEY-0987654321"
RULES_KEY = "rk-RULES-SECRET-5555"
WILD_KEY = "wk-WILD-SECRET-7777"
GIT_TOKEN = "ghs_GITTOKEN0123456789"
H2_KEY = "h2-SECRET-KEY-424242"  # the HTTP/2 upstream's (tests/conftest.py: h2_sidecar)
GRPC_KEY = "grpc-SECRET-KEY-131313"  # the gRPC upstream's
ALL_SECRETS = (API_TOKEN, STRIPE_KEY, MAPS_KEY, RULES_KEY, WILD_KEY, GIT_TOKEN)

SECRETS = {
    "api-credentials": {"token": API_TOKEN},
    "stripe": {"secret-key": STRIPE_KEY},
    "maps": {"api-key": MAPS_KEY},
    "rules": {"key": RULES_KEY},
    "wild": {"key": WILD_KEY},
    "git": {"user": "x-access-token", "token": GIT_TOKEN},
}


def ref(name: str, key: str) -> dict:
    return {"secretKeyRef": {"name": name, "key": key}}


def injection(name: str, **spec) -> dict:
    spec.setdefault("podSelector", {"matchLabels": {f"keyhole.dev/{name}": "true"}})
    return {"apiVersion": "keyhole.dev/v1alpha1", "kind": "SecretInjection",
            "metadata": {"name": name}, "spec": spec}


INJECTIONS = [
    injection("api", hosts=["api.routed.test"],
              headers=[{"name": "Authorization", "valueFrom": ref("api-credentials", "token"),
                        "format": "Bearer {value}"}]),
    injection("basic", hosts=["basic.routed.test"],
              basicAuth={"usernameFrom": ref("stripe", "secret-key")}),
    injection("query", hosts=["query.routed.test"],
              queryParams=[{"name": "key", "valueFrom": ref("maps", "api-key")}]),
    injection("rules", hosts=["rules.routed.test"],
              headers=[{"name": "X-Api-Key", "valueFrom": ref("rules", "key")}],
              rules=[{"methods": ["GET"], "paths": ["/v1/models/*", "/reflect"]},
                     {"methods": ["POST"], "paths": ["/v1/chat/completions"]}]),
    injection("wild", hosts=["*.wild.test"],
              headers=[{"name": "X-Api-Key", "valueFrom": ref("wild", "key")}]),
    injection("git", hosts=["git.routed.test"],
              basicAuth={"usernameFrom": ref("git", "user"), "passwordFrom": ref("git", "token")}),
]


def resolve_all(port: int) -> list[str]:
    """--resolve entries pointing every test host (and its port 80 twin) at the upstream."""
    entries = [f"{host}:443:127.0.0.1" for host in TEST_HOSTS]
    if port != 443:
        raise AssertionError("the test upstream must listen on 443")
    return entries
