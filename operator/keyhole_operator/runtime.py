"""What the operator's handlers share, passed through kopf's memo: settings, keys, the
Kubernetes client, and what they remember between calls."""

from __future__ import annotations

from dataclasses import dataclass, field

from keyhole_operator.approval_desk import Board
from keyhole_operator.identity_desk import IdentityDesk
from keyhole_operator.kube import Cluster
from keyhole_operator.routes import namespace_key
from keyhole_operator.settings import Settings


@dataclass
class Runtime:
    """What the handlers share, passed through kopf's memo."""

    settings: Settings
    master_key: bytes
    webhook_server: object | None = None
    manage_webhook_configurations: bool = False
    cluster: Cluster | None = field(default=None)
    board: Board = field(default_factory=Board)
    """Wakes the channel's calls waiting for an approval (``approval_handlers``)."""
    identities: IdentityDesk | None = None
    """Federated injections' ServiceAccounts and what their status publishes."""
    bundles_written: dict[str, bytes] = field(default_factory=dict)
    """Namespace → the CA certificate whose bundle was last written, to skip re-reading it."""

    def key(self, namespace: str) -> bytes:
        return namespace_key(self.master_key, namespace)
