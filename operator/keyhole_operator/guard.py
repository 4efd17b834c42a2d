"""What nothing but the sidecar may do in an injected pod — pure decisions, one per way in.

keyhole's promise holds only while the ``keyhole-proxy`` container is the one thing that can
read its Secrets. These functions refuse every way a user who may create, patch and debug pods
(but not read Secrets) could reach them otherwise:

- :func:`pod_refusal` — at injection, on the pod as it will run: host namespaces, host paths,
  the privilege ceiling for agent containers, and every agent mount or variable that would
  expose a protected Secret or one of keyhole's volumes. One call decides; nothing depends on
  the API server calling the webhook again.
- :func:`update_refusal` — pod UPDATE: keyhole's containers and volumes never change.
- :func:`ephemeral_refusal` — ``pods/ephemeralcontainers``: a debug container may not target,
  mount or impersonate the sidecar, nor exceed the ceiling.
- :func:`port_forward_refusal` — ``pods/portforward`` (exec and attach into keyhole's
  containers are refused by the chart's ValidatingAdmissionPolicy, which needs no pod).

Each answer is ``None`` (allowed) or a message that says what was refused, why, and what to do.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterable
from dataclasses import dataclass

from keyhole_operator import layout
from keyhole_operator.annotations import (
    CA_SECRET,
    CAPTURE_CONTAINER,
    INJECTIONS,
    RESTART_REQUIRED,
    SIDECAR_CONTAINER,
    SIGNING_KEY_SECRET,
    STATUS,
)
from keyhole_operator.live import injected
from keyhole_operator.routes import Injection
from keyhole_operator.settings import Settings

KEYHOLE_CONTAINERS = (SIDECAR_CONTAINER, CAPTURE_CONTAINER)
KEYHOLE_SECRETS = (CA_SECRET, SIGNING_KEY_SECRET)
OPERATOR_ANNOTATIONS = (INJECTIONS, STATUS, RESTART_REQUIRED)
"""Pod annotations only keyhole writes: the webhook at injection, the operator afterwards."""
DANGEROUS_CAPABILITIES = frozenset({"ALL", "SYS_ADMIN", "SYS_PTRACE"})
"""Capabilities that reach into another container of the pod (ptrace, mount namespaces)."""

NODE_SECRET_DIRS = (
    "/var/lib/kubelet",  # every pod's Secret volumes, projected tokens, the kubelet's own keys
    "/var/lib/containerd", "/run/containerd", "/var/run/containerd",
    "/var/lib/docker", "/run/docker", "/var/run/docker", "/var/run/docker.sock",
    "/var/lib/containers", "/run/crio", "/var/run/crio", "/var/lib/crio",
    "/etc/kubernetes",  # the kubelet's credentials
    "/proc", "/sys", "/dev",  # every process of the node, its memory and its devices
)
"""Directories on a node from which any pod's Secrets can be read. No hostPath may reach them,
and no allowed hostPath prefix may contain or lie inside them."""


@dataclass(frozen=True)
class Protected:
    """What only the sidecar may reach in one pod."""

    secrets: frozenset[str]
    """Secrets no agent may mount or read: the injections', the namespace CA, the signing key."""
    volumes: frozenset[str]
    """keyhole's volumes no agent may mount (all of them but the public trust bundle)."""

    @classmethod
    def of(cls, secrets: Iterable[str], volumes: Iterable[str]) -> Protected:
        return cls(frozenset(secrets) | frozenset(KEYHOLE_SECRETS),
                   frozenset(volumes) - {layout.TRUST_VOLUME})

    @classmethod
    def from_status(cls, pod: dict) -> Protected | None:
        """What the webhook recorded when it injected ``pod`` (None: not injected)."""
        status = injected(pod)
        if status is None:
            return None
        return cls.of(status.get("secrets") or [], status.get("volumes") or [])


def managed_secrets(injections: Iterable[Injection]) -> list[str]:
    """The Secrets a namespace's injections use: no agent may read them, tagged or not. (A
    cluster injection's are in the central namespace, where no agent runs.)"""
    return sorted({ref.name for i in injections if not i.spec.cluster
                   for ref in i.spec.secret_refs()})


def check_allowed_host_paths(prefixes: Iterable[str]) -> None:
    """Refuse a setting that would let agents mount a node directory holding Secrets."""
    for prefix in prefixes:
        if not prefix.startswith("/"):
            raise ValueError(f"allowed host path {prefix!r} is not absolute")
        path = posixpath.normpath(prefix)
        for secret_dir in NODE_SECRET_DIRS:
            if _within(path, secret_dir) or _within(secret_dir, path):
                raise ValueError(f"allowed host path {prefix!r} overlaps {secret_dir}, where "
                                 "the node keeps every pod's Secrets; allow a narrower folder")


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


# -- the pod as it will run ----------------------------------------------------------------------

def pod_refusal(spec: dict, protected: Protected, settings: Settings, fix: str) -> str | None:
    """Why an injected pod must not run as ``spec`` says, or None. ``fix`` ends messages about
    the pod as a whole (how to opt out)."""
    for field, why in (
            ("hostNetwork", f"the proxy port 127.0.0.1:{settings.proxy_port} would be reachable "
                            "by every process on the node"),
            ("hostPID", "the agent would see every process of the node, the sidecar's among "
                        "them, and could read its memory and mounted secrets through /proc"),
            ("hostIPC", "the agent would share the node's IPC namespace and its shared memory"),
            ("shareProcessNamespace", "the agent could read the sidecar's memory and its "
                                      "mounted secrets through /proc")):
        if spec.get(field):
            return (f"keyhole will not inject a pod with {field}: true: {why}. Remove "
                    f"{field}, {fix}.")
    problem = _host_path_refusal(spec, settings)
    if problem:
        return problem
    for container in agent_containers(spec, ephemeral=True):
        problem = container_refusal(container, spec, protected, settings)
        if problem:
            return problem
    return None


def agent_containers(spec: dict, *, ephemeral: bool = False) -> list[dict]:
    """Every container but keyhole's own: init and regular ones, and ephemeral ones when
    asked (injection leaves those alone; refusals look at them too)."""
    fields = ("initContainers", "containers") + (("ephemeralContainers",) if ephemeral else ())
    return [c for field in fields for c in spec.get(field) or []
            if c.get("name") not in KEYHOLE_CONTAINERS]


def _host_path_refusal(spec: dict, settings: Settings) -> str | None:
    mounts_of: dict[str, list[tuple[str, dict]]] = {}
    for container in agent_containers(spec, ephemeral=True):
        for mount in container.get("volumeMounts") or []:
            mounts_of.setdefault(mount.get("name"), []).append((container.get("name"), mount))
    allowed = [posixpath.normpath(p) for p in settings.allowed_host_paths]
    for volume in spec.get("volumes") or []:
        host_path = (volume.get("hostPath") or {}).get("path")
        if host_path is None:
            continue
        path = posixpath.normpath(host_path)
        if not any(_within(path, folder) for folder in allowed):
            more = (f"; the folders allowed read-only are {', '.join(allowed)}" if allowed else
                    "; an administrator may allow named read-only folders with the chart value "
                    "webhook.allowedHostPaths")
            return (f"volume {volume.get('name')!r} mounts the node's {host_path}: in a pod "
                    "keyhole injects, a hostPath could reach the node's copies of every pod's "
                    f"Secrets (/var/lib/kubelet){more}. Use an emptyDir, a PersistentVolume "
                    "or a ConfigMap instead.")
        for container, mount in mounts_of.get(volume.get("name"), []):
            if not mount.get("readOnly"):
                return (f"container {container!r} mounts hostPath volume {volume.get('name')!r} "
                        f"({host_path}) writable; host folders are allowed only read-only in "
                        "pods keyhole injects: set readOnly: true on that mount.")
    return None


def container_refusal(container: dict, spec: dict, protected: Protected,
                      settings: Settings) -> str | None:
    """Why an agent (init, regular or ephemeral) container would break the ceiling, or None."""
    name = container.get("name")
    context = container.get("securityContext") or {}
    uid = context.get("runAsUser", (spec.get("securityContext") or {}).get("runAsUser"))
    if uid == settings.run_as_user:
        return (f"container {name!r} runs as UID {uid}, the keyhole sidecar's UID: it could "
                "act on the sidecar's processes and files. Run it as another user "
                "(securityContext.runAsUser).")
    if context.get("privileged"):
        return (f"container {name!r} is privileged: it could read any container's memory and "
                "the node's copies of the pod's Secrets. keyhole does not inject pods with "
                "privileged agents; drop privileged: true.")
    added = {str(c).upper().removeprefix("CAP_")
             for c in (context.get("capabilities") or {}).get("add") or []}
    if added & DANGEROUS_CAPABILITIES:
        return (f"container {name!r} adds {', '.join(sorted(added & DANGEROUS_CAPABILITIES))}: "
                "with it an agent can trace the sidecar or enter its mounts. Remove those "
                "capabilities.")
    exposed = secret_volumes(spec, protected.secrets)
    channel_tokens = channel_token_volumes(spec)
    for mount in container.get("volumeMounts") or []:
        volume = mount.get("name")
        if volume in channel_tokens:
            return (f"container {name!r} mounts volume {volume!r}, a ServiceAccount token for "
                    f"audience {layout.CHANNEL_AUDIENCE!r}: with it an agent could lease its "
                    "injections' shared budgets as if it were the sidecar. Remove that mount "
                    "(or give the token another audience).")
        if volume in protected.volumes:
            return (f"container {name!r} mounts keyhole's volume {volume!r}: only the keyhole "
                    "sidecar mounts it. Remove that mount (names starting with "
                    f"{layout.VOLUME_PREFIX!r} are reserved).")
        if exposed.get(volume) in KEYHOLE_SECRETS:
            return (f"container {name!r} mounts keyhole's own Secret {exposed[volume]!r}: with "
                    "it an agent could sign its own routes or impersonate any host. Remove that "
                    "volume; only the keyhole sidecar mounts it.")
        if volume in exposed:
            return (f"container {name!r} mounts Secret {exposed[volume]!r}, which keyhole "
                    "injects: the agent would hold the key itself. Remove that mount; the "
                    "keyhole sidecar adds the key to the agent's requests.")
    for variable in container.get("env") or []:
        secret = ((variable.get("valueFrom") or {}).get("secretKeyRef") or {}).get("name")
        if secret in protected.secrets:
            return (f"container {name!r} reads Secret {secret!r} into {variable.get('name')}, "
                    "and keyhole injects that Secret: the agent would hold the key itself. "
                    "Remove the variable (an agentEnv placeholder satisfies SDKs that want one).")
    for source in container.get("envFrom") or []:
        secret = (source.get("secretRef") or {}).get("name")
        if secret in protected.secrets:
            return (f"container {name!r} loads Secret {secret!r} with envFrom, and keyhole "
                    "injects that Secret: the agent would hold the key itself. Remove it.")
    ours = {settings.proxy_port, settings.admin_port, settings.transparent_port}
    for port in container.get("ports") or []:
        if port.get("containerPort") in ours:
            return (f"container {name!r} uses port {port.get('containerPort')}, which the "
                    f"keyhole sidecar needs (proxy {settings.proxy_port}, admin "
                    f"{settings.admin_port}, transparent {settings.transparent_port}). Change "
                    "the port.")
    return None


def channel_token_volumes(spec: dict) -> set[str]:
    """Volumes holding a projected ServiceAccount token meant for the operator channel."""
    return {volume.get("name") for volume in spec.get("volumes") or []
            for source in (volume.get("projected") or {}).get("sources") or []
            if (source.get("serviceAccountToken") or {}).get("audience")
            == layout.CHANNEL_AUDIENCE}


def secret_volumes(spec: dict, secrets: Iterable[str] | None = None) -> dict[str, str]:
    """Volume name → the Secret it exposes (plain or projected), limited to ``secrets``."""
    wanted = None if secrets is None else set(secrets)
    found: dict[str, str] = {}
    for volume in spec.get("volumes") or []:
        sources = [(volume.get("secret") or {}).get("secretName")]
        sources += [(s.get("secret") or {}).get("name")
                    for s in (volume.get("projected") or {}).get("sources") or []]
        for secret in sources:
            if secret is not None and (wanted is None or secret in wanted):
                found.setdefault(volume.get("name"), secret)
    return found


def forged_refusal(pod: dict) -> str | None:
    """A pod keyhole does not inject that arrives with keyhole's parts already in it: a
    container under a keyhole name (another image would run with the sidecar's place) or the
    annotations only keyhole writes (copied routes of another pod)."""
    spec = pod.get("spec") or {}
    for field in ("initContainers", "containers"):
        for container in spec.get(field) or []:
            if container.get("name") in KEYHOLE_CONTAINERS:
                return (f"container name {container.get('name')!r} is keyhole's: only keyhole's "
                        "webhook adds it, to pods a SecretInjection selects. Rename the "
                        "container, or tag the pod for an injection.")
    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    forged = sorted(k for k in OPERATOR_ANNOTATIONS if k in annotations)
    if forged:
        return (f"annotation {', '.join(forged)} is written by keyhole alone (it holds the "
                "routes a sidecar obeys); remove it from the pod or its template (a copy of an "
                "injected pod carries it).")
    return None


# -- changes to a running pod --------------------------------------------------------------------

def _keyhole_parts(pod: dict, protected: Protected) -> dict:
    spec = pod.get("spec") or {}
    containers = {(field, c.get("name")): c for field in ("initContainers", "containers")
                  for c in spec.get(field) or [] if c.get("name") in KEYHOLE_CONTAINERS}
    volumes = {v.get("name"): v for v in spec.get("volumes") or []
               if v.get("name") in protected.volumes | {layout.TRUST_VOLUME}}
    return {"containers": containers, "volumes": volumes}


def update_refusal(old: dict, new: dict) -> str | None:
    """Pod UPDATE: keyhole's containers (image, command, args, env, mounts — any field) and
    volumes stay exactly as injected, whoever asks; the operator never needs to change them."""
    protected = Protected.from_status(old)
    if protected is None:
        return None
    before, after = _keyhole_parts(old, protected), _keyhole_parts(new, protected)
    for (field, name), container in before["containers"].items():
        changed = after["containers"].get((field, name))
        if changed != container:
            what = sorted(k for k in container.keys() | (changed or {}).keys()
                          if container.get(k) != (changed or {}).get(k))
            return (f"the {name} container of an injected pod cannot be changed (you changed "
                    f"{', '.join(what) or 'it'}): it holds the injection's Secrets, and another "
                    "image or command would read them. To run another sidecar version, change "
                    "the keyhole chart's sidecar.image and restart the pod.")
    if before["volumes"] != after["volumes"]:
        return ("keyhole's volumes of an injected pod cannot be changed: they hold the "
                "injection's Secrets, the namespace CA and the signing key.")
    return None


def ephemeral_refusal(old: dict, new: dict, settings: Settings) -> str | None:
    """``pods/ephemeralcontainers`` on an injected pod: each new debug container stays out of
    the sidecar — no target, no mount, not its UID, not above the ceiling."""
    protected = Protected.from_status(old)
    if protected is None:
        return None
    before = {c.get("name") for c in (old.get("spec") or {}).get("ephemeralContainers") or []}
    spec = new.get("spec") or {}
    for container in (spec.get("ephemeralContainers") or []):
        if container.get("name") in before:
            continue
        target = container.get("targetContainerName")
        if target in KEYHOLE_CONTAINERS or container.get("name") in KEYHOLE_CONTAINERS:
            return (f"a debug container may not target {target or container.get('name')}: it "
                    "would share the sidecar's processes and read its Secrets through /proc. "
                    "Debug the agent container instead (kubectl debug --target=<agent>); for "
                    f"the sidecar, use kubectl logs -c {SIDECAR_CONTAINER} and its admin port "
                    f"{settings.admin_port} (/metrics, /readyz).")
        problem = container_refusal(container, spec, protected, settings)
        if problem:
            return f"debug {problem[0].lower()}{problem[1:]}"
    return None


def port_forward_refusal(options: dict, pod: dict | None, settings: Settings) -> str | None:
    """``kubectl port-forward`` into an injected pod: it reaches the pod's loopback, where the
    proxy listens. A client that names its ports at admission (WebSocket clients with
    ``?ports=``) may reach any port but the proxy's and the transparent one; kubectl names them
    only inside the stream, after admission, so its port-forwards to injected pods are refused.
    (exec and attach into keyhole's containers are refused by the chart's policy in the API
    server itself: that needs no pod.)"""
    if pod is None or Protected.from_status(pod) is None:
        return None
    proxy_ports = {settings.proxy_port, settings.transparent_port}
    asked = {int(p) for p in options.get("ports") or []}
    instead = (f"For the sidecar, read kubectl logs -c {SIDECAR_CONTAINER} and its admin port "
               f"{settings.admin_port} (/metrics, /readyz) at the pod's IP; for a port of the "
               "agent, use the API server's proxy (kubectl proxy, then /api/v1/namespaces/"
               "NAMESPACE/pods/POD:PORT/proxy/), which reaches the pod's IP, never its loopback.")
    if not asked:
        return ("port-forward into a pod keyhole injects is refused: it reaches the pod's "
                "loopback, where the proxy uses the injection's keys, and this client (kubectl "
                "among them) names its ports only after admission, so keyhole cannot tell which "
                f"it wants. {instead}")
    if asked & proxy_ports:
        return (f"port-forward to port {', '.join(map(str, sorted(asked & proxy_ports)))} of an "
                "injected pod is refused: it would let anyone outside the pod use the "
                f"injection's keys. {instead}")
    return None
