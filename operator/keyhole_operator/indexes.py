"""Reading kopf's in-memory indexes (what the active replica last saw of SecretInjections,
ClusterSecretInjections and namespaces' labels), for the handlers and the reconciliation."""

from __future__ import annotations

import copy

import kopf

from keyhole_operator.routes import Injection
from keyhole_operator.runtime import Runtime

CLUSTER = "*"  # the one key of cluster_index


def injections_of(index: kopf.Index, namespace: str, *, without: str | None = None
                  ) -> list[Injection]:
    return [i for i in index.get(namespace, []) if i.name != without]


def namespace_labels(index: kopf.Index, namespace: str) -> dict | None:
    """A namespace's labels as last seen; None when not seen (it then gets no cluster
    injection: fail closed)."""
    return next(iter(index.get(namespace, [])), None)


def cluster_injections(index: kopf.Index, runtime: Runtime, *, without: str | None = None
                       ) -> list[Injection]:
    """The cluster injections that may serve pods: none while the operator runs without the
    channel, which is the only way their values reach a sidecar."""
    if not runtime.settings.channel_url:
        return []
    return [i for i in index.get(CLUSTER, []) if i.name != without]


def plain(body) -> dict:
    """A kopf body as plain JSON data, a copy the caller may change."""
    return copy.deepcopy(dict(body))
