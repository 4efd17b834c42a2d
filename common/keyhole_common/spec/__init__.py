"""The SecretInjection API: model, parser, host matching and the signed document format.

Pure code shared by the sidecar and the operator: no networking, no Kubernetes client.
"""

from keyhole_common.spec.hosts import HostPattern, is_ip_literal, normalise_hostname, split_authority
from keyhole_common.spec.model import (
    API_VERSION,
    CLUSTER_KIND,
    KIND,
    LIST_KIND,
    AgentEnv,
    BasicAuth,
    HeaderInjection,
    Limits,
    QueryParamInjection,
    Rule,
    SecretInjection,
    SecretKeyRef,
)
from keyhole_common.spec.parse import (
    Problem,
    SpecError,
    load_injections,
    other_kinds,
    parse_injection,
    parse_injections,
    read_documents,
)
from keyhole_common.spec.signing import SignatureError, sign, verify

__all__ = [
    "API_VERSION", "CLUSTER_KIND", "KIND", "LIST_KIND", "AgentEnv", "BasicAuth", "HeaderInjection",
    "HostPattern",
    "Limits", "Problem", "QueryParamInjection", "Rule", "SecretInjection", "SecretKeyRef",
    "SignatureError", "SpecError", "is_ip_literal", "load_injections", "normalise_hostname",
    "other_kinds", "parse_injection", "parse_injections", "read_documents", "sign",
    "split_authority", "verify",
]
