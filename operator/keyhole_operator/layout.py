"""Where things live inside an injected pod: mount paths, volume names, file names.

The sidecar's command line and the agent containers' variables are both built from these,
so they cannot disagree.
"""

from __future__ import annotations

import hashlib

ROOT = "/var/run/keyhole"
SECRETS_DIR = f"{ROOT}/secrets"
CA_DIR = f"{ROOT}/ca"
SIGNING_DIR = f"{ROOT}/signing"
SIGNING_KEY_FILE = "key"
ROUTES_DIR = f"{ROOT}/routes"
ROUTES_FILE = "injections.json"
TRUST_DIR = f"{ROOT}/trust"
UPSTREAM_CA_DIR = f"{ROOT}/upstream-ca"
STATE_DIR = f"{ROOT}/state"  # the sidecar's spec.limits.window counts (an emptyDir)
CHANNEL_DIR = f"{ROOT}/channel"  # the operator channel: the pod-bound token and the CA
CHANNEL_TOKEN = "token"  # noqa: S105 - a file name
CHANNEL_AUDIENCE = "keyhole.dev"
CHANNEL_TOKEN_SECONDS = 600  # the shortest the API server issues; the kubelet renews it

# Keys of the keyhole-ca-bundle ConfigMap, mounted at TRUST_DIR in agent containers.
CA_CERT = "ca.crt"
CA_BUNDLE = "ca-bundle.crt"
WGETRC = "wgetrc"
TRUSTSTORE = "truststore.p12"
UPSTREAM_CA = "upstream-ca.crt"  # only with Settings.upstream_ca; mounted into the sidecar
CHANNEL_CA = "operator-ca.crt"  # only with Settings.channel_url; mounted into the sidecar

VOLUME_PREFIX = "keyhole-"
CA_VOLUME = "keyhole-ca"
SIGNING_VOLUME = "keyhole-signing"
ROUTES_VOLUME = "keyhole-routes"
TRUST_VOLUME = "keyhole-trust"
UPSTREAM_CA_VOLUME = "keyhole-upstream-ca"
STATE_VOLUME = "keyhole-state"
CHANNEL_VOLUME = "keyhole-channel"
# Mounted over the path where the API server's ServiceAccount admission puts the pod's API
# token, in keyhole's own containers: they never use it (the channel has its own token), and
# a container that already mounts that path is one the plugin leaves alone. Without it the
# plugin, run again after keyhole's patch, changed the pod, and with the chart's
# reinvocationPolicy IfNeeded the API server reviewed every tagged pod a second time.
NO_API_TOKEN_VOLUME = "keyhole-no-api-token"  # noqa: S105 - a volume name
API_TOKEN_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"  # noqa: S105 - a path

# Files in Secret, ConfigMap and downward-API volumes keyhole adds. Readable by the
# non-root sidecar: the kubelet makes these files root-owned unless the pod sets fsGroup,
# so 0400 would lock the sidecar out. These volumes are mounted into the sidecar only (the
# trust bundle, which holds no secret, is the exception), so the mode guards nothing another
# container could reach.
FILE_MODE = 0o444


def secret_volume_name(secret_name: str) -> str:
    """A DNS-label volume name for a Secret, stable across reinvocations (names may hold dots
    and run to 253 characters; volume names may not)."""
    return f"keyhole-secret-{hashlib.sha256(secret_name.encode()).hexdigest()[:12]}"


def secret_dir(secret_name: str) -> str:
    return f"{SECRETS_DIR}/{secret_name}"
