"""All Kubernetes API calls the operator makes outside kopf's own machinery, in one place.

Synchronous (the official client); kopf runs the handlers that use it in worker threads, and
the admission path never calls it.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging

import kubernetes
from kubernetes.client.rest import ApiException

from keyhole_operator.annotations import COMPONENT_LABEL, MANAGED_BY, MANAGED_BY_LABEL

log = logging.getLogger("keyhole.operator")


CACHED = {"resource_version": "0"}
"""A list served from the API server's watch cache as it stands, not a consistent read: under
load a consistent list of a resource nobody is writing waits for the cache to be told of
etcd's newest revision (40-50 ms median at 20 pod creates/s, measured by bench.admission),
while the cache itself trails etcd by milliseconds. Pod admission reads this way: an injection
created a few milliseconds before a pod may be missed, and the operator then marks the pod
restart-required, as it does for a pod created before its injection."""


POD_PAGE = 100


class Cluster:
    def __init__(self, api_client: kubernetes.client.ApiClient | None = None):
        if api_client is None:
            try:
                kubernetes.config.load_incluster_config()
            except kubernetes.config.ConfigException:
                kubernetes.config.load_kube_config()
            api_client = kubernetes.client.ApiClient()
        self.core = kubernetes.client.CoreV1Api(api_client)
        self.authz = kubernetes.client.AuthorizationV1Api(api_client)
        self.authn = kubernetes.client.AuthenticationV1Api(api_client)
        self.custom = kubernetes.client.CustomObjectsApi(api_client)
        self.apps = kubernetes.client.AppsV1Api(api_client)
        self.well_known = kubernetes.client.WellKnownApi(api_client)

    # -- Secrets and ConfigMaps the operator owns ----------------------------------------------
    def read_secret(self, namespace: str, name: str) -> dict[str, bytes] | None:
        """A Secret's data, decoded; None when it does not exist."""
        found = self.read_labelled_secret(namespace, name)
        return None if found is None else found[1]

    def read_labelled_secret(self, namespace: str, name: str
                             ) -> tuple[dict[str, str], dict[str, bytes]] | None:
        """A Secret's labels and data, decoded; None when it does not exist."""
        try:
            secret = self.core.read_namespaced_secret(name, namespace, _request_timeout=5)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return (dict(secret.metadata.labels or {}),
                {k: base64.b64decode(v) for k, v in (secret.data or {}).items()})

    def secret_keys(self, namespace: str, name: str) -> set[str] | None:
        """The key names of a Secret (never its values); None when it does not exist."""
        data = self.read_secret(namespace, name)
        return None if data is None else set(data)

    def put_secret(self, namespace: str, name: str, data: dict[str, bytes], *, kind: str,
                   component: str) -> None:
        body = {"apiVersion": "v1", "kind": "Secret", "type": kind,
                "metadata": {"name": name, "namespace": namespace, "labels": _labels(component)},
                "data": {k: base64.b64encode(v).decode() for k, v in data.items()}}
        self._put(self.core.create_namespaced_secret, self.core.replace_namespaced_secret,
                  namespace, name, body)

    def put_config_map(self, namespace: str, name: str, data: dict[str, str],
                       binary: dict[str, bytes], *, component: str) -> None:
        body = {"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": name, "namespace": namespace, "labels": _labels(component)},
                "data": data,
                "binaryData": {k: base64.b64encode(v).decode() for k, v in binary.items()}}
        self._put(self.core.create_namespaced_config_map,
                  self.core.replace_namespaced_config_map, namespace, name, body)

    def read_config_map(self, namespace: str, name: str) -> dict | None:
        return _read_json(self.core.read_namespaced_config_map, namespace, name)

    def set_config_map_key(self, namespace: str, name: str, key: str, value: str | None, *,
                           whole: dict[str, str | None] | None = None) -> None:
        """Set (or, with None, remove) one key of a ConfigMap; when the ConfigMap is missing,
        create it with every key of ``whole`` (what it should hold), not this one alone."""
        try:
            self.core.patch_namespaced_config_map(name, namespace, {"data": {key: value}})
        except ApiException as exc:
            if exc.status != 404:
                raise
            data = {k: v for k, v in {**(whole or {}), key: value}.items() if v is not None}
            body = {"apiVersion": "v1", "kind": "ConfigMap",
                    "metadata": {"name": name, "namespace": namespace,
                                 "labels": _labels("protected-secrets")},
                    "data": data}
            self.core.create_namespaced_config_map(namespace, body)

    @staticmethod
    def _put(create, replace, namespace: str, name: str, body: dict) -> None:
        try:
            create(namespace, body)
        except ApiException as exc:
            if exc.status != 409:
                raise
            replace(name, namespace, body)

    # -- SecretInjections -------------------------------------------------------------------
    def list_injections(self) -> list[dict]:
        response = self.custom.list_cluster_custom_object("keyhole.dev", "v1alpha1",
                                                          "secretinjections",
                                                          _preload_content=False)
        return json.loads(response.data)["items"]

    def list_namespace_injections(self, namespace: str, *, cached: bool = False) -> list[dict]:
        """With ``cached``, what the API server's watch cache holds (see CACHED)."""
        response = self.custom.list_namespaced_custom_object(
            "keyhole.dev", "v1alpha1", namespace, "secretinjections", _preload_content=False,
            _request_timeout=3, **(CACHED if cached else {}))
        return json.loads(response.data)["items"]

    # -- ClusterSecretInjections and the namespaces they serve --------------------------------
    def list_cluster_injections(self, *, cached: bool = False) -> list[dict]:
        """Every ClusterSecretInjection; none when their CRD is not installed (a chart
        installed with crds.enabled=false and only the SecretInjection CRD applied). With
        ``cached``, what the API server's watch cache holds (see CACHED)."""
        try:
            response = self.custom.list_cluster_custom_object(
                "keyhole.dev", "v1alpha1", "clustersecretinjections", _preload_content=False,
                _request_timeout=3, **(CACHED if cached else {}))
        except ApiException as exc:
            if exc.status == 404:
                return []
            raise
        return json.loads(response.data)["items"]

    def read_cluster_injection(self, name: str) -> dict | None:
        return _json_or_none(self.custom.get_cluster_custom_object, "keyhole.dev", "v1alpha1",
                             "clustersecretinjections", name)

    def namespace_labels(self, namespace: str) -> dict[str, str] | None:
        """A namespace's labels; None when it does not exist."""
        found = _json_or_none(self.core.read_namespace, namespace)
        return None if found is None else (found.get("metadata") or {}).get("labels") or {}

    def list_namespaces(self) -> list[dict]:
        response = self.core.list_namespace(_preload_content=False, _request_timeout=5)
        return json.loads(response.data)["items"]

    def pod_security_level(self, namespace: str) -> str | None:
        """The Pod Security level the namespace enforces (its label), if any."""
        from keyhole_operator.annotations import POD_SECURITY_LABEL

        found = self.core.read_namespace(namespace, _request_timeout=3)
        return (found.metadata.labels or {}).get(POD_SECURITY_LABEL)

    def can_list_injections(self) -> None:
        """Raises unless SecretInjections can be listed (one item asked for, none read)."""
        self.custom.list_cluster_custom_object("keyhole.dev", "v1alpha1", "secretinjections",
                                               limit=1, _preload_content=False,
                                               _request_timeout=2).release_conn()

    def ensure_peering(self, name: str) -> None:
        """The ClusterKopfPeering object kopf needs to elect one active replica."""
        body = {"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering",
                "metadata": {"name": name}}
        try:
            self.custom.create_cluster_custom_object("kopf.dev", "v1", "clusterkopfpeerings", body)
        except ApiException as exc:
            if exc.status == 409:
                return
            if exc.status == 404:
                raise RuntimeError("the clusterkopfpeerings.kopf.dev CRD is missing: install the "
                                   "chart with crds.enabled=true, or run with --standalone") from None
            raise

    # -- pods ------------------------------------------------------------------------------
    def list_pods(self, namespace: str) -> list[dict]:
        """Every pod of the namespace, read a page at a time (one consistent snapshot, as
        kubectl reads): decoding a page is one call that holds the GIL, and one page of a
        thousand pods stalled the webhook's event loop for tens of milliseconds."""
        pods: list[dict] = []
        token = None
        while True:
            response = self.core.list_namespaced_pod(
                namespace, limit=POD_PAGE, _preload_content=False,
                **({"_continue": token} if token else {}))
            page = json.loads(response.data)
            pods += page["items"]
            token = (page.get("metadata") or {}).get("continue")
            if not token:
                return pods

    def read_pod(self, namespace: str, name: str) -> dict | None:
        return _read_json(self.core.read_namespaced_pod, namespace, name)

    def annotate_pod(self, namespace: str, name: str, changes: dict[str, str | None]) -> None:
        self.core.patch_namespaced_pod(name, namespace, {"metadata": {"annotations": changes}})

    # -- authorization -----------------------------------------------------------------------
    def allowed(self, review: dict) -> bool:
        result = self.authz.create_subject_access_review(review)
        return bool(result.status and result.status.allowed)

    def review_token(self, token: str, audience: str) -> dict:
        """The API server's word on a bearer token meant for ``audience``: the TokenReview's
        status (``authenticated``, ``user`` with the pod it is bound to in ``extra``)."""
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                "spec": {"token": token, "audiences": [audience]}}
        response = self.authn.create_token_review(body, _preload_content=False,
                                                  _request_timeout=5)
        return json.loads(response.data).get("status") or {}

    # -- approvals ---------------------------------------------------------------------------
    def list_approvals(self, namespace: str, pod_uid: str | None = None, *,
                       workload: str | None = None) -> list[dict]:
        """A pod's ApprovalRequests, or (``workload``) those of every pod of a workload."""
        from keyhole_operator.approvals import POD_UID_LABEL, WORKLOAD_LABEL

        selector = f"{POD_UID_LABEL}={pod_uid}" if workload is None else \
            f"{WORKLOAD_LABEL}={workload}"
        response = self.custom.list_namespaced_custom_object(
            "keyhole.dev", "v1alpha1", namespace, "approvalrequests",
            label_selector=selector, _preload_content=False, _request_timeout=5)
        return json.loads(response.data)["items"]

    def list_all_approvals(self) -> list[dict]:
        response = self.custom.list_cluster_custom_object(
            "keyhole.dev", "v1alpha1", "approvalrequests", _preload_content=False,
            _request_timeout=10)
        return json.loads(response.data)["items"]

    def read_approval(self, namespace: str, name: str) -> dict | None:
        return _json_or_none(self.custom.get_namespaced_custom_object, "keyhole.dev",
                             "v1alpha1", namespace, "approvalrequests", name)

    def create_approval(self, namespace: str, body: dict) -> dict:
        response = self.custom.create_namespaced_custom_object(
            "keyhole.dev", "v1alpha1", namespace, "approvalrequests", body,
            _preload_content=False, _request_timeout=5)
        return json.loads(response.data)

    def delete_approval(self, namespace: str, name: str) -> None:
        try:
            self.custom.delete_namespaced_custom_object(
                "keyhole.dev", "v1alpha1", namespace, "approvalrequests", name,
                _request_timeout=5)
        except ApiException as exc:
            if exc.status != 404:
                raise

    def post_event(self, involved: dict, kind: str, reason: str, message: str) -> None:
        """A core Event on ``involved`` (kopf's own posting serves only its handlers); a
        failure is logged, never raised: an Event is news, not a decision."""
        meta = involved.get("metadata") or {}
        now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        body = {"apiVersion": "v1", "kind": "Event",
                "metadata": {"generateName": f"{meta.get('name', 'keyhole')[:40]}.",
                             "namespace": meta.get("namespace")},
                "involvedObject": {"apiVersion": involved.get("apiVersion"),
                                   "kind": involved.get("kind"), "name": meta.get("name"),
                                   "namespace": meta.get("namespace"), "uid": meta.get("uid")},
                "type": kind, "reason": reason, "message": message[:1000],
                "source": {"component": "keyhole-operator"}, "firstTimestamp": now,
                "lastTimestamp": now, "eventTime": None, "count": 1,
                "reportingComponent": "keyhole.dev/operator"}
        try:
            self.core.create_namespaced_event(meta.get("namespace"), body, _request_timeout=5)
        except (ApiException, OSError) as exc:
            log.warning("cannot post event %s on %s %s: %s", reason, involved.get("kind"),
                        meta.get("name"), getattr(exc, "status", type(exc).__name__))

    # -- access grants -----------------------------------------------------------------------
    def read_target(self, kind: str, namespace: str, name: str) -> dict | None:
        """A grant's target (a Pod, Deployment or StatefulSet); None when it does not exist."""
        read = {"Pod": self.core.read_namespaced_pod,
                "Deployment": self.apps.read_namespaced_deployment,
                "StatefulSet": self.apps.read_namespaced_stateful_set}[kind]
        return _json_or_none(read, name, namespace)

    def label_target(self, kind: str, namespace: str, name: str, patch: dict) -> None:
        write = {"Pod": self.core.patch_namespaced_pod,
                 "Deployment": self.apps.patch_namespaced_deployment,
                 "StatefulSet": self.apps.patch_namespaced_stateful_set}[kind]
        write(name, namespace, patch, _request_timeout=5)

    def create_grant(self, namespace: str, body: dict) -> None:
        self.custom.create_namespaced_custom_object("keyhole.dev", "v1alpha1", namespace,
                                                    "accessgrants", body, _request_timeout=5)

    def grant_status(self, namespace: str, name: str, status: dict) -> None:
        try:
            self.custom.patch_namespaced_custom_object_status(
                "keyhole.dev", "v1alpha1", namespace, "accessgrants", name, {"status": status},
                _request_timeout=5)
        except ApiException as exc:
            if exc.status != 404:  # deleted meanwhile: nothing to record
                raise

    # -- identities for workload identity federation (in keyhole's own namespace) ------------
    def ensure_service_account(self, manifest: dict) -> None:
        """Create the ServiceAccount unless it exists (it holds nothing: no Secret, no mount)."""
        meta = manifest["metadata"]
        try:
            self.core.create_namespaced_service_account(meta["namespace"], manifest,
                                                        _request_timeout=5)
        except ApiException as exc:
            if exc.status != 409:
                raise

    def delete_service_account(self, namespace: str, name: str) -> None:
        try:
            self.core.delete_namespaced_service_account(name, namespace, _request_timeout=5)
        except ApiException as exc:
            if exc.status != 404:
                raise

    def list_service_accounts(self, namespace: str, selector: str) -> list[dict]:
        response = self.core.list_namespaced_service_account(
            namespace, label_selector=selector, _preload_content=False, _request_timeout=10)
        return json.loads(response.data).get("items") or []

    def request_token(self, namespace: str, account: str, audience: str,
                      seconds: int) -> tuple[str, float] | None:
        """A token of the ServiceAccount for ``audience`` (TokenRequest) and its expiry in
        epoch seconds; None when the account does not exist."""
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                "spec": {"audiences": [audience], "expirationSeconds": seconds}}
        try:
            response = self.core.create_namespaced_service_account_token(
                account, namespace, body, _preload_content=False, _request_timeout=5)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        status = json.loads(response.data).get("status") or {}
        expires = dt.datetime.fromisoformat(status["expirationTimestamp"].replace("Z", "+00:00"))
        return status["token"], expires.timestamp()

    def discovery(self) -> dict:
        """The API server's OIDC discovery document (the issuer, where its keys are)."""
        response = self.well_known.get_service_account_issuer_open_id_configuration(
            _preload_content=False, _request_timeout=5)
        return json.loads(response.data)

    def patch_identity_status(self, namespace: str | None, name: str, block: dict) -> None:
        """Merge ``status.workloadIdentity`` of a (cluster) injection."""
        body = {"status": {"workloadIdentity": block}}
        if namespace is None:
            self.custom.patch_cluster_custom_object_status(
                "keyhole.dev", "v1alpha1", "clustersecretinjections", name, body,
                _request_timeout=5)
        else:
            self.custom.patch_namespaced_custom_object_status(
                "keyhole.dev", "v1alpha1", namespace, "secretinjections", name, body,
                _request_timeout=5)

    # -- the shared budgets' ledger ----------------------------------------------------------
    def read_injection(self, namespace: str, name: str) -> dict | None:
        return _json_or_none(self.custom.get_namespaced_custom_object, "keyhole.dev",
                             "v1alpha1", namespace, "secretinjections", name)

    def write_ledger(self, namespace: str, name: str, resource_version: str,
                     status: dict) -> bool:
        """Patch the injection's status if nobody changed the object since
        ``resource_version`` was read; False when somebody did (read again and redo)."""
        body = {"metadata": {"resourceVersion": resource_version}, "status": status}
        try:
            self.custom.patch_namespaced_custom_object_status(
                "keyhole.dev", "v1alpha1", namespace, "secretinjections", name, body,
                _request_timeout=5)
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise
        return True


def _json_or_none(read, *args) -> dict | None:
    """One object as plain JSON, read within 5 s (the channel answers sidecars that wait);
    None when it does not exist."""
    try:
        response = read(*args, _preload_content=False, _request_timeout=5)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise
    return json.loads(response.data)


def _read_json(read, namespace: str, name: str) -> dict | None:
    """One object as plain JSON (not the client's models); None when it does not exist."""
    try:
        response = read(name, namespace, _preload_content=False)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise
    return json.loads(response.data)


def _labels(component: str) -> dict[str, str]:
    return {MANAGED_BY_LABEL: MANAGED_BY, COMPONENT_LABEL: component}
