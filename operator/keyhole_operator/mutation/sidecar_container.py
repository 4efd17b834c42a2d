"""The ``keyhole-proxy`` container and the volumes only it mounts."""

from __future__ import annotations

from keyhole_operator import layout
from keyhole_operator.annotations import (
    CA_SECRET,
    CAPTURE_CONTAINER,
    INJECTIONS,
    SIDECAR_CONTAINER,
    SIGNING_KEY_SECRET,
)
from keyhole_operator.routes import Injection
from keyhole_operator.settings import Settings


def secret_keys(injections: list[Injection]) -> dict[str, list[str]]:
    """Secret name → the keys the injections read from it (only those get mounted). A cluster
    injection's Secrets are in the central namespace and never mounted: none of them."""
    keys: dict[str, set[str]] = {}
    for injection in injections:
        if injection.spec.cluster:
            continue
        for ref in injection.spec.secret_refs():
            keys.setdefault(ref.name, set()).add(ref.key)
    return {name: sorted(found) for name, found in sorted(keys.items())}


def _trace_env() -> list[dict]:
    """Which pod a sidecar's spans come from: the OpenTelemetry SDK reads the resource."""
    return [
        {"name": "KEYHOLE_POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "KEYHOLE_POD_NAMESPACE",
         "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "OTEL_RESOURCE_ATTRIBUTES",
         "value": "k8s.pod.name=$(KEYHOLE_POD_NAME),k8s.namespace.name=$(KEYHOLE_POD_NAMESPACE)"},
    ]


def sidecar_volumes(injections: list[Injection], settings: Settings) -> list[dict]:
    mode = layout.FILE_MODE
    # optional: a deleted Secret (or a key removed from it) then empties the files on the
    # kubelet's next sync of the pod, and the sidecar stops injecting it: deletion revokes.
    # Without it the kubelet keeps the last files it wrote and the sidecar the key.
    volumes = [
        {"name": layout.secret_volume_name(name),
         "secret": {"secretName": name, "defaultMode": mode, "optional": True,
                    "items": [{"key": key, "path": key} for key in keys]}}
        for name, keys in secret_keys(injections).items()
    ]
    volumes += [
        {"name": layout.CA_VOLUME,
         "secret": {"secretName": CA_SECRET, "defaultMode": mode,
                    "items": [{"key": "tls.crt", "path": "tls.crt"},
                              {"key": "tls.key", "path": "tls.key"}]}},
        {"name": layout.SIGNING_VOLUME,
         "secret": {"secretName": SIGNING_KEY_SECRET, "defaultMode": mode,
                    "items": [{"key": layout.SIGNING_KEY_FILE, "path": layout.SIGNING_KEY_FILE}]}},
        {"name": layout.ROUTES_VOLUME,
         "downwardAPI": {"defaultMode": mode, "items": [{
             "path": layout.ROUTES_FILE,
             "fieldRef": {"fieldPath": f"metadata.annotations['{INJECTIONS}']"}}]}},
        # Window counts outlive a restarted or crash-looping sidecar (not the pod): a few bytes.
        {"name": layout.STATE_VOLUME, "emptyDir": {"sizeLimit": "1Mi"}},
        no_api_token_volume(),
    ]
    if settings.channel_url:
        from keyhole_operator.annotations import CA_BUNDLE_CONFIGMAP

        # The operator channel: a token bound to this pod, for the operator alone (audience),
        # short-lived and renewed by the kubelet; and the CA of the channel's certificate.
        volumes.append({"name": layout.CHANNEL_VOLUME, "projected": {
            "defaultMode": mode, "sources": [
                {"serviceAccountToken": {"audience": layout.CHANNEL_AUDIENCE,
                                         "expirationSeconds": layout.CHANNEL_TOKEN_SECONDS,
                                         "path": layout.CHANNEL_TOKEN}},
                {"configMap": {"name": CA_BUNDLE_CONFIGMAP,
                               "items": [{"key": layout.CHANNEL_CA,
                                          "path": layout.CHANNEL_CA}]}}]}})
    if settings.upstream_ca:
        from keyhole_operator.annotations import CA_BUNDLE_CONFIGMAP

        volumes.append({"name": layout.UPSTREAM_CA_VOLUME, "configMap": {
            "name": CA_BUNDLE_CONFIGMAP, "defaultMode": mode,
            "items": [{"key": layout.UPSTREAM_CA, "path": layout.UPSTREAM_CA}]}})
    return volumes


def no_api_token_volume() -> dict:
    """Nothing, mounted read-only: what keyhole's containers see where the pod's API token
    would be (an emptyDir: the API server writes an empty projected volume's sources as null,
    which the protect-secrets policy's CEL cannot iterate). No sizeLimit: the kubelet measures
    an emptyDir with du, an empty directory takes a block (4 KiB on ext4), and a limit below
    that evicted every tagged pod a minute or two after it started."""
    return {"name": layout.NO_API_TOKEN_VOLUME, "emptyDir": {}}


NO_API_TOKEN_MOUNT = {"name": layout.NO_API_TOKEN_VOLUME, "mountPath": layout.API_TOKEN_DIR,
                      "readOnly": True}


def trust_volume() -> dict:
    """The namespace CA bundle for agent containers: public material only."""
    from keyhole_operator.annotations import CA_BUNDLE_CONFIGMAP

    return {"name": layout.TRUST_VOLUME,
            "configMap": {"name": CA_BUNDLE_CONFIGMAP, "defaultMode": layout.FILE_MODE,
                          "items": [{"key": k, "path": k} for k in (
                              layout.CA_CERT, layout.CA_BUNDLE, layout.WGETRC, layout.TRUSTSTORE)]}}


def wants_transparent(injections: list[Injection], settings: Settings) -> bool:
    """Whether any injection for the pod asks for transparent capture (or leaves it to a
    default of transparent)."""
    return any((i.spec.capture or settings.capture) == "transparent" for i in injections)


def capture_container(settings: Settings) -> dict:
    """keyhole-init: runs once before the sidecar, installs the redirect rules, exits.
    The only keyhole container with capabilities: NET_ADMIN and NET_RAW, nothing else."""
    exempt = [*settings.capture_exempt_cidrs, *(n for n in settings.no_proxy if _is_cidr(n))]
    return {
        "name": CAPTURE_CONTAINER,
        "image": settings.sidecar_image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": ["python3", "-m", "keyhole_sidecar.capture"],
        "args": ["--uid-owner-exempt", str(settings.run_as_user),
                 "--to-port", str(settings.transparent_port),
                 *[f"--exempt-cidr={cidr}" for cidr in dict.fromkeys(exempt)]],
        "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"memory": "64Mi"}},
        "securityContext": {
            "runAsUser": 0, "runAsGroup": 0, "runAsNonRoot": False,
            "readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [dict(NO_API_TOKEN_MOUNT)],
    }


def _is_cidr(text: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_network(text, strict=False)
    except ValueError:
        return False
    return True


def sidecar_container(injections: list[Injection], settings: Settings) -> dict:
    mounts = [
        {"name": layout.secret_volume_name(name), "mountPath": layout.secret_dir(name),
         "readOnly": True}
        for name in secret_keys(injections)
    ]
    mounts += [
        {"name": layout.CA_VOLUME, "mountPath": layout.CA_DIR, "readOnly": True},
        {"name": layout.SIGNING_VOLUME, "mountPath": layout.SIGNING_DIR, "readOnly": True},
        {"name": layout.ROUTES_VOLUME, "mountPath": layout.ROUTES_DIR, "readOnly": True},
        {"name": layout.STATE_VOLUME, "mountPath": layout.STATE_DIR},
        dict(NO_API_TOKEN_MOUNT),
    ]
    upstream_ca: list[str] = []
    if settings.upstream_ca:
        mounts.append({"name": layout.UPSTREAM_CA_VOLUME, "mountPath": layout.UPSTREAM_CA_DIR,
                       "readOnly": True})
        upstream_ca = ["--upstream-ca", f"{layout.UPSTREAM_CA_DIR}/{layout.UPSTREAM_CA}"]
    channel: list[str] = []
    if settings.channel_url:
        mounts.append({"name": layout.CHANNEL_VOLUME, "mountPath": layout.CHANNEL_DIR,
                       "readOnly": True})
        channel = ["--operator-url", settings.channel_url,
                   "--operator-ca", f"{layout.CHANNEL_DIR}/{layout.CHANNEL_CA}",
                   "--operator-token", f"{layout.CHANNEL_DIR}/{layout.CHANNEL_TOKEN}",
                   "--operator-values-keep-seconds",
                   f"{settings.cluster_values_keep_seconds:g}"]
    resources: dict = {"requests": {"cpu": settings.resources.cpu_request,
                                    "memory": settings.resources.memory_request},
                       "limits": {"memory": settings.resources.memory_limit}}
    if settings.resources.cpu_limit:
        resources["limits"]["cpu"] = settings.resources.cpu_limit
    container = {
        "name": SIDECAR_CONTAINER,
        "image": settings.sidecar_image,
        "imagePullPolicy": settings.image_pull_policy,
        "args": [
            "--injections", f"{layout.ROUTES_DIR}/{layout.ROUTES_FILE}",
            "--secrets-dir", layout.SECRETS_DIR,
            "--ca-dir", layout.CA_DIR,
            "--signing-key", f"{layout.SIGNING_DIR}/{layout.SIGNING_KEY_FILE}",
            "--listen", f"127.0.0.1:{settings.proxy_port}",
            "--admin-listen", f"0.0.0.0:{settings.admin_port}",
            "--unmatched", settings.unmatched,
            "--state-dir", layout.STATE_DIR,
            *upstream_ca,
            *channel,
            *(["--transparent-listen", f"127.0.0.1:{settings.transparent_port}"]
              if wants_transparent(injections, settings) else []),
            *(["--otlp-endpoint", settings.otlp_endpoint] if settings.otlp_endpoint else []),
        ],
        "ports": [{"name": "keyhole-admin", "containerPort": settings.admin_port,
                   "protocol": "TCP"}],
        "resources": resources,
        "securityContext": {
            "runAsNonRoot": True, "runAsUser": settings.run_as_user,
            "runAsGroup": settings.run_as_user, "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "startupProbe": {"httpGet": {"path": "/readyz", "port": settings.admin_port},
                         "periodSeconds": 1, "failureThreshold": 60},
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": settings.admin_port},
                           "periodSeconds": 5},
        # A sidecar that exits on error leaves its last log lines (never a value) in the pod's
        # status, where kubectl describe and kubectl keyhole explain show them.
        "terminationMessagePolicy": "FallbackToLogsOnError",
        **({"env": _trace_env()} if settings.otlp_endpoint else {}),
        "volumeMounts": mounts,
    }
    if settings.native_sidecar:
        container["restartPolicy"] = "Always"
    return container
