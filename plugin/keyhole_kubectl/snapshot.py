"""What the plugin read of one namespace: plain data, no client."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Namespace:
    name: str
    injections: list[dict] = field(default_factory=list)
    pods: list[dict] = field(default_factory=list)
    ca_bundle: dict[str, str] | None = None  # keyhole-ca-bundle's data; None when absent
    grants: list[dict] = field(default_factory=list)
    """The namespace's AccessGrants (kubectl keyhole grant); none when not ours to read."""
    cluster_injections: list[dict] = field(default_factory=list)
    """The ClusterSecretInjections whose status says they serve this namespace."""
