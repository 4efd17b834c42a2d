import pytest
from multidict import CIMultiDict

from keyhole_common.spec import Rule, parse_injections
from keyhole_sidecar.inject import forwarded_headers, forwarded_query
from keyhole_sidecar.policy import (
    BaseUrlError,
    PathRejected,
    check_rules,
    normalise_path,
    split_base_url,
)
from keyhole_sidecar.routes import build_route_table
from tests.support.config import INJECTIONS, SECRETS


@pytest.mark.parametrize(("raw", "expected"), [
    ("/v1/models", "/v1/models"),
    ("/v1/./models", "/v1/models"),
    ("/v1/x/../models", "/v1/models"),
    ("/v1/%2e%2e/admin", "/admin"),
    ("/v1/%2E%2e/%2e/admin", "/admin"),
    ("/a%2fb/../c", "/a/c"),
    ("/../../etc", "/etc"),
    ("/v1/models/", "/v1/models/"),
    ("/a/b/..", "/a/"),
    ("/keep%20escapes", "/keep%20escapes"),
])
def test_paths_are_normalised(raw, expected):
    assert normalise_path(raw) == expected


@pytest.mark.parametrize("raw", ["v1/x", "/a\\..\\b", "/a%5c..%5cb"])
def test_ambiguous_paths_are_rejected(raw):
    with pytest.raises(PathRejected):
        normalise_path(raw)


RULES = (Rule(frozenset({"GET"}), ("/v1/models/*", "/v1/files/**")),
         Rule(frozenset({"POST"}), ("/v1/chat/completions",)))


@pytest.mark.parametrize(("method", "path", "allowed"), [
    ("GET", "/v1/models/gpt", True),
    ("GET", "/v1/models/gpt/extra", False),
    ("GET", "/v1/files/a/b/c", True),
    ("POST", "/v1/chat/completions", True),
    ("POST", "/v1/models/gpt", False),
    ("DELETE", "/v1/models/gpt", False),
])
def test_rules_allow_only_what_they_list(method, path, allowed):
    assert check_rules(RULES, method, path).allowed is allowed


def test_no_rules_allows_everything():
    assert check_rules(None, "DELETE", "/anything").allowed


def test_rule_refusals_say_why():
    assert check_rules(RULES, "DELETE", "/x").reason == "method DELETE is not allowed by any rule"
    assert "path /x is not allowed for GET" in check_rules(RULES, "GET", "/x").reason


def test_base_url_split():
    assert split_base_url("/openai/v1/chat") == ("openai", "/v1/chat")
    assert split_base_url("/openai") == ("openai", "/")
    with pytest.raises(BaseUrlError) as caught:
        split_base_url("//x")
    assert caught.value.status == 404


@pytest.fixture
def routes():
    table = build_route_table(parse_injections([("t", d) for d in INJECTIONS]),
                              lambda ref: SECRETS[ref.name][ref.key])
    return table


def test_headers_drop_hop_by_hop_proxy_and_client_credentials(routes):
    client = CIMultiDict([("Authorization", "mine"), ("authorization", "mine2"),
                          ("Proxy-Authorization", "p"), ("Connection", "close, X-Drop"),
                          ("X-Drop", "1"), ("Keep-Alive", "5"), ("Accept", "*/*"),
                          ("Host", "evil")])
    out = forwarded_headers(client, routes.match("api.routed.test", 443))
    assert out.getall("Authorization") == ["Bearer sk-live-ROUTED-0123456789abcdef"]
    assert set(out) == {"Authorization", "Accept"}


def test_query_keeps_client_pairs_byte_for_byte_and_replaces_injected_names(routes):
    r = routes.match("query.routed.test", 443)
    assert forwarded_query("a=%20b&key=x&k%65y=y&z", r) == "a=%20b&z&key=AIzaMAPSKEY-0987654321"
    assert forwarded_query("", r) == "key=AIzaMAPSKEY-0987654321"


def test_route_repr_never_shows_a_value(routes):
    assert "sk-live" not in repr(routes.routes)
