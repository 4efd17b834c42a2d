"""A real single-node cluster for the end-to-end tests: pods really started by a kubelet.

Everything runs in a network namespace of its own (``keyhole-node``), joined to the host by
one veth pair (host 10.254.0.1, node 10.254.0.2); the namespace has no default route, so
pods reach the node and each other and nothing else:

- etcd, kube-apiserver (on 10.254.0.2:6443, with the Node authorizer and NodeRestriction),
  kube-controller-manager and kube-scheduler, built from the pinned ``k8s.io/kubernetes``
  module (``controlplane.py``);
- containerd (Debian's) with its CRI plugin, runc, and a CNI bridge for pods (10.244.0.0/24);
  the sandbox image is built here (``images.py``), so nothing is ever pulled;
- the kubelet, registered as Node ``keyhole-node`` with its own client certificate, its pods
  in the cgroup ``/keyhole-node``;
- kube-proxy (iptables mode, inside the namespace), so Services route — the API server reaches
  the operator's webhook through its Service, pods reach the API server through ``kubernetes``.

Each component authenticates as itself (``system:node:keyhole-node``, ``system:kube-proxy``,
…) with a certificate from the test cluster CA. :func:`reap` removes what a killed run left:
processes in the node's cgroup, containerd's shims, mounts, the namespace.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tests.cluster.controlplane import SERVICE_CIDR, ControlPlane, _pem_cert
from tests.cluster.images import PAUSE_IMAGE, Image
from tests.cluster.kube import Kube
from tests.support import netns
from tests.support.ports import free_port

NETNS = "keyhole-node"
NODE_NAME = "keyhole-node"
HOST_LINK, NODE_LINK = "kh-host", "kh-node"
HOST_IP, NODE_IP = "10.254.0.1", "10.254.0.2"
POD_CIDR = "10.244.0.0/24"
POD_BRIDGE = "kh-pods"
API_PORT = 6443
CGROUP_ROOT = "keyhole-node"
STATE = Path("/run/keyhole-node")  # sockets and containerd's state; short paths for sockets
CONTAINERD_SOCKET = STATE / "containerd.sock"
_CGROUP_FS = Path("/sys/fs/cgroup")
_CONTROLLERS = ("cpu", "cpuacct", "cpuset", "memory", "pids", "blkio", "devices", "freezer",
                "systemd")


def _run(command: list[str], check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(command, capture_output=True, text=True, **kwargs)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {done.stderr.strip()[-2000:]}")
    return done


def _in_node(*command: str, check: bool = True) -> subprocess.CompletedProcess:
    return _run([*netns.wrap(NETNS), *command], check=check)


# -- cleaning up -----------------------------------------------------------------------------

def _cgroup_dirs(controller: str) -> list[Path]:
    top = _CGROUP_FS / controller / CGROUP_ROOT
    if not top.exists():
        return []
    return sorted((p for p in [top, *top.rglob("*")] if p.is_dir()),
                  key=lambda p: len(p.parts), reverse=True)


def _kill_cgroup() -> None:
    """SIGKILL every process in the node's cgroup (every container, every pod's pause)."""
    for _ in range(20):
        pids = set()
        for folder in _cgroup_dirs("pids") or _cgroup_dirs("memory"):
            try:
                pids |= {int(p) for p in (folder / "cgroup.procs").read_text().split()}
            except OSError:
                continue
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)


def _processes_naming(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in command:
            found.append(int(entry.name))
    return found


def _unmount_under(*prefixes: str) -> None:
    mounts = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
    for point in sorted(mounts, key=len, reverse=True):
        point = point.replace("\\040", " ")
        if any(point == p or point.startswith(p.rstrip("/") + "/") for p in prefixes):
            subprocess.run(["umount", "-l", point], capture_output=True)


def reap(root: Path | None = None) -> None:
    """Remove what a node left behind, whether it stopped cleanly or was killed."""
    _kill_cgroup()
    for marker in (str(CONTAINERD_SOCKET), str(STATE)):
        for pid in _processes_naming(marker):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    prefixes = [str(STATE)] + ([str(root)] if root else [])
    _unmount_under(*prefixes)
    for controller in _CONTROLLERS:
        for folder in _cgroup_dirs(controller):
            with contextlib.suppress(OSError):
                folder.rmdir()
    netns.delete(NETNS)
    netns.ip("link", "delete", HOST_LINK, check=False)
    shutil.rmtree(STATE, ignore_errors=True)


# -- the node --------------------------------------------------------------------------------

@dataclass
class Node:
    root: Path
    binaries: Path
    images: dict[str, Image]
    plane: ControlPlane | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def kube(self) -> Kube:
        return Kube(self.plane.kubeconfig, str(self.binaries / "kubectl"))

    @property
    def logs(self) -> Path:
        return self.plane.root / "logs"

    def start(self, timeout: float = 180) -> None:
        started = time.monotonic()
        reap(self.root)
        shutil.rmtree(self.root, ignore_errors=True)
        self.root.mkdir(parents=True)
        STATE.mkdir(parents=True, exist_ok=True)
        self._network()
        self._cgroups()
        pki = self.root / "plane" / "pki"
        self.plane = ControlPlane(
            self.root / "plane", port=API_PORT, address=NODE_IP, wrap=netns.wrap(NETNS),
            authorization="Node,RBAC", endpoint_reconciler="lease",
            admission_plugins="NodeRestriction,MutatingAdmissionWebhook,"
                              "ValidatingAdmissionWebhook",
            extra_args=["--kubelet-client-certificate", str(pki / "apiserver-kubelet-client.crt"),
                        "--kubelet-client-key", str(pki / "apiserver-kubelet-client.key"),
                        "--kubelet-preferred-address-types", "InternalIP"])
        self.plane.start(self.binaries)
        self.timings["control plane"] = time.monotonic() - started
        self._containerd()
        self._import_images()
        self.timings["containerd and images"] = time.monotonic() - started
        self._controller_manager()
        self._scheduler()
        self._kubelet()
        self._kube_proxy()
        self._wait_ready(started + timeout)
        self.timings["node Ready"] = time.monotonic() - started

    def stop(self) -> None:
        if self.plane is not None:
            for name in ("kube-proxy", "kubelet"):
                process = self.plane.processes.pop(name, None)
                if process and process.poll() is None:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
            _kill_cgroup()  # every container, before containerd goes
            self.plane.stop()
        reap(self.root)

    # -- pieces --------------------------------------------------------------------------

    def _network(self) -> None:
        netns.ip("netns", "add", NETNS)
        netns.ip("link", "add", HOST_LINK, "type", "veth", "peer", "name", NODE_LINK,
                 "netns", NETNS)
        netns.ip("addr", "add", f"{HOST_IP}/30", "dev", HOST_LINK)
        netns.ip("link", "set", HOST_LINK, "up")
        for args in (["link", "set", "lo", "up"],
                     ["addr", "add", f"{NODE_IP}/30", "dev", NODE_LINK],
                     ["link", "set", NODE_LINK, "up"],
                     # The pod bridge, made before the CNI plugin (which adopts it) so that
                     # Service addresses can have a route: the node's own connections need
                     # one before kube-proxy's DNAT applies. What is not DNATed ends there.
                     ["link", "add", POD_BRIDGE, "type", "bridge"],
                     ["link", "set", POD_BRIDGE, "up"],
                     ["route", "add", SERVICE_CIDR, "dev", POD_BRIDGE]):
            netns.ip(*args, netns=NETNS)
        _in_node("sysctl", "-qw", "net.ipv4.ip_forward=1")

    def _cgroups(self) -> None:
        """The kubelet's cgroup root must exist; cpuset needs its CPUs and memory nodes set."""
        for controller in _CONTROLLERS:
            top = _CGROUP_FS / controller
            if not top.is_dir():
                continue
            folder = top / CGROUP_ROOT
            folder.mkdir(exist_ok=True)
            if controller == "cpuset":
                for name in ("cpuset.cpus", "cpuset.mems"):
                    (folder / name).write_text((top / name).read_text())

    def _containerd(self) -> None:
        cni = self.root / "cni"
        cni.mkdir()
        (cni / "10-keyhole.conflist").write_text(json.dumps({
            "cniVersion": "1.0.0", "name": "keyhole-pods",
            "plugins": [{
                "type": "bridge", "bridge": POD_BRIDGE, "isGateway": True, "ipMasq": False,
                "hairpinMode": True,
                "ipam": {"type": "host-local", "ranges": [[{"subnet": POD_CIDR}]],
                         "routes": [{"dst": "0.0.0.0/0"}],
                         "dataDir": str(self.root / "cni-ipam")},
            }, {"type": "portmap", "capabilities": {"portMappings": True}}],
        }, indent=2))
        config = self.root / "containerd.toml"
        config.write_text(f"""version = 2
root = "{self.root / 'containerd'}"
state = "{STATE / 'containerd'}"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
                    "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs",
                    "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]

[grpc]
  address = "{CONTAINERD_SOCKET}"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  netns_mounts_under_state_dir = true
  enable_selinux = false
  # This machine's root lacks CAP_SYS_RESOURCE, so no process may lower its oom_score_adj
  # below 0 (runc's "failed to update /proc/self/oom_score_adj"): the CRI's -998 for pod
  # sandboxes, and the kubelet's negative scores for Guaranteed pods, are clamped to 0 here.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{cni}"
""")
        self.plane.spawn("containerd", ["containerd", "--config", str(config)])
        self._wait(lambda: CONTAINERD_SOCKET.exists() and self._ctr("version", check=False
                                                                     ).returncode == 0,
                   60, "containerd", "containerd")

    def _ctr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return _run(["ctr", "--address", str(CONTAINERD_SOCKET), "--namespace", "k8s.io", *args],
                    check=check)

    def _import_images(self) -> None:
        for image in self.images.values():
            self._ctr("images", "import", str(image.archive))
        listed = self._ctr("images", "ls", "-q").stdout
        missing = [i.name for i in self.images.values() if i.name not in listed
                   and f"docker.io/{i.name}" not in listed]
        if missing:
            raise RuntimeError(f"containerd did not list imported images {missing}:\n{listed}")

    def _controller_manager(self) -> None:
        config = self.plane.client_credentials("controller-manager",
                                               "system:kube-controller-manager")
        pki = self.plane.root / "pki"
        self.plane.spawn("kube-controller-manager", [
            str(self.binaries / "kube-controller-manager"), "--kubeconfig", str(config),
            "--authentication-kubeconfig", str(config), "--authorization-kubeconfig", str(config),
            "--bind-address", "127.0.0.1", "--secure-port", str(free_port()),
            "--leader-elect=false", "--use-service-account-credentials",
            "--service-account-private-key-file", str(pki / "sa.key"),
            "--root-ca-file", str(pki / "ca.crt"),
            "--cluster-signing-cert-file", str(pki / "ca.crt"),
            "--cluster-signing-key-file", str(pki / "ca.key"),
            "--service-cluster-ip-range", SERVICE_CIDR,
            "--node-monitor-grace-period", "20s",
            "--v=1",
        ])

    def _scheduler(self) -> None:
        config = self.plane.client_credentials("scheduler", "system:kube-scheduler")
        self.plane.spawn("kube-scheduler", [
            str(self.binaries / "kube-scheduler"), "--kubeconfig", str(config),
            "--authentication-kubeconfig", str(config), "--authorization-kubeconfig", str(config),
            "--bind-address", "127.0.0.1", "--secure-port", str(free_port()),
            "--leader-elect=false", "--v=1",
        ])

    def _kubelet(self) -> None:
        pki = self.plane.root / "pki"
        config = self.plane.client_credentials("kubelet", f"system:node:{NODE_NAME}",
                                               "system:nodes")
        cert, key = self.plane.ca.issue(NODE_NAME, dns=[NODE_NAME], ips=[NODE_IP], server=True)
        (pki / "kubelet-serving.crt").write_bytes(cert)
        (pki / "kubelet-serving.key").write_bytes(key)
        # Pods get no name server: nothing they resolve may leave the machine.
        resolv = self.root / "resolv.conf"
        resolv.write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
        settings = self.root / "kubelet.yaml"
        settings.write_text(yaml.safe_dump({
            "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
            "address": NODE_IP, "port": 10250, "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1", "healthzPort": 10248,
            "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": True},
                               "x509": {"clientCAFile": str(pki / "ca.crt")}},
            "authorization": {"mode": "Webhook"},
            "tlsCertFile": str(pki / "kubelet-serving.crt"),
            "tlsPrivateKeyFile": str(pki / "kubelet-serving.key"),
            "containerRuntimeEndpoint": f"unix://{CONTAINERD_SOCKET}",
            "cgroupDriver": "cgroupfs", "cgroupRoot": f"/{CGROUP_ROOT}",
            "failSwapOn": False, "failCgroupV1": False,
            "resolvConf": str(resolv),
            "podLogsDir": str(self.root / "pod-logs"),
            # syncFrequency: the default (1 min), as on a stock node: what revocation and
            # rotation are measured against. Tests that wait for a Secret's update change the
            # pod (tests/node/test_node.py: nudge), which syncs it at once, as a user can.
            "fileCheckFrequency": "20s", "nodeStatusUpdateFrequency": "4s",
            "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
            "evictionHard": {"memory.available": "50Mi", "nodefs.available": "1%",
                             "imagefs.available": "1%", "nodefs.inodesFree": "1%"},
            "serializeImagePulls": False, "maxPods": 60,
            "registerNode": True, "enableServer": True,
            "shutdownGracePeriod": "0s",
        }))
        self.plane.spawn("kubelet", [
            str(self.binaries / "kubelet"), "--config", str(settings),
            "--kubeconfig", str(config), "--root-dir", str(self.root / "kubelet"),
            "--hostname-override", NODE_NAME, "--node-ip", NODE_IP, "--v=1",
        ])

    def _kube_proxy(self) -> None:
        config = self.plane.client_credentials("kube-proxy", "system:kube-proxy")
        settings = self.root / "kube-proxy.yaml"
        settings.write_text(yaml.safe_dump({
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1", "kind": "KubeProxyConfiguration",
            "clientConnection": {"kubeconfig": str(config)},
            "hostnameOverride": NODE_NAME, "mode": "iptables",
            "clusterCIDR": POD_CIDR,
            "metricsBindAddress": "127.0.0.1:10249", "healthzBindAddress": "127.0.0.1:10256",
            "nodePortAddresses": [f"{NODE_IP}/32"],
            # The pod bridge does not pass through iptables (no br_netfilter here), so replies
            # between pods on it would skip the reverse NAT: masquerade every Service hop.
            "iptables": {"masqueradeAll": True, "syncPeriod": "10s", "minSyncPeriod": "0s"},
            # Leave the host's conntrack settings alone (they are not per namespace).
            "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s",
                          "tcpCloseWaitTimeout": "0s"},
        }))
        self.plane.spawn("kube-proxy", [str(self.binaries / "kube-proxy"), "--config",
                                        str(settings), "--v=1"])

    # -- waiting -------------------------------------------------------------------------

    def _wait(self, check, seconds: float, what: str, component: str) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            process = self.plane.processes.get(component)
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"{component} exited ({process.returncode}); its log:\n"
                                   + self.plane.log_tail(component))
            if check():
                return
            time.sleep(0.3)
        raise RuntimeError(f"{what} not ready after {seconds:.0f}s; the {component} log:\n"
                           + self.plane.log_tail(component))

    def _wait_ready(self, deadline: float) -> None:
        kube = self.kube

        def node_ready() -> bool:
            done = kube.kubectl("get", "node", NODE_NAME, "-o", "json", check=False)
            if done.returncode != 0:
                return False
            conditions = json.loads(done.stdout)["status"].get("conditions") or []
            return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

        self._wait(node_ready, deadline - time.monotonic(), "Node keyhole-node", "kubelet")

        def proxied() -> bool:  # kube-proxy has written the `kubernetes` Service's rules
            rules = _in_node("iptables-save", "-t", "nat", check=False).stdout
            return "default/kubernetes:https" in rules

        self._wait(proxied, max(10.0, deadline - time.monotonic()), "kube-proxy's rules",
                   "kube-proxy")

        def default_account() -> bool:  # the controller-manager works
            return kube.kubectl("get", "serviceaccount", "default", "-n", "default",
                                check=False).returncode == 0

        self._wait(default_account, max(10.0, deadline - time.monotonic()),
                   "the default ServiceAccount", "kube-controller-manager")

    # -- for tests -------------------------------------------------------------------------

    def listen(self, port: int) -> socket.socket:
        """A listening TCP socket on the node's address, inside the node's namespace."""
        with netns.entered(NETNS):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((NODE_IP, port))
            sock.listen(128)
        return sock

    def ca_pem(self) -> bytes:
        return _pem_cert(self.plane.ca.cert)

    def container_pid(self, container_id: str) -> int:
        """The host PID of a running container's first process, from containerd."""
        container_id = container_id.removeprefix("containerd://")
        for line in self._ctr("tasks", "ls").stdout.splitlines()[1:]:
            fields = line.split()
            if fields and fields[0] == container_id:
                return int(fields[1])
        raise AssertionError(f"containerd runs no task {container_id}")

    def run_as_container(self, container_id: str, *command: str) -> subprocess.CompletedProcess:
        """Run ``command`` from the node inside a container's mount namespace with exactly the
        credentials (UID, GID, supplementary groups) of the container's own process: what that
        process could do, observed without kubectl exec (which keyhole refuses for its sidecar).
        ``command`` runs as root first; ``KEYHOLE_AS`` tells it whom to become."""
        pid = self.container_pid(container_id)
        status = dict(line.split(":", 1) for line in
                      Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
        identity = {"uid": int(status["Uid"].split()[0]), "gid": int(status["Gid"].split()[0]),
                    "groups": [int(g) for g in status["Groups"].split()]}
        return subprocess.run(["nsenter", "--target", str(pid), "--mount", "--", *command],
                              capture_output=True, text=True, timeout=60,
                              env={"PATH": "/usr/local/bin:/usr/bin:/bin",
                                   "KEYHOLE_AS": json.dumps(identity)})

    def cgroup_memory(self, pod_uid: str, container_id: str) -> int:
        """A container's memory as the node accounts it (cgroup v1 ``memory.usage_in_bytes``
        less the page cache it could drop, as ``kubectl top`` reports working set)."""
        container_id = container_id.removeprefix("containerd://")
        for folder in _cgroup_dirs("memory"):
            if folder.name == container_id and f"pod{pod_uid}" in folder.parts[-2]:
                usage = int((folder / "memory.usage_in_bytes").read_text())
                stats = dict(line.split() for line in
                             (folder / "memory.stat").read_text().splitlines())
                return usage - int(stats.get("total_inactive_file", 0))
        raise AssertionError(f"no memory cgroup for container {container_id} of pod {pod_uid}")
