"""End to end on a real node: the chart installed from the images built here, a tagged agent
Deployment admitted, mutated and started by the kubelet, and what a user would check from
``kubectl``: the start order, the key reaching the upstream and nowhere else, live revocation,
Secret and CA rotation, a killed sidecar, lost operator replicas, and memory.

The agent's clients use only what the webhook injected (proxy variables, CA bundle, base URL);
the upstream on the node (10.254.0.2:443, ``api.routed.test`` through the pods' hostAliases)
has a test CA that only the sidecars trust, through the chart's ``sidecar.upstreamCA``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import time
import uuid
from pathlib import Path

import pytest
from cryptography import x509

from tests.cluster.node import NODE_NAME
from tests.node.conftest import RELEASE_NAMESPACE, SECRET_VALUE, openai_injection, statuses
from tests.support.certs import foreign_ca, pem

BEARER = f"Bearer {SECRET_VALUE}"


def _marker() -> str:
    return uuid.uuid4().hex[:12]


def curl(agents, pod, marker: str, *flags: str) -> str:
    """curl in the agent, with the injected environment only; prints the status code."""
    return agents.exec(pod, "curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", *flags,
                       f"https://api.routed.test/v1/models?m={marker}", check=False).stdout


def nudge(agents, pod) -> None:
    """Change the pod (an annotation of no meaning): the kubelet syncs a changed pod at once,
    refreshing its Secret and ConfigMap volumes, instead of at its next periodic sync (1 min
    by default, as here). What a user can do too; revocation never needs it."""
    agents.kube.kubectl("annotate", "pod", pod["metadata"]["name"], "-n", agents.namespace,
                        f"example.test/nudge={uuid.uuid4().hex[:8]}", "--overwrite")


def restarts(pod: dict) -> dict[str, int]:
    return {name: s.get("restartCount", 0) for name, s in statuses(pod).items()}


_SELF_CHECK = """
import errno, hashlib, json, os, sys
if "KEYHOLE_AS" in os.environ:  # entered from the node: become the container's own process
    who = json.loads(os.environ["KEYHOLE_AS"])
    os.setgroups(who["groups"]); os.setgid(who["gid"]); os.setuid(who["uid"])
try:
    open("/written-by-this-container", "w")
    write = "allowed"
except OSError as exc:
    write = errno.errorcode[exc.errno]
seen = {"uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups(), "write": write}
token_dir = "/var/run/secrets/kubernetes.io/serviceaccount"  # the pod's API token, elsewhere
seen["api_token_dir"] = sorted(n for n in os.listdir(token_dir) if not n.startswith(".."))
if len(sys.argv) > 1:  # a file it must be able to read, and what it holds (as a hash)
    seen["file_gid"] = os.stat(sys.argv[1]).st_gid
    seen["file_sha256"] = hashlib.sha256(open(sys.argv[1], "rb").read().strip()).hexdigest()
print(json.dumps(seen))
"""


# -- install ------------------------------------------------------------------------------------

def test_the_operator_runs_as_real_pods_and_kubectl_shows_the_truth(release, agents, kube):
    deployment = kube.get("deployment", "keyhole-operator", RELEASE_NAMESPACE)
    assert deployment["status"].get("readyReplicas") == 2
    pods = release.operator_pods()
    assert len(pods) == 2
    for pod in pods:
        assert pod["spec"]["nodeName"] == NODE_NAME
        assert pod["status"]["phase"] == "Running"
        assert statuses(pod)["operator"]["ready"] is True
    # The operator image runs as the chart says: UID 65532 on a read-only root filesystem.
    seen = json.loads(kube.kubectl("exec", "-n", RELEASE_NAMESPACE, pods[0]["metadata"]["name"],
                                   "--", "python3", "-c", _SELF_CHECK).stdout)
    assert (seen["uid"], seen["write"]) == (65532, "EROFS")
    # PODS is what the injection selects now: the tagged pods in the namespace, whatever other
    # tests (in whatever order) have started or are still deleting.
    def printed_matches_selected() -> list[str]:
        listed = kube.kubectl("get", "si", "-n", agents.namespace).stdout.splitlines()
        header, row = listed[0].split(), listed[1].split()
        assert header[:4] == ["NAME", "HOSTS", "PODS", "READY"]
        selected = kube.kubectl("get", "pods", "-n", agents.namespace, "-l",
                                "keyhole.dev/openai=true", "-o", "name").stdout.split()
        assert row[0] == "openai" and row[3] == "True", listed
        assert selected and row[2] == str(len(selected)), (listed, selected)
        return listed

    kube.wait_for(printed_matches_selected, 60, "kubectl get si showing the selected pods")
    # The validating webhook answers through the chart's Service, from a real pod.
    bad = openai_injection()
    bad["metadata"]["name"] = "bad"
    bad["spec"]["hosts"] = ["10.0.0.1"]  # the CRD's schema allows it; keyhole's parser does not
    refused = kube.apply([bad], agents.namespace, check=False)
    assert refused.returncode != 0
    assert 'admission webhook "secretinjections.keyhole.dev" denied' in refused.stderr
    assert "is an IP address; keyhole routes by DNS name only" in refused.stderr


# -- a tagged agent -----------------------------------------------------------------------------

def test_the_sidecar_starts_and_is_ready_before_the_agent(agents):
    # A pod of its own: the shared agent's sidecar may have been restarted by another test
    # (a killed sidecar starts again after its agent), whatever order the tests run in.
    pod = agents.deploy("start-order", {"keyhole.dev/openai": "true"})
    sidecar = next(c for c in pod["spec"]["initContainers"] if c["name"] == "keyhole-proxy")
    assert sidecar["restartPolicy"] == "Always"
    assert "startupProbe" in sidecar
    found = statuses(pod)
    assert found["keyhole-proxy"]["started"] is True and found["keyhole-proxy"]["ready"] is True
    assert found["agent"]["ready"] is True
    sidecar_start = found["keyhole-proxy"]["state"]["running"]["startedAt"]
    agent_start = found["agent"]["state"]["running"]["startedAt"]
    assert sidecar_start <= agent_start
    # What the agent saw the moment it started: the sidecar already answered ready.
    assert agents.exec(pod, "cat", "/tmp/sidecar-ready-at-start").stdout == "200"
    agents.kube.kubectl("delete", "deployment", "start-order", "-n", agents.namespace)


def test_real_clients_reach_the_upstream_with_the_key_using_only_the_injected_environment(
        agents, node_upstream):
    pod = agents.pod("agent")
    markers = {name: _marker() for name in ("curl", "requests", "node")}
    assert curl(agents, pod, markers["curl"]) == "200"
    answer = agents.exec(pod, "python3", "-c", (
        "import requests, sys; r = requests.get(sys.argv[1]); print(r.status_code); "
        "print(r.text)"), f"https://api.routed.test/v1/models?m={markers['requests']}").stdout
    assert answer.splitlines()[0] == "200"
    assert SECRET_VALUE not in answer and "[REDACTED]" in answer  # the upstream echoes headers
    # Node 20's fetch reads no proxy variable: it uses the injected base URL instead.
    status = agents.exec(pod, "node", "-e", (
        "fetch(process.env.OPENAI_BASE_URL + '/models?m=' + process.argv[1])"
        ".then(r => console.log(r.status))"), markers["node"]).stdout.strip()
    assert status == "200"
    for client, marker in markers.items():
        received = node_upstream.one(marker)
        assert received.header("authorization") == [BEARER], client


def test_the_agent_container_holds_no_key(agents):
    pod = agents.pod("agent")
    environment = agents.exec(pod, "env").stdout
    assert "HTTPS_PROXY=http://127.0.0.1:15080" in environment
    assert SECRET_VALUE not in environment
    # Every file the agent can read, mounted volumes included (not /proc, /sys, /dev).
    search = agents.exec(pod, "grep", "-rlsF", "--exclude-dir=proc", "--exclude-dir=sys",
                         "--exclude-dir=dev", SECRET_VALUE, "/", check=False)
    assert search.returncode == 1 and search.stdout == "", search.stdout
    # Mount points as the kernel names them (Debian's /var/run is a link to /run).
    mounts = [line.split()[1] for line in
              agents.exec(pod, "cat", "/proc/self/mounts").stdout.splitlines()]
    assert any(m.endswith("/keyhole/trust") for m in mounts), mounts
    for private in ("secrets", "ca", "signing", "routes"):
        assert not [m for m in mounts if f"/keyhole/{private}" in m], mounts
    spec = next(c for c in pod["spec"]["containers"] if c["name"] == "agent")
    assert {m["name"] for m in spec.get("volumeMounts", [])} <= {
        "keyhole-trust", *[m["name"] for m in spec.get("volumeMounts", [])
                           if m["mountPath"].startswith("/var/run/secrets/kubernetes.io")]}


@pytest.mark.parametrize("fs_group", [None, 2000])
def test_the_sidecar_runs_unprivileged_on_a_read_only_root_and_reads_its_secret(agents, node,
                                                                                fs_group):
    if fs_group is None:
        pod = agents.pod("agent")
    else:
        pod = agents.deploy("agent-fsgroup", {"keyhole.dev/openai": "true"},
                            {"fsGroup": fs_group})
    secret = "/var/run/keyhole/secrets/openai-credentials/api-key"
    # Seen from the node as the sidecar's own process: nobody may kubectl exec into it.
    done = node.run_as_container(statuses(pod)["keyhole-proxy"]["containerID"], "python3", "-c",
                                 _SELF_CHECK, secret)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["uid"] == 65532 and seen["gid"] == 65532
    assert seen["write"] == "EROFS"
    assert seen["api_token_dir"] == []  # mounted, empty: the sidecar holds no API token
    assert seen["file_sha256"] == hashlib.sha256(SECRET_VALUE.encode()).hexdigest()
    if fs_group is not None:
        assert fs_group in seen["groups"] and seen["file_gid"] == fs_group
        agents.kube.kubectl("delete", "deployment", "agent-fsgroup", "-n", agents.namespace)


# -- live changes ----------------------------------------------------------------------------------

def _wait_for_request(agents, pod, node_upstream, *flags: str, want_key: bool,
                      timeout: float = 30, nudging: bool = False) -> float:
    """Send requests until the upstream sees one with (or without) the key; the seconds it
    took (a request every 0.2 s or so: the figure is that precise)."""
    started = time.monotonic()
    deadline = started + timeout
    last = None
    while time.monotonic() < deadline:
        if nudging:
            nudge(agents, pod)
        marker = _marker()
        curl(agents, pod, marker, *flags)
        found = node_upstream.find(marker)
        if found:
            last = found[0].header("authorization")
            if (last == [BEARER]) == want_key:
                return time.monotonic() - started
        time.sleep(0.2)
    raise AssertionError(f"no request {'with' if want_key else 'without'} the key reached the "
                         f"upstream in {timeout}s (last Authorization: {last})")


def _refused_503(agents, pod) -> bool:
    return curl(agents, pod, _marker()) == "503"


def test_removing_the_tag_revokes_at_once_and_putting_it_back_grants_without_restarts(
        agents, node_upstream):
    """On a kubelet with its default sync period (1 min): a label change is a change to the
    pod, which the kubelet syncs at once, refreshing the routes file; the figure goes to
    docs/operator.md."""
    pod = agents.pod("agent")
    before = restarts(pod)
    name = pod["metadata"]["name"]
    agents.kube.kubectl("label", "pod", name, "-n", agents.namespace, "keyhole.dev/openai-")
    # Unrouted now: the tunnel is blind, so the agent sees the upstream's own certificate
    # (-k accepts it) and the upstream sees the request exactly as the agent sent it.
    revoked = _wait_for_request(agents, pod, node_upstream, "-k", want_key=False)
    marker = _marker()
    assert curl(agents, pod, marker) != "200"  # the namespace CA no longer vouches for it
    assert node_upstream.find(marker) == []
    agents.kube.kubectl("label", "pod", name, "-n", agents.namespace, "keyhole.dev/openai=true")
    granted = _wait_for_request(agents, pod, node_upstream, want_key=True)
    assert restarts(agents.pod("agent")) == before
    print(f"\n[node] default kubelet sync: the key stopped {revoked:.1f}s after the label was "
          f"removed and came back {granted:.1f}s after it was put back")


def test_deleting_the_injection_revokes_at_once(agents, node_upstream):
    pod = agents.pod("agent")
    before = restarts(pod)
    agents.kube.kubectl("delete", "secretinjection", "openai", "-n", agents.namespace)
    try:
        revoked = _wait_for_request(agents, pod, node_upstream, "-k", want_key=False)
    finally:
        agents.kube.apply([openai_injection()], agents.namespace)
    granted = _wait_for_request(agents, pod, node_upstream, want_key=True)
    assert restarts(agents.pod("agent")) == before
    print(f"\n[node] default kubelet sync: the key stopped {revoked:.1f}s after the injection "
          f"was deleted and came back {granted:.1f}s after it was applied again")


def test_deleting_the_secret_stops_injection_and_its_return_restores_it(agents, node_upstream):
    """The sidecar mounts Secrets optional: the kubelet empties a deleted one on its next sync
    of the pod (here at once: the test changes the pod) and the sidecar refuses the host with
    503 rather than go on sending the last value."""
    pod = agents.pod("agent")
    before = restarts(pod)
    ns = agents.namespace
    agents.kube.kubectl("delete", "secret", "openai-credentials", "-n", ns)
    try:
        started = time.monotonic()
        while not _refused_503(agents, pod):
            assert time.monotonic() - started < 90, "the deleted Secret was still injected"
            nudge(agents, pod)
            time.sleep(0.2)
        refused = time.monotonic() - started
        marker = _marker()
        assert curl(agents, pod, marker) == "503" and node_upstream.find(marker) == []
    finally:
        agents.kube.kubectl("create", "secret", "generic", "openai-credentials", "-n", ns,
                            f"--from-literal=api-key={SECRET_VALUE}")
    _wait_for_request(agents, pod, node_upstream, want_key=True, timeout=90, nudging=True)
    assert restarts(agents.pod("agent")) == before
    print(f"\n[node] a deleted Secret was refused {refused:.1f}s after the deletion (the pod "
          "changed at once; otherwise at the kubelet's next sync)")


def test_an_updated_secret_reaches_the_running_sidecar_without_a_restart(agents, node_upstream):
    pod = agents.pod("agent")
    before = restarts(pod)
    rotated = SECRET_VALUE + "-rotated"

    def put(value: str) -> None:
        manifest = agents.kube.kubectl(
            "create", "secret", "generic", "openai-credentials", "-n", agents.namespace,
            f"--from-literal=api-key={value}", "--dry-run=client", "-o", "json").stdout
        agents.kube.kubectl("apply", "-f", "-", input=manifest)

    started = time.monotonic()
    put(rotated)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            nudge(agents, pod)
            marker = _marker()
            assert curl(agents, pod, marker) == "200"
            if node_upstream.one(marker).header("authorization") == [f"Bearer {rotated}"]:
                break
            time.sleep(0.5)
        else:
            raise AssertionError("the rotated key never reached the upstream")
        print(f"\n[node] the kubelet delivered the new Secret in {time.monotonic() - started:.1f}s")
    finally:
        put(SECRET_VALUE)
        nudge(agents, pod)
    _wait_for_request(agents, pod, node_upstream, want_key=True, timeout=90, nudging=True)
    assert restarts(agents.pod("agent")) == before


_LEAF_THROUGH_THE_PROXY = """
import base64, os, socket, ssl
sock = socket.create_connection(("127.0.0.1", 15080))
sock.sendall(b"CONNECT api.routed.test:443 HTTP/1.1\\r\\nHost: api.routed.test:443\\r\\n\\r\\n")
answer = sock.recv(4096)
assert answer.startswith(b"HTTP/1.1 200"), answer
tls = ssl.create_default_context(cafile=os.environ["SSL_CERT_FILE"]).wrap_socket(
    sock, server_hostname="api.routed.test")
print(base64.b64encode(tls.getpeercert(binary_form=True)).decode())
"""


def _leaf_issuer(agents, pod) -> x509.Name:
    """Who signed the certificate the sidecar presents to the agent right now."""
    der = base64.b64decode(agents.exec(pod, "python3", "-c", _LEAF_THROUGH_THE_PROXY).stdout)
    return x509.load_der_x509_certificate(der).issuer


def test_agents_keep_working_while_the_namespace_ca_rotates(agents, node_upstream):
    """The operator rotates a CA 30 days before it expires: the next CA is published to the
    agents' bundles first and signs only ``--ca-promote-after`` later (15 s here). To get there
    without waiting a year, the test brings in a CA 10 days from expiry the same safe way (first
    trusted, then signing); from then on it is the operator's rotation. A request every
    moment, through all of it, must succeed."""
    pod = agents.pod("agent")
    before = restarts(pod)
    ns = agents.namespace
    current = agents.kube.get("secret", "keyhole-ca", ns)["data"]
    old_cert, old_key = pem(*foreign_ca("keyhole test CA near expiry", days=10))
    old_subject = x509.load_pem_x509_certificate(old_cert).subject
    failures: list[str] = []
    sent = 0

    def keep_requesting_until(done, seconds: float, what: str) -> None:
        nonlocal sent
        deadline = time.monotonic() + seconds
        nudged = 0.0
        while time.monotonic() < deadline:
            if time.monotonic() - nudged > 2:  # the bundles and the CA Secret, delivered now
                nudge(agents, pod)
                nudged = time.monotonic()
            status = curl(agents, pod, _marker())
            sent += 1
            if status != "200":
                failures.append(f"{status} while waiting for {what}")
            if done():
                return
            time.sleep(0.3)
        raise AssertionError(f"{what}: not reached in {seconds}s")

    def patch(data: dict[str, bytes]) -> None:
        agents.kube.kubectl("patch", "secret", "keyhole-ca", "-n", ns, "--type=merge", "-p",
                            json.dumps({"data": {k: base64.b64encode(v).decode()
                                                 for k, v in data.items()}}))

    current_pem = base64.b64decode(current["tls.crt"])
    patch({"previous.crt": base64.b64decode(current.get("previous.crt", "")) + old_cert})
    keep_requesting_until(lambda: old_cert.decode().strip() in agents.exec(
        pod, "cat", "/var/run/keyhole/trust/ca.crt").stdout, 60, "the agent trusting the old CA")
    patch({"tls.crt": old_cert, "tls.key": old_key, "previous.crt": current_pem})
    keep_requesting_until(lambda: _leaf_issuer(agents, pod) == old_subject or
                          _rotated(agents, ns, old_cert, current_pem), 60,
                          "the sidecar signing with the old CA")

    def signed_by_the_rotated_ca() -> bool:
        rotated = _rotated(agents, ns, old_cert, current_pem)
        return bool(rotated) and _leaf_issuer(agents, pod) == rotated.subject

    keep_requesting_until(signed_by_the_rotated_ca, 120, "the sidecar signing with the rotated CA")
    assert failures == [], f"{len(failures)} of {sent} requests failed: {failures[:5]}"
    assert restarts(agents.pod("agent")) == before


def _rotated(agents, ns: str, *replaced: bytes) -> x509.Certificate | None:
    """The namespace's signing CA if the operator has replaced the given ones."""
    pem = base64.b64decode(agents.kube.get("secret", "keyhole-ca", ns)["data"]["tls.crt"])
    return None if pem in replaced else x509.load_pem_x509_certificate(pem)


def test_a_killed_sidecar_is_restarted_and_the_agent_is_not(agents, node, node_upstream):
    pod = agents.pod("agent")
    before = restarts(pod)
    container = statuses(pod)["keyhole-proxy"]["containerID"]
    os.kill(node.container_pid(container), signal.SIGKILL)

    def restarted() -> bool:
        found = statuses(agents.pod("agent"))
        return (found["keyhole-proxy"].get("restartCount", 0) == before["keyhole-proxy"] + 1
                and found["keyhole-proxy"].get("ready") is True)

    agents.kube.wait_for(restarted, 60, "the sidecar restarted and ready")
    _wait_for_request(agents, pod, node_upstream, want_key=True)
    assert restarts(agents.pod("agent"))["agent"] == before["agent"]


# -- operator replicas ------------------------------------------------------------------------------

def _evict(kube, pod: dict):
    eviction = {"apiVersion": "policy/v1", "kind": "Eviction",
                "metadata": {"name": pod["metadata"]["name"], "namespace": RELEASE_NAMESPACE}}
    return kube.kubectl("create", "--raw",
                        f"/api/v1/namespaces/{RELEASE_NAMESPACE}/pods/"
                        f"{pod['metadata']['name']}/eviction", "-f", "-",
                        input=json.dumps(eviction), check=False)


def _bare_pod(agents, name: str, labels: dict[str, str]) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": labels},
            "spec": {"containers": [{"name": "agent", "image": agents.images["agent"].name,
                                     "imagePullPolicy": "Never", "command": ["sleep", "600"]}],
                     "terminationGracePeriodSeconds": 1}}


def test_admission_keeps_working_while_one_operator_replica_lives(release, agents, kube):
    first, second = release.operator_pods()
    assert _evict(kube, first).returncode == 0
    refused = _evict(kube, second)  # the PodDisruptionBudget keeps one
    assert refused.returncode != 0 and "disruption budget" in refused.stderr, refused.stderr
    kube.apply([_bare_pod(agents, "tagged-during-eviction", {"keyhole.dev/openai": "true"})],
               agents.namespace)
    admitted = kube.get("pod", "tagged-during-eviction", agents.namespace)
    assert "keyhole-proxy" in [c["name"] for c in admitted["spec"].get("initContainers", [])]
    kube.kubectl("delete", "pod", "tagged-during-eviction", "-n", agents.namespace, "--wait=false")
    kube.kubectl("rollout", "status", "deployment/keyhole-operator", "-n", RELEASE_NAMESPACE,
                 "--timeout=120s")
    release.wait_until_admitting(agents.namespace)


def test_with_every_operator_replica_down_only_tagged_pods_are_refused(release, agents, kube):
    kube.kubectl("scale", "deployment/keyhole-operator", "-n", RELEASE_NAMESPACE, "--replicas=0")
    try:
        # Gone, not only terminating: a terminating replica still answers reviews.
        kube.wait_for(lambda: release.operator_pods(terminating=True) == [], 60,
                      "no operator pod")
        untagged = kube.apply([_bare_pod(agents, "untagged", {"app": "other"})], agents.namespace,
                              check=False)
        assert untagged.returncode == 0, untagged.stderr
        tagged = kube.apply([_bare_pod(agents, "tagged", {"keyhole.dev/openai": "true"})],
                            agents.namespace, check=False)
        assert tagged.returncode != 0
        assert "inject.keyhole.dev" in tagged.stderr, tagged.stderr
        # The API server's own policy still keeps the injection's Secret out of every pod.
        thief = _bare_pod(agents, "untagged-thief", {"app": "other"})
        thief["spec"]["containers"][0]["volumeMounts"] = [{"name": "k", "mountPath": "/k"}]
        thief["spec"]["volumes"] = [{"name": "k", "secret": {"secretName": "openai-credentials"}}]
        stolen = kube.apply([thief], agents.namespace, check=False)
        assert stolen.returncode != 0
        assert "reads a Secret that keyhole manages in namespace agents" in stolen.stderr
        kube.kubectl("delete", "pod", "untagged", "-n", agents.namespace, "--wait=false")
    finally:
        kube.kubectl("scale", "deployment/keyhole-operator", "-n", RELEASE_NAMESPACE,
                     "--replicas=2")
        kube.kubectl("rollout", "status", "deployment/keyhole-operator", "-n", RELEASE_NAMESPACE,
                     "--timeout=120s")
        release.wait_until_admitting(agents.namespace)


# -- resources -------------------------------------------------------------------------------------

_THOUSAND_REQUESTS = """
import json, requests, sys
session, codes = requests.Session(), {}
for i in range(1000):
    code = session.get(f"https://api.routed.test/v1/models?m={sys.argv[1]}-{i}").status_code
    codes[code] = codes.get(code, 0) + 1
print(json.dumps(codes))
"""


def test_memory_of_each_container_as_the_node_accounts_it(agents, node, node_upstream):
    """Reports each container's working set from the node's memory cgroup, after start and
    after 1,000 requests through the sidecar (figures, not limits: see docs/testing.md)."""
    pod = agents.pod("agent")
    uid = pod["metadata"]["uid"]
    ids = {name: s["containerID"] for name, s in statuses(pod).items()}

    def sample() -> dict[str, float]:
        return {name: node.cgroup_memory(uid, cid) / 2**20 for name, cid in ids.items()}

    idle = sample()
    marker = _marker()
    codes = json.loads(agents.exec(pod, "python3", "-c", _THOUSAND_REQUESTS, marker).stdout)
    assert codes == {"200": 1000}
    assert len(node_upstream.find(marker)) == 1000
    assert all(r.header("authorization") == [BEARER] for r in node_upstream.find(marker))
    loaded = sample()
    operator = release_memory(agents, node)
    operator_rss = [_rss(node.container_pid(statuses(p)["operator"]["containerID"])) / 2**20
                    for p in agents.kube.get_all("pods", RELEASE_NAMESPACE)
                    if p["metadata"].get("labels", {}).get("keyhole.dev/component") == "operator"]
    report = {"sidecar after start MiB": round(idle["keyhole-proxy"], 1),
              "sidecar after 1000 requests MiB": round(loaded["keyhole-proxy"], 1),
              "sidecar process RSS after 1000 requests MiB": round(
                  _rss(node.container_pid(ids["keyhole-proxy"])) / 2**20, 1),
              "agent after start MiB": round(idle["agent"], 1),
              **{f"operator {i} MiB": round(m, 1) for i, m in enumerate(operator)},
              **{f"operator {i} process RSS MiB": round(m, 1) for i, m in enumerate(operator_rss)}}
    print("\n[node] memory (cgroup working set): " + json.dumps(report))


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def release_memory(agents, node) -> list[float]:
    pods = [p for p in agents.kube.get_all("pods", RELEASE_NAMESPACE)
            if p["metadata"].get("labels", {}).get("keyhole.dev/component") == "operator"]
    return [node.cgroup_memory(p["metadata"]["uid"], statuses(p)["operator"]["containerID"]) / 2**20
            for p in pods]
