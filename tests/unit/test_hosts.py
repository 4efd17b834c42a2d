import pytest

from sidecar.spec import HostPattern


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
