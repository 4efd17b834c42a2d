import datetime as dt
import subprocess

from cryptography import x509

from keyhole_operator import layout
from keyhole_operator.trust import (
    NEXT_CERT,
    NEXT_KEY,
    PREVIOUS_KEY,
    PROMOTE_AFTER,
    bundle_data,
    plan_ca,
    trusted_cas,
)


def test_a_namespace_without_a_ca_gets_one():
    plan = plan_ca("agents", None)
    assert plan.changed and plan.reason == "created"
    cert = x509.load_pem_x509_certificate(plan.data["tls.crt"])
    assert "agents" in cert.subject.rfc4514_string()


def test_a_healthy_ca_is_left_alone():
    first = plan_ca("agents", None)
    again = plan_ca("agents", first.data)
    assert not again.changed and again.data == first.data


def _serials(certs) -> list[int]:
    return [c.serial_number for c in certs]


def _serial(pem: bytes) -> int:
    return x509.load_pem_x509_certificate(pem).serial_number


def test_a_ca_near_expiry_is_first_published_then_signs_and_the_old_one_stays_trusted():
    first = plan_ca("agents", None)
    eleven_months_later = dt.datetime.now(dt.UTC) + dt.timedelta(days=340)
    published = plan_ca("agents", first.data, now=eleven_months_later)
    # Step 1: the next CA joins the bundle; the current one keeps signing.
    assert published.changed and published.reason == "next-published"
    assert published.data["tls.crt"] == first.data["tls.crt"]
    assert _serials(trusted_cas(published.data, now=eleven_months_later)) == [
        _serial(first.data["tls.crt"]), _serial(published.data[NEXT_CERT])]
    # Until promote_after has passed, nothing changes.
    waiting = plan_ca("agents", published.data, now=eleven_months_later + dt.timedelta(minutes=9))
    assert not waiting.changed and waiting.data == published.data
    # Step 2: the next CA signs; the old one stays trusted until it expires.
    later = eleven_months_later + PROMOTE_AFTER
    rotated = plan_ca("agents", published.data, now=later)
    assert rotated.changed and rotated.reason == "rotated"
    assert rotated.data["tls.crt"] == published.data[NEXT_CERT]
    assert rotated.data["tls.key"] == published.data[NEXT_KEY]
    assert rotated.data[PREVIOUS_KEY] == first.data["tls.crt"]
    assert NEXT_CERT not in rotated.data and NEXT_KEY not in rotated.data
    assert _serials(trusted_cas(rotated.data, now=later)) == [
        _serial(published.data[NEXT_CERT]), _serial(first.data["tls.crt"])]
    # The bundle agents mount carries every CA a sidecar may sign with, at every step.
    for step in (published, rotated):
        data, _ = bundle_data(step.data, "changeit")
        assert step.data["tls.crt"] in data[layout.CA_CERT].encode()


def test_an_expired_ca_is_replaced_by_the_published_next_one():
    from keyhole_common.ca import CertificateAuthority
    from keyhole_operator.trust import _key_pem

    short = CertificateAuthority.generate(common_name="short-lived", validity=dt.timedelta(days=1))
    published = plan_ca("agents", {"tls.crt": short.cert_pem, "tls.key": _key_pem(short)})
    assert published.reason == "next-published"
    replaced = plan_ca("agents", published.data, now=dt.datetime.now(dt.UTC) + dt.timedelta(days=2))
    assert replaced.reason == "replaced-expired"
    assert replaced.data["tls.crt"] == published.data[NEXT_CERT]


def test_an_expired_previous_ca_is_dropped():
    first = plan_ca("agents", None)
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=340)
    published = plan_ca("agents", first.data, now=later)
    rotated = plan_ca("agents", published.data, now=later + PROMOTE_AFTER)
    assert PREVIOUS_KEY in rotated.data
    two_years = dt.datetime.now(dt.UTC) + dt.timedelta(days=400)
    pruned = plan_ca("agents", rotated.data, now=two_years)
    assert PREVIOUS_KEY not in pruned.data


def test_a_corrupt_ca_is_replaced():
    plan = plan_ca("agents", {"tls.crt": b"garbage", "tls.key": b"garbage"})
    assert plan.changed and plan.reason == "replaced-invalid"


def test_the_bundle_holds_public_roots_and_the_namespace_ca(tmp_path):
    secret = plan_ca("agents", None).data
    data, binary = bundle_data(secret, "changeit")
    assert data[layout.CA_CERT] == secret["tls.crt"].decode()
    assert data[layout.CA_BUNDLE].endswith(secret["tls.crt"].decode())
    assert data[layout.CA_BUNDLE].count("BEGIN CERTIFICATE") > 100
    assert data[layout.WGETRC] == "ca_certificate = /var/run/keyhole/trust/ca-bundle.crt\n"
    total = sum(len(v) for v in data.values()) + sum(len(v) * 4 // 3 for v in binary.values())
    assert total < 1_000_000, "a ConfigMap holds at most 1 MiB"


def test_java_reads_the_trust_store_and_finds_the_namespace_ca(tmp_path):
    secret = plan_ca("agents", None).data
    _, binary = bundle_data(secret, "changeit")
    store = tmp_path / "truststore.p12"
    store.write_bytes(binary[layout.TRUSTSTORE])
    listing = subprocess.run(["keytool", "-list", "-keystore", str(store), "-storetype", "PKCS12",
                              "-storepass", "changeit"], capture_output=True, text=True, check=True)
    assert "keyhole-0" in listing.stdout
    assert "trustedCertEntry" in listing.stdout
