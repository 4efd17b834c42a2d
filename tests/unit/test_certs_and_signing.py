import datetime as dt
import socket
import ssl
import threading

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from keyhole_common.ca import CAError, CertificateAuthority
from keyhole_common.spec import SignatureError, sign, verify
from keyhole_sidecar.certs import LeafCache, mint_leaf


def test_leaf_certificates_have_what_strict_verifiers_require():
    ca = CertificateAuthority.generate()
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = mint_leaf(ca, "api.openai.com", key)
    assert isinstance(leaf.public_key(), ec.EllipticCurvePublicKey)
    assert leaf.public_key().curve.name == "secp256r1"
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["api.openai.com"]
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert leaf.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ca_ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ca_ski.digest
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc <= dt.timedelta(hours=25)


def test_a_ca_without_a_subject_key_identifier_still_signs_leaves_clients_accept():
    """Found on the real node: a CA made elsewhere (openssl may omit the extension) was loaded,
    then every interception failed with a 502."""
    import hashlib

    from cryptography.hazmat.primitives import serialization

    from tests.support.certs import foreign_ca

    cert, key = foreign_ca("no SKI", days=9)
    ca = CertificateAuthority(cert, key)
    leaf = mint_leaf(ca, "api.openai.com", ec.generate_private_key(ec.SECP256R1()))
    leaf.verify_directly_issued_by(cert)
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    public = cert.public_key().public_bytes(serialization.Encoding.X962,
                                            serialization.PublicFormat.UncompressedPoint)
    assert aki.key_identifier == hashlib.sha1(public).digest()  # RFC 5280, 4.2.1.2 (1)


def test_a_strict_python_client_accepts_a_minted_leaf(tmp_path):
    """VERIFY_X509_STRICT is Python 3.13's default; it rejects leaves without key identifiers."""
    ca = CertificateAuthority.generate()
    (tmp_path / "ca.pem").write_bytes(ca.cert_pem)
    server_context = LeafCache(ca).context_for("api.openai.com")
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve():
        conn, _ = listener.accept()
        with server_context.wrap_socket(conn, server_side=True) as tls:
            tls.sendall(b"hi")

    thread = threading.Thread(target=serve)
    thread.start()
    client = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
    client.verify_flags |= ssl.VERIFY_X509_STRICT
    with socket.create_connection(("127.0.0.1", port)) as raw, \
            client.wrap_socket(raw, server_hostname="api.openai.com") as tls:
        assert tls.recv(2) == b"hi"
        assert tls.selected_alpn_protocol() in (None, "http/1.1")
    thread.join()
    listener.close()


def test_leaves_are_cached_per_host():
    minted = []
    cache = LeafCache(CertificateAuthority.generate(), on_mint=lambda: minted.append(1))
    assert cache.context_for("a.test") is cache.context_for("a.test")
    cache.context_for("b.test")
    assert len(minted) == 2


def test_the_ca_is_created_once_and_then_reused(tmp_path):
    first = CertificateAuthority.load_or_create(tmp_path / "ca")
    assert (tmp_path / "ca" / "tls.key").stat().st_mode & 0o077 == 0
    again = CertificateAuthority.load_or_create(tmp_path / "ca")
    assert first.cert == again.cert


def test_a_mismatched_ca_key_is_refused(tmp_path):
    one, two = CertificateAuthority.generate(), CertificateAuthority.generate()
    one.save(tmp_path / "one")
    two.save(tmp_path / "two")
    (tmp_path / "one" / "tls.key").write_bytes((tmp_path / "two" / "tls.key").read_bytes())
    with pytest.raises(CAError, match="is not the key of"):
        CertificateAuthority.load(tmp_path / "one")


DOC = {"apiVersion": "keyhole.dev/v1alpha1", "kind": "SecretInjectionList", "items": [{"a": 1}]}


def test_a_signed_document_verifies_and_survives_key_order_changes():
    signed = sign(DOC, b"k" * 32)
    verify(dict(reversed(list(signed.items()))), b"k" * 32)


@pytest.mark.parametrize("tamper", [
    lambda d: d["items"].append({"b": 2}),
    lambda d: d.update(kind="Other"),
    lambda d: d.update(signature=d["signature"][:-1] + "0"),
    lambda d: d.pop("signature"),
])
def test_any_change_breaks_the_signature(tamper):
    import copy
    signed = copy.deepcopy(sign(DOC, b"k" * 32))
    tamper(signed)
    with pytest.raises(SignatureError):
        verify(signed, b"k" * 32)


def test_another_namespaces_key_does_not_verify():
    with pytest.raises(SignatureError, match="another namespace's key"):
        verify(sign(DOC, b"a" * 32), b"b" * 32)


# -- routes from the operator channel vs. the routes file -----------------------------------

def test_the_channel_routes_serve_while_they_are_the_newer():
    from keyhole_sidecar.config import newest_routes

    doc = {"kind": "SecretInjectionList"}
    assert newest_routes(None, 5.0) is None  # no channel: the file
    assert newest_routes((doc, 7.0), 5.0) is doc  # fetched after the file last changed
    # The operator away (no fetch since 7) while the kubelet delivered a newer file at 9:
    assert newest_routes((doc, 7.0), 9.0) is None
