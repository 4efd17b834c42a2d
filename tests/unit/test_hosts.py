import pytest

from keyhole_common.spec import HostPattern
from keyhole_common.spec.hosts import host_risk


@pytest.mark.parametrize(("entry", "host", "port", "plain", "expected"), [
    ("api.openai.com", "api.openai.com", 443, False, True),
    ("api.openai.com", "API.OpenAI.com.", 443, False, True),
    ("api.openai.com", "api.openai.com", 80, True, True),
    ("api.openai.com", "api.openai.com", 80, False, False),
    ("api.openai.com", "api.openai.com", 8443, False, False),
    ("api.openai.com:8443", "api.openai.com", 8443, False, True),
    ("api.openai.com:8443", "api.openai.com", 443, False, False),
    ("*.example.com", "a.example.com", 443, False, True),
    ("*.example.com", "example.com", 443, False, False),
    ("*.example.com", "a.b.example.com", 443, False, False),
    ("*.example.com", ".example.com", 443, False, False),
    ("api.openai.com", "api.openai.com.evil.test", 443, False, False),
    ("api.openai.com", "evilapi.openai.com", 443, False, False),
    ("api.openai.com", "1.2.3.4", 443, False, False),
    ("api.openai.com", "::1", 443, False, False),
])
def test_host_matching(entry, host, port, plain, expected):
    assert HostPattern.parse(entry).matches(host, port, plain_http=plain) is expected


@pytest.mark.parametrize(("entry", "message"), [
    ("", "non-empty"),
    ("https://api.openai.com", "bare host name"),
    ("api.openai.com/v1", "bare host name"),
    ("user@api.openai.com", "bare host name"),
    ("10.0.0.1", "IP address"),
    ("[::1]", "IP address"),
    ("*.com", "too broad"),
    ("a.*.com", "whole first label"),
    ("api_openai.com", "not a valid DNS name"),
    ("api.openai.com:0", "port"),
    ("api.openai.com:99999", "port"),
    ("bücher.de", "punycode"),
])
def test_bad_host_entries_are_explained(entry, message):
    with pytest.raises(ValueError, match=message):
        HostPattern.parse(entry)


def test_overlap_is_found_between_an_exact_name_and_a_wildcard_on_the_same_port():
    wild, exact = HostPattern.parse("*.example.com"), HostPattern.parse("a.example.com:443")
    assert wild.overlaps(exact) and exact.overlaps(wild)
    assert not wild.overlaps(HostPattern.parse("a.example.com:8443"))
    assert not HostPattern.parse("a.example.com").overlaps(HostPattern.parse("b.example.com"))


@pytest.mark.parametrize("entry", ["*.co.uk", "*.github.io", "*.s3.amazonaws.com", "*.gov.uk:8443",
                                   "*.CO.UK."])
def test_a_wildcard_over_a_public_suffix_is_refused(entry):
    """Anyone can register a name under a public suffix: the key would go to all of them."""
    with pytest.raises(ValueError, match=r"is too broad: '[a-z0-9.]+' is a public suffix"):
        HostPattern.parse(entry)


@pytest.mark.parametrize("entry", ["*.example.co.uk", "*.openai.azure.com", "*.api.github.io",
                                   "github.io"])
def test_a_wildcard_under_a_registered_domain_is_accepted(entry):
    HostPattern.parse(entry)


@pytest.mark.parametrize(("entry", "risk"), [
    ("metadata.google.internal", "cloud metadata service"),
    ("metadata", "cloud metadata service"),
    ("llm.agents.svc.cluster.local", "cluster-internal name"),
    ("*.svc.cluster.local", "cluster-internal name"),
    ("vault.corp.internal", "cluster-internal name"),
    ("api.openai.com", None),
])
def test_risky_hosts_get_a_warning_that_names_the_risk(entry, risk):
    found = host_risk(HostPattern.parse(entry))
    assert (found is None) if risk is None else (risk in found and entry.lstrip("*.") in found)
