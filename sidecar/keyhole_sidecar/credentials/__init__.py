"""Credentials the proxy makes itself: GitHub App tokens, OAuth 2.0 client credentials, AWS
Signature Version 4 and workload identity federation, beside the static values of
``headers``/``basicAuth``/``queryParams``.

:func:`build_source` turns a spec and its secret material into a :class:`CredentialSource`;
a :class:`CredentialRegistry` hands back the same source (and so the same cached token) for as
long as neither changes, so a configuration reload does not mint again.
"""

from __future__ import annotations

from collections.abc import Callable

from keyhole_common.spec.model import (
    AwsSigV4,
    Credential,
    GitHubApp,
    OAuth2ClientCredentials,
    SecretInjection,
    SecretKeyRef,
    WorkloadIdentity,
    credential_refs,
)
from keyhole_sidecar.credentials.source import CredentialSource, Outgoing, material_digest
from keyhole_sidecar.credentials.subject import NoSubjectTokens, SubjectTokens
from keyhole_sidecar.credentials.tokens import CredentialError, Token

__all__ = ["CredentialError", "CredentialRegistry", "CredentialSource", "Outgoing", "build_source"]

Reader = Callable[..., str]  # SecretsDir.read: (ref, *, multiline=False) -> value


def _ignore(*_args) -> None:
    return None


def read_material(spec: Credential, read: Reader) -> dict[SecretKeyRef, str]:
    """Every secret value ``spec`` uses (the App's PEM key may span lines)."""
    return {ref: read(ref, multiline=isinstance(spec, GitHubApp)) for ref in credential_refs(spec)}


def build_source(injection: str, spec: Credential, material: dict[SecretKeyRef, str], *,
                 on_minted: Callable[[str, str, Token], None] = _ignore,
                 on_failed: Callable[[str, str, CredentialError], None] = _ignore,
                 subjects: SubjectTokens | None = None) -> CredentialSource:
    """Build the source from its secret material; ValueError names what is wrong. Each kind's
    module is imported when an injection first uses it (a sidecar that uses none carries none
    of their dependencies: XML for STS, JWT signing, their HTTP clients)."""
    hooks = {"on_minted": on_minted, "on_failed": on_failed}
    if isinstance(spec, WorkloadIdentity):
        from keyhole_sidecar.credentials.federation import FederatedSource

        return FederatedSource(injection, spec, subjects or NoSubjectTokens(), **hooks)
    if isinstance(spec, GitHubApp):
        from keyhole_sidecar.credentials.github_app import GitHubAppSource

        return GitHubAppSource(injection, spec, material[spec.private_key], **hooks)
    if isinstance(spec, OAuth2ClientCredentials):
        from keyhole_sidecar.credentials.oauth2 import OAuth2Source

        return OAuth2Source(injection, spec, material[spec.client_id],
                            material[spec.client_secret], **hooks)
    if isinstance(spec, AwsSigV4):
        from keyhole_sidecar.credentials.aws import AwsSigV4Source
        from keyhole_sidecar.credentials.sigv4 import AwsKeys

        token = material[spec.session_token] if spec.session_token else None
        return AwsSigV4Source(injection, spec, AwsKeys(material[spec.access_key_id],
                                                       material[spec.secret_access_key], token))
    raise TypeError(f"unknown credential source {type(spec).__name__}")


class CredentialRegistry:
    """The live sources, by injection, spec and a digest of their secret material."""

    def __init__(self, on_minted: Callable[[str, str, Token], None] = _ignore,
                 on_failed: Callable[[str, str, CredentialError], None] = _ignore,
                 subjects: SubjectTokens | None = None):
        self._hooks = {"on_minted": on_minted, "on_failed": on_failed}
        self.subjects = subjects or NoSubjectTokens()  # federated injections' identities
        self._live: dict[tuple, CredentialSource] = {}
        self._used: set[tuple] = set()

    def source(self, injection: SecretInjection, read: Reader) -> CredentialSource:
        """The live source for ``injection`` (a routes.CredentialFactory)."""
        spec = injection.credential
        assert spec is not None
        material = read_material(spec, read)
        key = (injection.name, spec, material_digest(material.values()))
        self._used.add(key)
        found = self._live.get(key)
        if found is None:
            found = self._live[key] = build_source(injection.name, spec, material,
                                                   subjects=self.subjects, **self._hooks)
        return found

    def keep_only_used(self) -> None:
        """After a table is built: forget sources no longer in it (and their tokens)."""
        self._live = {k: v for k, v in self._live.items() if k in self._used}
        self.subjects.forget({key[0] for key in self._used})
        self._used = set()

    def sources(self) -> list[CredentialSource]:
        return list(self._live.values())
