"""The admin port and the audit log: what an operator watches."""

from __future__ import annotations

from tests.integration.clients import curl


def test_healthz_and_readyz_answer(sidecar):
    assert sidecar.admin("/healthz") == (200, "ok\n")
    assert sidecar.admin("/readyz") == (200, "ready\n")


def test_metrics_count_requests_and_decisions_by_injection(sidecar, upstream, marker):
    before = sidecar.metric("keyhole_requests_total", injection="api", method="GET",
                            status_class="2xx")
    curl(sidecar, f"https://api.routed.test/{marker}")
    curl(sidecar, f"https://rules.routed.test/forbidden/{marker}")
    assert sidecar.metric("keyhole_requests_total", injection="api", method="GET",
                          status_class="2xx") == before + 1
    assert sidecar.metric("keyhole_decisions_total", decision="denied", reason="rule") >= 1
    assert sidecar.metric("keyhole_leaf_certificates_minted_total") >= 1
    assert sidecar.metric("keyhole_request_duration_seconds_count", injection="api") >= 1
    assert sidecar.metric("keyhole_upstream_duration_seconds_count", injection="api") >= 1
    assert sidecar.metric("keyhole_config_reloads_total", result="success") >= 1
    assert sidecar.metric("keyhole_injections") == 6


def test_metrics_never_label_with_paths_or_unrouted_host_names(sidecar, plain_upstream, marker):
    curl(sidecar, f"http://plain.unrouted.test:{plain_upstream.port}/{marker}")
    _, text = sidecar.admin("/metrics")
    assert marker not in text
    assert "plain.unrouted.test" not in text
    assert sidecar.metric("keyhole_requests_total", injection="-") >= 1


def test_one_audit_line_per_request_with_the_decision_and_no_query_values(sidecar, upstream, marker):
    curl(sidecar, f"https://query.routed.test/{marker}?q=private-search-term&key=x")
    record = sidecar.wait_audit(lambda r: marker in r["path"])
    assert record["mode"] == "intercept"
    assert record["method"] == "GET"
    assert record["host"] == "query.routed.test:443"
    assert record["path"] == f"/{marker}"
    assert record["query_keys"] == ["q", "key"]
    assert record["injection"] == "query"
    assert record["decision"] == "injected"
    assert record["status"] == 200
    assert record["bytes_out"] > 0
    assert record["duration_ms"] >= 0
    assert "private-search-term" not in (sidecar.workdir / "stdout.log").read_text()


def test_denied_requests_are_audited_with_the_reason_and_the_injection(sidecar, upstream,
                                                                       marker):
    before = sidecar.metric("keyhole_requests_total", injection="rules", method="GET",
                            status_class="4xx")
    reply = curl(sidecar, f"https://rules.routed.test/v1/admin/{marker}")
    assert "injection 'rules' refuses this request" in reply.body
    record = sidecar.wait_audit(lambda r: marker in r["path"])
    assert (record["injection"], record["host"], record["decision"], record["reason"],
            record["status"]) == ("rules", "rules.routed.test:443", "denied", "rule", 403)
    assert sidecar.metric("keyhole_requests_total", injection="rules", method="GET",
                          status_class="4xx") == before + 1


def test_base_url_lines_name_the_host_the_injection_sends_to(sidecar, upstream, marker):
    curl(sidecar, f"{sidecar.url}/api/v1/{marker}")
    curl(sidecar, "-X", "TRACE", f"{sidecar.url}/api/v1/{marker}-trace")
    sent = sidecar.wait_audit(lambda r: r["path"] == f"/api/v1/{marker}")
    assert (sent["mode"], sent["host"], sent["injection"]) == ("base-url", "api.routed.test:443",
                                                              "api")
    refused = sidecar.wait_audit(lambda r: r["path"] == f"/api/v1/{marker}-trace")
    assert (refused["host"], refused["injection"], refused["reason"]) == (
        "api.routed.test:443", "api", "echo_method")


def test_one_cause_has_one_reason_code_through_connect_and_as_a_plain_request(sidecar):
    """A name that does not resolve, reached through a CONNECT tunnel and as a plain request."""
    import subprocess

    done = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_connect}",
                           "https://nowhere.unrouted.invalid/"], env=sidecar.client_env(),
                          capture_output=True, text=True, timeout=60)
    assert done.stdout == "502"
    plain = curl(sidecar, "http://nowhere.unrouted.invalid/plain")
    assert plain.status == 502 and plain.header("X-Keyhole-Error") == "dns"
    tunnel = sidecar.wait_audit(lambda r: r["mode"] == "tunnel"
                                and r["host"] == "nowhere.unrouted.invalid:443")
    absolute = sidecar.wait_audit(lambda r: r["path"] == "/plain")
    assert absolute["host"] == "nowhere.unrouted.invalid:80"
    for record in (tunnel, absolute):
        assert (record["decision"], record["reason"], record["status"]) == ("error", "dns", 502)


def test_a_client_that_rejects_the_keyhole_ca_is_named_in_the_log(sidecar, upstream, marker):
    import subprocess

    env = sidecar.client_env(CURL_CA_BUNDLE=sidecar.extra_ca[0], SSL_CERT_FILE=sidecar.extra_ca[0])
    done = subprocess.run(["curl", "-sS", f"https://api.routed.test/{marker}"], env=env,
                          capture_output=True, text=True)
    assert done.returncode != 0
    sidecar.wait_for_log("client rejected the keyhole CA for api.routed.test")
    assert "SSL_CERT_FILE" in sidecar.stderr()
    assert upstream.find(marker) == []


def test_config_shows_what_is_served_with_fingerprints_and_never_a_value(sidecar):
    import hashlib
    import json

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from keyhole_sidecar import __version__
    from tests.support.config import ALL_SECRETS, API_TOKEN

    status, text = sidecar.admin("/config")
    assert status == 200
    config = json.loads(text)
    assert config["version"] == __version__
    assert config["configuration"] == {"matchesDisk": True, "rejected": None, "injections": 6,
                                       "available": 6}
    by_name = {i["name"]: i for i in config["injections"]}
    api = by_name["api"]
    assert api["hosts"] == ["api.routed.test"] and api["available"] is True
    assert api["credential"] == ["headers"] and api["sets"]["headers"] == ["Authorization"]
    assert api["secrets"] == [{"secret": "api-credentials", "key": "token", "fingerprint":
                               "sha256:" + hashlib.sha256(API_TOKEN.encode()).hexdigest()[:8]}]
    assert by_name["rules"]["rules"] == [
        {"methods": ["GET"], "paths": ["/v1/models/*", "/reflect"], "limits": None},
        {"methods": ["POST"], "paths": ["/v1/chat/completions"], "limits": None}]
    assert by_name["git"]["credential"] == ["basicAuth"]
    cert = x509.load_pem_x509_certificate(sidecar.ca_cert.read_bytes())
    assert config["ca"]["sha256"] == hashlib.sha256(
        cert.public_bytes(serialization.Encoding.DER)).hexdigest()
    assert config["ca"]["notAfter"] == cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert all(value not in text for value in ALL_SECRETS)
    assert str(sidecar.workdir) not in text  # no paths either


def test_config_and_metrics_say_which_injection_lost_its_secret(make_sidecar):
    import json

    proc = make_sidecar()
    (proc.secrets_dir / "maps" / "api-key").unlink()
    proc.wait_for_log("injection 'query' stopped injecting")
    config = json.loads(proc.admin("/config")[1])
    query = next(i for i in config["injections"] if i["name"] == "query")
    assert query["available"] is False
    assert query["problem"] == ("Secret 'maps' has no key 'api-key' (the Secret or the key was "
                                "removed)")
    assert query["secrets"] == [{"secret": "maps", "key": "api-key", "fingerprint": None}]
    assert config["configuration"]["available"] == 5
    assert proc.metric("keyhole_injection_available", injection="query") == 0


def test_build_info_names_the_version(sidecar):
    from keyhole_sidecar import __version__

    _, text = sidecar.admin("/metrics")
    line = next(line for line in text.splitlines() if line.startswith("keyhole_build_info{"))
    assert f'version="{__version__}"' in line and line.endswith(" 1.0")
