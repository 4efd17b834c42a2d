import base64
import gzip

import pytest

from keyhole_sidecar.redact import MASK, REGEX_PRECHECK_MAX, Redactor, secret_forms

SECRET = "sk-live-0123456789abcdefXYZ"


@pytest.fixture
def redactor():
    return Redactor(secret_forms([SECRET, f"Bearer {SECRET}"]))


@pytest.mark.parametrize("text", [
    SECRET,
    f"Bearer {SECRET}",
    base64.b64encode(SECRET.encode()).decode(),
    base64.b64encode(b"a" + SECRET.encode()).decode(),
    base64.b64encode(b"ab" + SECRET.encode() + b"tail").decode(),
    base64.urlsafe_b64encode(b"?" + SECRET.encode()).decode(),
])
def test_every_form_of_the_secret_is_masked(redactor, text):
    out = redactor.redact(f"prefix {text} suffix".encode())
    assert SECRET.encode() not in out
    assert MASK in out
    for blob in (out,):
        assert base64.b64encode(SECRET.encode()) not in blob


@pytest.mark.parametrize("size", [1, 2, 3, 5, 8, 13])
def test_a_secret_split_across_chunks_is_masked(redactor, size):
    body = f"data: {SECRET}\n\ndata: again {SECRET}".encode()
    stream = redactor.stream()
    out = b"".join(stream.feed(body[i:i + size]) for i in range(0, len(body), size))
    out += stream.flush()
    assert out == b"data: " + MASK + b"\n\ndata: again " + MASK


def test_the_stream_holds_back_only_what_could_begin_a_secret(redactor):
    stream = redactor.stream()
    assert stream.feed(b"data: event 1\n\n") == b"data: event 1\n\n"  # sent at once
    assert stream.feed(b"text then sk-li") == b"text then "
    assert stream.feed(b"ke a cat") == b"sk-like a cat"


def test_unrelated_bytes_pass_unchanged(redactor):
    payload = gzip.compress(b"x" * 10000)
    stream = redactor.stream()
    assert stream.feed(payload) + stream.flush() == payload


def test_forms_shorter_than_four_bytes_are_not_masked():
    assert Redactor(secret_forms(["abc"])).redact(b"abc abc") == b"abc abc"


def test_the_url_encoded_form_of_a_secret_with_reserved_characters_is_masked():
    from urllib.parse import quote, quote_plus

    secret = "a+b/c=d e-0123456789"
    redactor = Redactor(secret_forms([secret]))
    for encoded in (quote(secret, safe=""), quote_plus(secret, safe="")):
        assert redactor.redact(f"?next={encoded}&x".encode()) == b"?next=" + MASK + b"&x"


@pytest.mark.parametrize("around", ["", "x-", "caf\u00e9 ", "\udcff\udcfe"])  # last: undecodable bytes
def test_header_text_is_masked_like_bytes_including_non_ascii_secrets(around):
    redactor = Redactor(secret_forms(["p\u00e4ssw\u00f6rd-1234"]))
    text = f"{around}p\u00e4ssw\u00f6rd-1234{around}"
    assert redactor.redact_text(text) == f"{around}[REDACTED]{around}"
    assert redactor.redact_text(around + "unrelated") == around + "unrelated"


def test_large_chunks_are_checked_as_thoroughly_as_small_ones(redactor):
    """Above REGEX_PRECHECK_MAX the pre-check searches a reduced set of forms: every form must
    still be found, wherever it sits in the chunk."""
    filler = b"x" * (REGEX_PRECHECK_MAX * 3)
    for form in redactor.forms:
        for at in (0, REGEX_PRECHECK_MAX, len(filler)):
            chunk = filler[:at] + form + filler[at:]
            assert form not in redactor.redact(chunk), form
