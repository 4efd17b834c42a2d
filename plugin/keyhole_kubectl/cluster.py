"""Every API read the plugin makes, in one place: SecretInjections, pods and the CA bundle
ConfigMap of a namespace (or of every namespace with ``-A``), and the ClusterSecretInjections
(which namespaces each serves is in its status, so no namespace is read). Nothing is written,
and no Secret is read: the plugin needs only ``get``/``list`` on those, as ``kubectl get`` (the
chart's cluster-injections viewer role grants it for the cluster kind)."""

from __future__ import annotations

import json
import os
import ssl

import kubernetes
import urllib3
import yaml
from kubernetes.client.rest import ApiException

from keyhole_kubectl.snapshot import Namespace
from keyhole_operator.annotations import CA_BUNDLE_CONFIGMAP

GROUP, VERSION, PLURAL = "keyhole.dev", "v1alpha1", "secretinjections"
CLUSTER_PLURAL = "clustersecretinjections"
APPROVALS = "approvalrequests"


class ClusterError(RuntimeError):
    """The API server refused or could not be reached; the message says which and why."""


def connect(kubeconfig: str | None, context: str | None) -> tuple[kubernetes.client.ApiClient,
                                                                  str]:
    """An API client as kubectl would make it, and the context's namespace (or default)."""
    try:
        kubernetes.config.load_kube_config(config_file=kubeconfig, context=context)
        _, active = kubernetes.config.list_kube_config_contexts(config_file=kubeconfig)
        if context:
            contexts, _ = kubernetes.config.list_kube_config_contexts(config_file=kubeconfig)
            active = next(c for c in contexts if c["name"] == context)
        namespace = (active.get("context") or {}).get("namespace") or "default"
    except (yaml.YAMLError, AttributeError, TypeError, ValueError) as exc:
        where = kubeconfig or os.environ.get("KUBECONFIG") or "~/.kube/config"
        raise ClusterError(f"the kubeconfig {where} is not valid YAML or not a kubeconfig "
                           f"({type(exc).__name__}); check it with kubectl config view"
                           ) from None
    except (kubernetes.config.ConfigException, FileNotFoundError, StopIteration) as exc:
        try:
            kubernetes.config.load_incluster_config()
        except kubernetes.config.ConfigException:
            raise ClusterError(f"no usable kubeconfig ({exc}); pass --kubeconfig or set "
                               "KUBECONFIG") from None
        namespace = "default"
    configuration = kubernetes.client.Configuration.get_default_copy()
    configuration.retries = False  # as kubectl: an unreachable server is said at once
    return kubernetes.client.ApiClient(configuration), namespace


def _call(what: str, method, *args, **kwargs):
    try:
        return method(*args, **kwargs)
    except ApiException as exc:
        if not exc.status:  # the client's word for "no answer" (its TLS errors among them)
            raise ClusterError(_unreachable(what, exc)) from None
        if exc.status == 403:
            raise ClusterError(f"the API server refused to {what} (403): you need get/list on "
                               "secretinjections.keyhole.dev, pods and configmaps") from None
        if exc.status == 404 and "secretinjections" in what:
            raise ClusterError("the SecretInjection API is not installed in this cluster "
                               "(helm install keyhole charts/keyhole)") from None
        raise ClusterError(f"cannot {what}: {exc.status} {exc.reason}") from None
    except (OSError, urllib3.exceptions.HTTPError) as exc:  # refused, unreachable, TLS
        raise ClusterError(_unreachable(what, exc)) from None


def _unreachable(what: str, exc: BaseException) -> str:
    """One line naming why the API server could not be asked, and what to check."""
    reason = getattr(exc, "reason", None) or exc
    server = kubernetes.client.Configuration.get_default_copy().host
    if isinstance(reason, ssl.SSLError | urllib3.exceptions.SSLError) or "CERTIFICATE" in str(
            reason).upper():
        return (f"the API server at {server} presented a certificate that failed "
                f"verification, so nothing was asked ({what}); check the kubeconfig's "
                "certificate-authority-data for this cluster")
    cause = type(reason).__name__ if not isinstance(reason, str) else reason.splitlines()[0]
    return (f"cannot reach the API server at {server} to {what} ({cause}); check that the "
            "cluster is up and the kubeconfig's server address (kubectl cluster-info)")


def read(api: kubernetes.client.ApiClient, namespace: str | None) -> list[Namespace]:
    """One namespace, or (``None``) every namespace holding a SecretInjection."""
    custom = kubernetes.client.CustomObjectsApi(api)
    core = kubernetes.client.CoreV1Api(api)
    if namespace is None:
        found = _call("list secretinjections", custom.list_cluster_custom_object,
                      GROUP, VERSION, PLURAL)["items"]
        names = sorted({i["metadata"]["namespace"] for i in found})
        spaces = {name: Namespace(name) for name in names}
        for item in found:
            spaces[item["metadata"]["namespace"]].injections.append(item)
    else:
        spaces = {namespace: Namespace(namespace, _call(
            "list secretinjections", custom.list_namespaced_custom_object, GROUP, VERSION,
            namespace, PLURAL)["items"])}
    fleet = _cluster_injections(custom)
    for item in fleet:
        for served in (item.get("status") or {}).get("namespaces") or []:
            if namespace is None and served not in spaces:
                spaces[served] = Namespace(served)
            if served in spaces:
                spaces[served].cluster_injections.append(item)
    for space in spaces.values():
        space.grants = _grants(custom, space.name)
        pods = _call("list pods", core.list_namespaced_pod, space.name)
        space.pods = [api.sanitize_for_serialization(p) for p in pods.items]
        try:
            bundle = core.read_namespaced_config_map(CA_BUNDLE_CONFIGMAP, space.name)
            space.ca_bundle = dict(bundle.data or {})
        except ApiException as exc:
            if exc.status not in (403, 404):  # absent or not ours to read: no CA shown
                raise ClusterError(f"cannot read ConfigMap {CA_BUNDLE_CONFIGMAP}: "
                                   f"{exc.status} {exc.reason}") from None
    return [spaces[name] for name in sorted(spaces)]


def _grants(custom, namespace: str) -> list[dict]:
    """A namespace's AccessGrants; none when their API is not installed or not ours to read."""
    try:
        return custom.list_namespaced_custom_object(GROUP, VERSION, namespace,
                                                    "accessgrants")["items"]
    except ApiException as exc:
        if exc.status in (403, 404):
            return []
        raise ClusterError(f"cannot list accessgrants: {exc.status} {exc.reason}") from None


def grant(api: kubernetes.client.ApiClient, namespace: str, body: dict) -> dict:
    """Create an AccessGrant; the operator's webhook may refuse it, and says why."""
    custom = kubernetes.client.CustomObjectsApi(api)
    try:
        return custom.create_namespaced_custom_object(GROUP, VERSION, namespace,
                                                      "accessgrants", body)
    except ApiException as exc:
        if exc.status in (400, 403, 404, 422):
            raise ClusterError(f"the grant was refused: {_message(exc)}") from None
        raise ClusterError(f"cannot grant: {exc.status} {exc.reason}") from None
    except (OSError, urllib3.exceptions.HTTPError) as exc:
        raise ClusterError(_unreachable("grant", exc)) from None


def _cluster_injections(custom) -> list[dict]:
    """Every ClusterSecretInjection; none when their API is not installed or not ours to read
    (a namespace user the viewer role is not bound to sees the namespaced ones only)."""
    try:
        return custom.list_cluster_custom_object(GROUP, VERSION, CLUSTER_PLURAL)["items"]
    except ApiException as exc:
        if exc.status in (403, 404):
            return []
        raise ClusterError(f"cannot list clustersecretinjections: {exc.status} "
                           f"{exc.reason}") from None
    except OSError as exc:
        raise ClusterError(f"cannot reach the API server to list clustersecretinjections: "
                           f"{exc}") from None


# -- approvals ---------------------------------------------------------------------------------

def approvals(api: kubernetes.client.ApiClient, namespace: str | None) -> list[dict]:
    """The ApprovalRequests of a namespace, or (``None``) of every namespace."""
    custom = kubernetes.client.CustomObjectsApi(api)
    if namespace is None:
        return _call("list approvalrequests", custom.list_cluster_custom_object, GROUP,
                     VERSION, APPROVALS)["items"]
    return _call("list approvalrequests", custom.list_namespaced_custom_object, GROUP,
                 VERSION, namespace, APPROVALS)["items"]


def decide(api: kubernetes.client.ApiClient, namespace: str, name: str, body: dict) -> dict:
    """Write a decision (the ``status`` subresource); the operator's webhook may refuse it,
    and its message says why."""
    custom = kubernetes.client.CustomObjectsApi(api)
    try:
        return custom.patch_namespaced_custom_object_status(GROUP, VERSION, namespace,
                                                            APPROVALS, name, body)
    except ApiException as exc:
        if exc.status == 404:
            raise ClusterError(f"no ApprovalRequest {name} in namespace {namespace} (kubectl "
                               "keyhole approvals -n NAMESPACE lists what waits)") from None
        if exc.status in (400, 403, 422):
            raise ClusterError(f"the decision was refused: {_message(exc)}") from None
        raise ClusterError(f"cannot decide {name}: {exc.status} {exc.reason}") from None
    except (OSError, urllib3.exceptions.HTTPError) as exc:
        raise ClusterError(_unreachable(f"decide {name}", exc)) from None


def _message(exc: ApiException) -> str:
    """The API server's (or the webhook's) sentence, from the Status it answered."""
    try:
        return str(json.loads(exc.body).get("message"))[:2000]
    except (TypeError, ValueError, AttributeError):
        return f"{exc.status} {exc.reason}"
