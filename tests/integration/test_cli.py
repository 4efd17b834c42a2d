"""The command line: ``check`` names every problem; bad starts fail with a clear message;
``--signing-key`` makes the sidecar obey only documents the operator signed."""

from __future__ import annotations

import json
import subprocess
import sys

from keyhole_common.spec import sign
from tests.integration.clients import curl
from tests.support.config import API_TOKEN, INJECTIONS, SECRETS, injection, ref
from tests.support.sidecar import check_config, start_sidecar, write_injections

SIDECAR = [sys.executable, "-m", "keyhole_sidecar"]


def run_check(tmp_path, injections, secrets=SECRETS, *extra):
    return check_config(tmp_path, injections, secrets, *extra)


def test_check_accepts_a_good_configuration_and_lists_it(tmp_path):
    done = run_check(tmp_path, INJECTIONS)
    assert done.returncode == 0, done.stderr
    assert "ok  api: api.routed.test ← Authorization" in done.stdout
    assert "ok  query: query.routed.test ← ?key" in done.stdout
    assert "6 injection(s) ok" in done.stdout
    assert API_TOKEN not in done.stdout + done.stderr


def test_check_names_every_problem_with_document_and_field(tmp_path):
    bad = [
        injection("one", hosts=["api.routed.test", "http://x.test/"],
                  headers=[{"name": "Authorization", "valueFrom": ref("missing", "key"),
                            "format": "Bearer"}], surprise=True),
        injection("two", hosts=["*.com"], basicAuth={"passwordFrom": ref("stripe", "secret-key")}),
    ]
    done = run_check(tmp_path, bad)
    assert done.returncode == 1
    err = done.stderr
    assert "inj.yaml#1 (one): spec.surprise: unknown field" in err
    assert "inj.yaml#1 (one): spec.hosts[1]: 'http://x.test/' must be a bare host name" in err
    assert "inj.yaml#1 (one): spec.headers[0].format: 'Bearer' must contain {value}" in err
    assert "inj.yaml#2 (two): spec.hosts[0]: '*.com' is too broad" in err
    assert "inj.yaml#2 (two): spec.basicAuth.usernameFrom: is required" in err


def test_check_names_a_missing_secret_file(tmp_path):
    done = run_check(tmp_path, INJECTIONS, {k: v for k, v in SECRETS.items() if k != "maps"})
    assert done.returncode == 1
    assert "query: secrets: Secret 'maps' not found: expected folder" in done.stderr


def test_two_injections_claiming_one_header_on_one_host_are_refused(tmp_path):
    clash = [INJECTIONS[0], injection("clash", hosts=["API.routed.test."],
                                      headers=[{"name": "authorization",
                                                "valueFrom": ref("rules", "key")}])]
    done = run_check(tmp_path, clash)
    assert done.returncode == 1
    assert "overlaps api.routed.test of injection 'api' and both set authorization" in done.stderr


def test_start_with_a_broken_configuration_exits_with_the_problems(tmp_path):
    done = start_sidecar(tmp_path, [injection("x", hosts=["a.test"])], SECRETS,
                         expect_failure=True)
    assert done.returncode == 2
    assert ("nothing to inject: give at least one of headers, basicAuth, queryParams, githubApp,"
            " oauth2, awsSigV4") in done.stderr


def test_start_with_a_missing_injections_file_says_so(tmp_path):
    done = subprocess.run([*SIDECAR, "--injections", str(tmp_path / "nope.yaml"), "--secrets-dir",
                           str(tmp_path)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert "nope.yaml: does not exist" in done.stderr


def test_start_with_a_corrupt_ca_says_so(tmp_path):
    (tmp_path / "ca").mkdir()
    (tmp_path / "ca" / "tls.crt").write_text("not a certificate")
    (tmp_path / "ca" / "tls.key").write_text("not a key")
    done = start_sidecar(tmp_path, INJECTIONS, SECRETS, expect_failure=True)
    assert done.returncode == 2
    assert "is not a PEM certificate" in done.stderr


# -- signed routes ---------------------------------------------------------------------------------

KEY = b"namespace-signing-key-0123456789"


def signed_document(injections) -> str:
    return json.dumps(sign({"apiVersion": "keyhole.dev/v1alpha1", "kind": "SecretInjectionList",
                            "items": injections}, KEY))


def test_an_unsigned_document_is_refused_when_a_signing_key_is_given(tmp_path):
    (tmp_path / "key").write_bytes(KEY)
    done = start_sidecar(tmp_path, INJECTIONS, SECRETS, args=["--signing-key",
                                                              str(tmp_path / "key")],
                         expect_failure=True)
    assert done.returncode == 2
    assert "must be one signed SecretInjectionList document" in done.stderr


def test_a_tampered_route_is_refused_and_the_signed_one_keeps_serving(make_sidecar, tmp_path,
                                                                      upstream, marker):
    """The attack: someone who can patch the pod points a mounted key at a host they own."""
    (tmp_path / "key").write_bytes(KEY)
    proc = make_sidecar(signed_document(INJECTIONS), args=["--signing-key", str(tmp_path / "key")])
    assert curl(proc, f"https://api.routed.test/{marker}-a").status == 200
    assert upstream.one(f"{marker}-a").header("Authorization") == [f"Bearer {API_TOKEN}"]

    document = json.loads(signed_document(INJECTIONS))
    document["items"][0]["spec"]["hosts"] = ["unrouted.test"]  # signature left as it was
    write_injections(proc.injections, json.dumps(document))
    proc.wait_for_log("signature does not match")

    curl(proc, f"https://unrouted.test/{marker}-b")
    assert upstream.one(f"{marker}-b").header("Authorization") == []  # the key went nowhere
    curl(proc, f"https://api.routed.test/{marker}-c")
    assert upstream.one(f"{marker}-c").header("Authorization") == [f"Bearer {API_TOKEN}"]


def test_a_newly_signed_document_is_obeyed(make_sidecar, tmp_path, upstream, marker):
    (tmp_path / "key").write_bytes(KEY)
    proc = make_sidecar(signed_document(INJECTIONS), args=["--signing-key", str(tmp_path / "key")])
    write_injections(proc.injections, signed_document(INJECTIONS[1:]))
    proc.wait_for_log("reloaded configuration")
    curl(proc, f"https://api.routed.test/{marker}")
    assert upstream.one(marker).header("Authorization") == []


def test_the_transparent_rules_recipe_is_printed_for_standalone_use():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "keyhole_sidecar", "transparent-rules",
                           "--uid-owner-exempt", "1234", "--exempt-cidr", "10.0.0.0/8"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert "-A KEYHOLE_CAPTURE -m owner --uid-owner 1234 -j RETURN" in done.stdout
    assert "-A KEYHOLE_CAPTURE -d 10.0.0.0/8 -j RETURN" in done.stdout
    assert "REDIRECT --to-ports 15081" in done.stdout
    assert "iptables -t nat -A OUTPUT -p tcp -j KEYHOLE_CAPTURE" in done.stdout
    refused = subprocess.run([sys.executable, "-m", "keyhole_sidecar", "transparent-rules",
                              "--exempt-cidr", "not-a-cidr"], capture_output=True, text=True,
                             timeout=30)
    assert refused.returncode == 2 and "is not a CIDR such as 10.96.0.0/12" in refused.stderr
