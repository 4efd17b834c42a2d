"""How the operator is configured: one frozen dataclass, a docstring per field.

Built once from the command line (see ``cli``); nothing reads the environment at import time.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SidecarResources:
    cpu_request: str = "50m"
    """CPU the sidecar requests."""
    memory_request: str = "64Mi"
    """Memory the sidecar requests."""
    cpu_limit: str | None = None
    """CPU limit; none by default so bursts are not throttled into latency."""
    memory_limit: str = "256Mi"
    """Memory limit (the proxy streams; it does not need more)."""


@dataclass(frozen=True)
class Settings:
    sidecar_image: str = "keyhole-sidecar:dev"
    """Image of the ``keyhole-proxy`` container (the chart sets it from its values)."""
    image_pull_policy: str = "IfNotPresent"
    """Pull policy of the sidecar image."""
    proxy_port: int = 15080
    """The proxy port, on 127.0.0.1 inside the pod."""
    admin_port: int = 15090
    """Health and metrics port of the sidecar."""
    unmatched: str = "passthrough"
    """What sidecars do with hosts no injection routes: ``passthrough`` or ``deny``."""
    otlp_endpoint: str | None = None
    """An OTLP/HTTP collector every sidecar sends a span per request to (None: no traces)."""
    native_sidecar: bool = True
    """Inject an init container with ``restartPolicy: Always`` (Kubernetes >= 1.29); else a
    regular container (then init containers run before the proxy and cannot use it)."""
    resources: SidecarResources = field(default_factory=SidecarResources)
    """Requests and limits of the sidecar."""
    no_proxy: tuple[str, ...] = ()
    """Extra NO_PROXY entries, e.g. the API server's address."""
    operator_service_account: str = "system:serviceaccount:keyhole-system:keyhole-operator"
    """The only user allowed to change ``keyhole.dev/`` annotations on pods."""
    java_truststore_password: str = "changeit"  # noqa: S105 - guards public certs only
    """Password of the PKCS12 trust store for Java (not a secret: it guards public certs)."""
    run_as_user: int = 65532
    """UID of the sidecar process (non-root)."""
    capture: str = "proxy"
    """How agent traffic reaches the sidecar when an injection does not say (``spec.capture``):
    ``proxy`` (the proxy variables) or ``transparent`` (keyhole-init redirects it too)."""
    transparent_port: int = 15081
    """The sidecar's transparent port, on 127.0.0.1 inside the pod."""
    capture_exempt_cidrs: tuple[str, ...] = ()
    """Destinations transparent capture leaves alone: the cluster's Service and Pod CIDRs."""
    ca_promote_after: float = 600.0
    """Seconds a namespace's next CA is in agents' bundles before sidecars sign with it: longer
    than the kubelets take to deliver a ConfigMap update (their sync period, 1 min by default)."""
    allowed_host_paths: tuple[str, ...] = ()
    """Node folders agents of injected pods may mount read-only (hostPath). None by default:
    a hostPath could reach the node's copies of every pod's Secrets. A prefix that contains or
    lies inside the kubelet's or a container runtime's folders is refused at start."""
    protected_secrets_configmap: str = ""
    """``NAMESPACE/NAME`` of the ConfigMap the chart's ValidatingAdmissionPolicy takes as its
    parameter: one key per namespace, the Secrets its injections use (empty: not published)."""
    channel_url: str | None = None
    """Where sidecars reach the operator channel (shared budgets), e.g.
    ``https://keyhole-webhook.keyhole-system.svc:9445``; None: no channel, and a budget
    ``for: injection`` refuses its requests (fail closed)."""
    channel_ca: str = ""
    """PEM of the CA that signed the channel's certificate: public material, delivered to
    sidecars in each namespace's trust ConfigMap."""
    cluster_secrets_namespace: str = "keyhole-system"
    """Where the Secrets of ClusterSecretInjections live (the chart: its release namespace). The
    operator reads them there and sends their values to the sidecars they serve."""
    identity_namespace: str = "keyhole-system"
    """Where each federated injection's ServiceAccount lives (the chart: its release
    namespace): nobody who may only create pods in an agent's namespace can mint its tokens."""
    approvals_keep_seconds: float = 86400.0
    """How long a decided or expired ApprovalRequest is kept before it is deleted."""
    cluster_values_keep_seconds: float = 300.0
    """How long a sidecar keeps serving a cluster injection's last values while the operator
    does not answer; then it refuses that injection's requests until the operator answers."""
    upstream_ca: str = ""
    """PEM certificates sidecars trust for upstream TLS besides the public roots (an internal
    CA for private APIs). Public material: it travels in each namespace's trust ConfigMap."""
