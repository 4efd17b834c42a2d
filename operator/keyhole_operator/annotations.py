"""Every label and annotation keyhole reads or writes: the public contract, in one place.

Changing a value here is an API change. Everything lives under ``keyhole.dev/``.
"""

PREFIX = "keyhole.dev/"

# -- on pods ---------------------------------------------------------------------------------

INJECTIONS = PREFIX + "injections"
"""Pod annotation, written only by the operator: the signed SecretInjectionList (JSON) the
sidecar obeys, delivered to it through a downward-API volume. Rewritten live when the pod's
labels or the matching injections change."""

STATUS = PREFIX + "status"
"""Pod annotation, written by the webhook: JSON record of what was injected (sidecar image,
injections, mounted Secrets) so reinvocation and live grants know what the pod can do."""

INJECT = PREFIX + "inject"
"""Pod annotation set by users: ``"false"`` opts the pod out of injection entirely."""

RESTART_REQUIRED = PREFIX + "restart-required"
"""Pod annotation, written by the operator: a grant needs a Secret this pod has not mounted;
it names the Secrets. Restarting the pod (e.g. ``kubectl rollout restart``) applies it."""

# -- on namespaces ---------------------------------------------------------------------------

NAMESPACE_INJECTION = PREFIX + "injection"
"""Namespace label: ``"disabled"`` makes the webhook skip every pod in the namespace (the Helm
chart's namespaceSelector also honours it, so the API server does not even call us)."""

CLUSTER_INJECTIONS_LABEL = PREFIX + "cluster-injections"
"""Namespace label set by cluster admins: ``"disabled"`` keeps every ClusterSecretInjection
out of the namespace, whatever their namespaceSelectors say. Namespaces are cluster-scoped,
so a namespace's own admins cannot set it (nor any label a namespaceSelector reads)."""

# -- on Secrets ------------------------------------------------------------------------------

CLUSTER_SECRET_LABEL = PREFIX + "cluster-injection"
"""Secret label in the central namespace: ``"true"`` lets ClusterSecretInjections use the
Secret. Without it the operator sends none of its values: whoever may create a cluster
injection could otherwise have any Secret of keyhole's namespace (its master key among them)
sent to a pod of theirs. Labelling a Secret is the Secret owner's consent."""

# -- on objects the operator creates ----------------------------------------------------------

MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY = "keyhole"
COMPONENT_LABEL = PREFIX + "component"
"""Label on the Secrets and ConfigMaps the operator owns: ``ca``, ``ca-bundle``, ``signing-key``."""

CA_ROTATED_AT = PREFIX + "ca-rotated-at"
"""Annotation on the ``keyhole-ca`` Secret: when the current CA took over (RFC 3339)."""

# -- names -----------------------------------------------------------------------------------

CA_SECRET = "keyhole-ca"  # noqa: S105 - a Secret name, not a password
CA_BUNDLE_CONFIGMAP = "keyhole-ca-bundle"
SIGNING_KEY_SECRET = "keyhole-signing-key"  # noqa: S105 - a name
SIDECAR_CONTAINER = "keyhole-proxy"
CAPTURE_CONTAINER = "keyhole-init"  # transparent capture: installs the redirect rules
POD_SECURITY_LABEL = "pod-security.kubernetes.io/enforce"  # Kubernetes' own namespace label


def is_keyhole_key(key: str) -> bool:
    return key.startswith(PREFIX)
