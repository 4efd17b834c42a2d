import datetime as dt
import subprocess

from cryptography import x509

from keyhole_operator.mutation import layout
from keyhole_operator.trust import PREVIOUS_KEY, bundle_data, plan_ca, trusted_cas


def test_a_namespace_without_a_ca_gets_one():
    plan = plan_ca("agents", None)
    assert plan.changed and plan.reason == "created"
    cert = x509.load_pem_x509_certificate(plan.data["tls.crt"])
    assert "agents" in cert.subject.rfc4514_string()


def test_a_healthy_ca_is_left_alone():
    first = plan_ca("agents", None)
    again = plan_ca("agents", first.data)
    assert not again.changed and again.data == first.data


def test_a_ca_near_expiry_is_rotated_and_the_old_one_stays_trusted():
    first = plan_ca("agents", None)
    eleven_months_later = dt.datetime.now(dt.UTC) + dt.timedelta(days=340)
    rotated = plan_ca("agents", first.data, now=eleven_months_later)
    assert rotated.changed and rotated.reason == "rotated"
    assert rotated.data["tls.crt"] != first.data["tls.crt"]
    assert rotated.data[PREVIOUS_KEY] == first.data["tls.crt"]
    trusted = trusted_cas(rotated.data, now=eleven_months_later)
    assert [c.serial_number for c in trusted] == [
        x509.load_pem_x509_certificate(rotated.data["tls.crt"]).serial_number,
        x509.load_pem_x509_certificate(first.data["tls.crt"]).serial_number,
    ]


def test_an_expired_previous_ca_is_dropped():
    first = plan_ca("agents", None)
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=340)
    rotated = plan_ca("agents", first.data, now=later)
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
