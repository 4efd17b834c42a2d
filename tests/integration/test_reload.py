"""Hot reload: edits to injections and secrets apply to the next requests without a restart;
a broken edit is refused with a log line naming the problem, and the last good config serves;
a removed Secret or key stops its injection at once."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from tests.integration.clients import curl
from tests.support.config import API_TOKEN, INJECTIONS, SECRETS, injection, ref
from tests.support.kubelet_files import write_atomically
from tests.support.sidecar import write_injections


def wait_until(check, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.1)


def sent_authorization(proc, upstream, marker_base: str) -> str:
    marker = f"{marker_base}-{time.monotonic_ns()}"
    curl(proc, f"https://api.routed.test/{marker}")
    return upstream.one(marker).header("Authorization")[0]


def test_a_changed_secret_is_used_by_the_next_requests(make_sidecar, upstream, marker):
    proc = make_sidecar()
    (proc.secrets_dir / "api-credentials" / "token").write_text("sk-rotated-NEWVALUE-000111\n")
    wait_until(lambda: sent_authorization(proc, upstream, marker)
               == "Bearer sk-rotated-NEWVALUE-000111")


def kubernetes_secret_volume(root: Path, name: str, values: dict[str, str]) -> None:
    """Write a Secret the way the kubelet does (see tests/support/kubelet_files.py)."""
    write_atomically(root / name, {key: value.encode() for key, value in values.items()})


def test_a_kubernetes_style_secret_swap_is_followed(make_sidecar, upstream, marker):
    proc = make_sidecar()
    secret_dir = proc.secrets_dir / "api-credentials"
    (secret_dir / "token").unlink()
    secret_dir.rmdir()
    kubernetes_secret_volume(proc.secrets_dir, "api-credentials", {"token": "sk-first-AAAA-1111"})
    wait_until(lambda: sent_authorization(proc, upstream, marker) == "Bearer sk-first-AAAA-1111")
    kubernetes_secret_volume(proc.secrets_dir, "api-credentials", {"token": "sk-second-BBBB-2222"})
    wait_until(lambda: sent_authorization(proc, upstream, marker) == "Bearer sk-second-BBBB-2222")


def test_an_edited_injection_applies_without_restart(make_sidecar, upstream, marker):
    proc = make_sidecar()
    assert curl(proc, f"https://other.routed.test/{marker}-before").status == 200
    assert upstream.one(f"{marker}-before").header("Authorization") == []  # not routed yet
    edited = [*INJECTIONS[1:], injection(
        "api", hosts=["api.routed.test", "other.routed.test"],
        headers=[{"name": "Authorization", "valueFrom": ref("api-credentials", "token"),
                  "format": "Bearer {value}"}])]
    write_injections(proc.injections, edited)

    def routed() -> bool:
        probe = f"{marker}-{time.monotonic_ns()}"
        curl(proc, f"https://other.routed.test/{probe}")
        return upstream.one(probe).header("Authorization") == [f"Bearer {API_TOKEN}"]

    wait_until(routed)


def test_removing_an_injection_revokes_access_even_on_an_open_tunnel(make_sidecar, upstream, marker):
    import http.client

    from tests.support.raw import open_tunnel

    proc = make_sidecar()
    with open_tunnel(proc.proxy_port, "api.routed.test:443", str(proc.ca_cert)) as tls:
        def ask(suffix: str) -> int:
            tls.sendall(f"GET /{marker}-{suffix} HTTP/1.1\r\nHost: api.routed.test\r\n\r\n".encode())
            response = http.client.HTTPResponse(tls)
            response.begin()
            response.read()
            return response.status

        assert ask("granted") == 200
        assert upstream.one(f"{marker}-granted").header("Authorization") == [f"Bearer {API_TOKEN}"]
        write_injections(proc.injections, INJECTIONS[1:])
        proc.wait_for_log("reloaded configuration")
        assert ask("revoked") == 200  # passed through untouched (--unmatched passthrough)
    assert upstream.one(f"{marker}-revoked").header("Authorization") == []


def test_a_broken_edit_is_refused_and_the_last_good_config_keeps_serving(make_sidecar, upstream,
                                                                        marker):
    proc = make_sidecar()
    broken = [injection("api", hosts=["api.routed.test"],
                        headers=[{"name": "Authorization", "valueFrom": ref("nope", "missing"),
                                  "format": "Bearer"}])]
    write_injections(proc.injections, broken)
    proc.wait_for_log("configuration rejected")
    # Each problem is a log line of its own, written after the one that announces them.
    proc.wait_for_log("must contain {value} exactly once")
    assert "keeping the last good configuration" in proc.stderr()
    assert proc.metric("keyhole_config_reloads_total", result="error") >= 1
    assert sent_authorization(proc, upstream, marker) == f"Bearer {API_TOKEN}"


def test_a_removed_secret_stops_injection_at_once_and_its_return_restores_it(
        make_sidecar, upstream, marker):
    """Removal is how users revoke: the last good value must not go on being sent."""
    proc = make_sidecar()
    token = proc.secrets_dir / "api-credentials" / "token"
    token.unlink()
    proc.wait_for_log("injection 'api' stopped injecting")
    assert "Secret 'api-credentials' has no key 'token'" in proc.stderr()
    reply = curl(proc, f"https://api.routed.test/{marker}")
    assert reply.status == 503
    assert reply.header("X-Keyhole-Error") == "secret_unavailable"
    assert "Secret 'api-credentials' has no key 'token'" in reply.body
    assert upstream.find(marker) == []
    assert proc.metric("keyhole_injection_available", injection="api") == 0
    assert proc.metric("keyhole_injection_available", injection="query") == 1
    # The rest of the configuration serves on, and the running one is what the disk says.
    assert curl(proc, f"https://query.routed.test/{marker}-other").status == 200
    assert proc.admin("/readyz")[0] == 200
    audit = proc.wait_audit(lambda r: r["path"] == f"/{marker}")
    assert (audit["injection"], audit["decision"], audit["reason"], audit["status"]) == (
        "api", "denied", "secret_unavailable", 503)

    shutil.rmtree(proc.secrets_dir / "api-credentials")  # the whole Secret, too
    proc.wait_for_log("Secret 'api-credentials' not found")
    assert "Secret 'api-credentials' is missing" in curl(
        proc, f"https://api.routed.test/{marker}-gone").body

    token.parent.mkdir()
    token.write_text(API_TOKEN + "\n")
    proc.wait_for_log("reloaded configuration: 6 injection(s)")
    assert sent_authorization(proc, upstream, marker + "-back") == f"Bearer {API_TOKEN}"
    assert API_TOKEN not in proc.stderr()


def test_a_removed_secret_stops_injection_even_while_the_file_is_rejected(make_sidecar,
                                                                         upstream, marker):
    """A broken injections file keeps the last good injections, not their removed keys."""
    proc = make_sidecar()
    proc.injections.write_text("apiVersion: [unclosed\n")
    proc.wait_for_log("not valid YAML or JSON")
    (proc.secrets_dir / "api-credentials" / "token").unlink()
    proc.wait_for_log("injection 'api' stopped injecting")
    assert curl(proc, f"https://api.routed.test/{marker}").status == 503
    assert upstream.find(marker) == []
    assert proc.admin("/readyz")[0] == 503  # and the file is still rejected


def test_invalid_yaml_on_reload_is_named(make_sidecar):
    proc = make_sidecar()
    proc.injections.write_text("apiVersion: [unclosed\n")
    proc.wait_for_log("not valid YAML or JSON")
    # Still serving the last good config, and saying so: not ready until the file is fixed.
    assert proc.admin("/readyz")[0] == 503


def test_a_secret_with_a_control_character_is_refused(make_sidecar):
    proc = make_sidecar()
    (proc.secrets_dir / "api-credentials" / "token").write_text("sk-bad\x07value-123456\n")
    proc.wait_for_log("control character 0x07")
    assert "sk-bad" not in proc.stderr()


def test_secrets_dir_unused_keys_do_not_matter(make_sidecar, upstream, marker):
    secrets = {**SECRETS, "unused": {"k": "whatever-value-here"}}
    proc = make_sidecar(secrets=secrets)
    assert sent_authorization(proc, upstream, marker) == f"Bearer {API_TOKEN}"


def test_a_rotated_ca_signs_new_leaves_without_a_restart(make_sidecar, tmp_path):
    import ssl

    import pytest

    from keyhole_common.ca import CertificateAuthority
    from tests.support.raw import open_tunnel

    proc = make_sidecar()
    old_ca = tmp_path / "old-ca.pem"
    old_ca.write_bytes(proc.ca_cert.read_bytes())
    with open_tunnel(proc.proxy_port, "api.routed.test:443", str(old_ca)):
        pass  # before: signed by the first CA
    rotated = CertificateAuthority.generate(common_name="rotated keyhole CA")
    rotated.save(tmp_path / "new-ca")
    for name in ("tls.key", "tls.crt"):
        (proc.workdir / "ca" / name).write_bytes((tmp_path / "new-ca" / name).read_bytes())
    proc.wait_for_log("new leaf certificates are signed by")

    with open_tunnel(proc.proxy_port, "api.routed.test:443", str(tmp_path / "new-ca" / "tls.crt")):
        pass  # after: verifies against the new CA alone
    with pytest.raises(ssl.SSLCertVerificationError), open_tunnel(
            proc.proxy_port, "api.routed.test:443", str(old_ca)):
        pass
    assert proc.process.poll() is None
