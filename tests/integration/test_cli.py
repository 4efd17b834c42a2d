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


# -- day two: what check and the command line tell an operator --------------------------------

def _fingerprint(value: str) -> str:
    import hashlib

    return "sha256:" + hashlib.sha256(value.encode()).hexdigest()[:8]


def test_check_verbose_lists_secret_keys_rules_limits_and_the_ca_but_never_a_value(tmp_path):
    import hashlib

    from cryptography.hazmat.primitives import serialization

    from keyhole_common.ca import CertificateAuthority
    from tests.support.config import ALL_SECRETS

    ca = CertificateAuthority.generate(common_name="check CA")
    ca.save(tmp_path / "ca")
    limited = [*INJECTIONS[:3], injection(
        "limited", hosts=["limited.routed.test"],
        headers=[{"name": "X-Api-Key", "valueFrom": ref("rules", "key")}],
        limits={"requestsPerMinute": 60, "window": {"perDay": 5000}},
        rules=[{"methods": ["GET"], "paths": ["/v1/**"], "limits": {"concurrentRequests": 2}}]),
        injection("mcp", hosts=["mcp.routed.test"],
                  headers=[{"name": "Authorization", "valueFrom": ref("rules", "key")}],
                  mcp={"tools": {"allow": ["get_*"], "deny": ["*delete*"], "when": [
                      {"match": ["get_file*"], "expression": "arguments.path != 'x'"}]},
                       "prompts": {"deny": ["*"]}})]
    done = run_check(tmp_path, limited, SECRETS, "--verbose", "--ca-dir", str(tmp_path / "ca"))
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "ok  api: api.routed.test ← Authorization (headers)" in out
    assert f"secret api-credentials/token: {_fingerprint(API_TOKEN)}" in out
    assert "ok  limited: limited.routed.test ← X-Api-Key (headers)" in out
    assert "rules[0]: GET /v1/**; limits 2 in flight" in out
    assert "limits: 60/min (burst 60), 5000/perDay" in out
    assert "ok  query: query.routed.test ← ?key (queryParams)" in out
    assert ("mcp tools: only get_*; never *delete*; get_file* when arguments.path != 'x'"
            in out)
    assert "mcp resources: all" in out and "mcp prompts: all; never *" in out
    der = ca.cert.public_bytes(serialization.Encoding.DER)
    assert f"CA: CN=check CA,O=keyhole, sha256 {hashlib.sha256(der).hexdigest()[:16]}…" in out
    assert all(value not in out + done.stderr for value in ALL_SECRETS)


def test_check_reads_a_file_with_a_secret_beside_the_injection_and_says_what_it_skipped(
        tmp_path):
    """The README's own examples/openai.yaml, with a Secret beside it in one file (as
    ``kubectl apply -f`` allows: a file a user keeps outside the repository)."""
    from pathlib import Path

    example = Path(__file__).parents[2] / "examples" / "openai.yaml"
    secret = ("apiVersion: v1\nkind: Secret\nmetadata: {name: openai-credentials}\n"
              "stringData: {api-key: from-the-cluster}\n---\n")
    secrets = {"openai-credentials": {"api-key": "sk-proj-example-0123456789"}}
    done = check_config(tmp_path, secret + example.read_text(), secrets)
    assert done.returncode == 0, done.stderr
    assert "ok  openai: api.openai.com ← Authorization" in done.stdout
    assert "skipped" in done.stderr
    assert "openai.yaml#1" not in done.stderr  # check names its own copy
    assert "inj.yaml#1: Secret openai-credentials: not a SecretInjection" in (
        done.stderr)


def test_an_empty_injections_file_is_an_error_and_an_empty_list_is_not(tmp_path):
    done = run_check(tmp_path, "# nothing yet\n")
    assert done.returncode == 1
    assert "holds no SecretInjection: nothing to serve" in done.stderr
    only_secret = run_check(tmp_path, "apiVersion: v1\nkind: Secret\nmetadata: {name: s}\n")
    assert only_secret.returncode == 1
    assert "holds no SecretInjection (only" in only_secret.stderr
    on_purpose = run_check(tmp_path, "apiVersion: keyhole.dev/v1alpha1\n"
                                     "kind: SecretInjectionList\nitems: []\n")
    assert on_purpose.returncode == 0, on_purpose.stderr
    assert "0 injection(s) ok" in on_purpose.stdout


def test_a_startup_error_is_printed_once(tmp_path):
    done = start_sidecar(tmp_path, [injection("x", hosts=["*.com"], headers=[
        {"name": "X", "valueFrom": ref("api-credentials", "token")}])], SECRETS,
        expect_failure=True)
    assert done.returncode == 2
    assert done.stderr.count("'*.com' is too broad") == 1
    assert "keyhole-sidecar check lists them too" in done.stderr


def test_a_port_in_use_names_the_flag_to_change(tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = start_sidecar(tmp_path, INJECTIONS, SECRETS, expect_failure=True,
                             args=["--admin-listen", f"127.0.0.1:{port}"])
    assert done.returncode == 2
    assert "--admin-listen: cannot listen (Address already in use)" in done.stderr


def test_an_unknown_command_is_named_and_transparent_rules_has_its_own_usage():
    unknown = subprocess.run([*SIDECAR, "chek", "--injections", "x"], capture_output=True,
                             text=True, timeout=30)
    assert unknown.returncode == 2
    assert "unknown command 'chek': the commands are check, transparent-rules" in unknown.stderr
    usage = subprocess.run([*SIDECAR, "transparent-rules", "--help"], capture_output=True,
                           text=True, timeout=30)
    assert usage.returncode == 0
    assert usage.stdout.startswith("usage: keyhole-sidecar transparent-rules")
    assert "--print" not in usage.stdout  # it only prints


def test_json_logs_are_one_object_per_line_even_for_multi_problem_errors(make_sidecar):
    proc = make_sidecar(args=["--log-format", "json"])
    proc.injections.write_text("apiVersion: keyhole.dev/v1alpha1\nkind: SecretInjection\n"
                               "metadata: {name: a}\nspec: {hosts: ['*.com'], surprise: 1}\n")
    proc.wait_for_log("configuration problem")
    lines = proc.stderr().splitlines()
    records = [json.loads(line) for line in lines]  # every line, or this raises
    assert {"time", "level", "logger", "message"} <= set(records[0])
    problems = [r for r in records if r["message"].startswith("configuration problem")]
    assert len(problems) >= 2 and all(r["level"] == "error" for r in problems)


def test_check_says_an_empty_secret_is_empty_and_warns_of_a_pasted_one(tmp_path):
    from tests.support.config import injection, ref

    injections = [injection("a", hosts=["a.test"], headers=[
        {"name": "Authorization", "valueFrom": ref("s", "empty")}]),
        injection("b", hosts=["b.test"], headers=[
            {"name": "Authorization", "valueFrom": ref("s", "quoted")}]),
        injection("c", hosts=["c.test"], headers=[
            {"name": "Authorization", "valueFrom": ref("s", "spaced")}])]
    done = check_config(tmp_path, injections, {"s": {
        "empty": "", "quoted": '"sk-quoted-0123456789"', "spaced": "sk-spaced-0123456789 "}})
    assert done.returncode == 1
    assert "s/empty: the value is empty; write the key into this file" in done.stderr
    assert "shorter than" not in done.stderr
    assert "s/quoted: it is wrapped in quotes, and it is sent exactly as it is" in done.stderr
    assert "s/spaced: it begins or ends with a space or tab" in done.stderr
    assert "sk-quoted" not in done.stderr + done.stdout  # never the value


def test_help_names_the_subcommands_and_describes_every_option():
    import sys
    from pathlib import Path

    bin_dir = Path(sys.executable).parent
    serve = subprocess.run([sys.executable, "-m", "keyhole_sidecar", "--help"],
                           capture_output=True, text=True, timeout=30).stdout
    assert "keyhole-sidecar check" in serve and "keyhole-sidecar transparent-rules" in serve
    assert "/config" in serve and "spec.llm budgets" in serve
    assert "--log-level {debug,info,warning,error}\n                        the sidecar's own log" \
        in serve
    check = subprocess.run([sys.executable, "-m", "keyhole_sidecar", "check", "--help"],
                           capture_output=True, text=True, timeout=30).stdout
    assert "edits apply live" not in check and "checked when present, never created" in check
    explain = subprocess.run([str(bin_dir / "kubectl-keyhole"), "explain", "--help"],
                             capture_output=True, text=True, timeout=30).stdout
    assert "its name, in -n NAMESPACE" in explain
    assert "kubectl keyhole explain si claude -n agents" in explain


def test_every_input_is_checked_before_a_ca_is_made_and_making_one_is_a_warning(tmp_path):
    from tests.support.config import INJECTIONS, SECRETS
    from tests.support.sidecar import start_sidecar

    (tmp_path / "bad.pem").write_text("not a certificate")
    failed = start_sidecar(tmp_path / "bad", INJECTIONS, SECRETS,
                           upstream_ca=str(tmp_path / "bad.pem"), expect_failure=True)
    assert failed.returncode != 0 and "--upstream-ca" in failed.stderr
    assert not (tmp_path / "bad" / "ca").exists()  # no CA made for a start that failed
    done = check_config(tmp_path / "check", INJECTIONS, SECRETS, "-v", "--ca-dir",
                        str(tmp_path / "nowhere"))
    assert f"CA: none yet; keyhole-sidecar would create one in {tmp_path / 'nowhere'}" in \
        done.stdout
    assert not (tmp_path / "nowhere").exists()
    sidecar = start_sidecar(tmp_path / "good", INJECTIONS, SECRETS)
    try:
        sidecar.wait_for_log("WARNING keyhole.certs: created a new keyhole CA in "
                             f"{(tmp_path / 'good' / 'ca').resolve()} (sha256 ")
    finally:
        sidecar.stop()
