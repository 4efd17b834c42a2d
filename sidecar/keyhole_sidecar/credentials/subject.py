"""Subject tokens: the identity the proxy presents to a provider in exchange for an access
token (``spec.workloadIdentity``). No agent can obtain one:

- in Kubernetes the operator mints it (TokenRequest) for a ServiceAccount of keyhole's own
  namespace, one per injection, and hands it to the sidecars the injection serves over the
  operator channel, as it hands over the values of cluster injections;
- on a laptop or VM, ``--identity-token FILE`` names a file that something the operator of
  the machine runs keeps fresh (a CI job's OIDC token, a SPIFFE helper); it is read again at
  every exchange, the way the cloud SDKs read theirs.

Either way the token lives in the proxy's memory and goes only to the provider's endpoint.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from keyhole_common.channel import unverified_claims
from keyhole_sidecar.credentials.tokens import CredentialError
from keyhole_sidecar.operator_channel import ChannelRefused
from keyhole_sidecar.usage.shared import ChannelUnavailable

EARLY = 60.0  # a subject token this close to its expiry is not presented: ask for a new one


@dataclass(frozen=True, slots=True)
class SubjectToken:
    value: str
    expires_at: float  # wall-clock seconds
    received_at: float

    def fresh(self, now: float) -> bool:
        """Worth presenting, and not yet half-way through the life it had when received."""
        return now < self.expires_at - EARLY and now < (self.received_at + self.expires_at) / 2

    def usable(self, now: float) -> bool:
        return now < self.expires_at - EARLY


def unavailable(reason: str, message: str) -> CredentialError:
    """Federation failures answer 503: keyhole cannot make the credential right now."""
    return CredentialError(reason, message, status=503)


class SubjectTokens(ABC):
    """Where a federated injection's subject tokens come from."""

    @abstractmethod
    async def get(self, injection: str, audience: str) -> str:
        """A subject token for ``injection`` with ``aud`` ``audience``, or CredentialError."""

    def exchanged(self, injection: str, expires_at: float | None,  # noqa: B027 - optional
                  error: str | None) -> None:
        """Told after each exchange (the access token's expiry, or what the provider said)."""

    def forget(self, keep: set[str]) -> None:  # noqa: B027 - optional
        """Drop what is held for injections not in ``keep``."""


class NoSubjectTokens(SubjectTokens):
    async def get(self, injection: str, audience: str) -> str:
        raise unavailable("no_identity", "spec.workloadIdentity needs an identity to present: "
                                         "in Kubernetes the operator hands it over (the "
                                         "sidecar's --operator); standalone, give "
                                         "--identity-token FILE")


class FileSubjectTokens(SubjectTokens):
    """``--identity-token FILE``: read at every exchange, checked for audience and expiry."""

    def __init__(self, path: Path, clock: Callable[[], float] = time.time):
        self.path, self.clock = path, clock

    async def get(self, injection: str, audience: str) -> str:
        try:
            token = self.path.read_text().strip()
        except OSError as exc:
            raise unavailable("no_identity", f"cannot read the identity token {self.path} "
                                             f"({exc.strerror})") from None
        found = unverified_claims(token)  # the provider verifies it; this only explains
        if not found:
            raise unavailable("no_identity", f"{self.path} holds no JWT (header.payload."
                                             "signature)")
        audiences = found.get("aud")
        audiences = [audiences] if isinstance(audiences, str) else audiences or []
        if audience not in audiences:
            raise unavailable("identity_audience",
                              f"the identity token in {self.path} is for audience "
                              f"{', '.join(map(str, audiences)) or '(none)'}; injection "
                              f"{injection!r} presents it for {audience!r}: mint it for that "
                              "audience, or set spec.workloadIdentity.audience")
        expires = found.get("exp")
        if isinstance(expires, int | float) and expires - EARLY <= self.clock():
            raise unavailable("identity_expired",
                              f"the identity token in {self.path} expired (or expires within "
                              f"{EARLY:.0f} s): whatever writes it must keep it fresh")
        return token


class ChannelSubjectTokens(SubjectTokens):
    """From the operator channel. A token is kept until half its life is gone; while the
    operator does not answer, the one held serves until it expires, then exchanges fail
    (closed). A refusal (the pod is no longer served) drops it at once."""

    def __init__(self, channel, clock: Callable[[], float] = time.time):
        self.channel, self.clock = channel, clock
        self._held: dict[str, SubjectToken] = {}

    async def get(self, injection: str, audience: str) -> str:
        now = self.clock()
        held = self._held.get(injection)
        if held is not None and held.fresh(now):
            return held.value
        try:
            answer = await self.channel.identity({"injection": injection})
        except ChannelRefused as exc:
            self._held.pop(injection, None)
            raise unavailable("identity_refused", f"the operator refused the identity of "
                                                  f"injection {injection!r}: {exc}") from None
        except ChannelUnavailable as exc:
            if held is not None and held.usable(now):
                return held.value
            raise unavailable("identity_unavailable", f"no identity for injection "
                                                      f"{injection!r}: {exc}") from None
        token, seconds = answer.get("token"), answer.get("expiresIn")
        if not isinstance(token, str) or not token or isinstance(seconds, bool) or \
                not isinstance(seconds, int | float) or seconds <= EARLY:
            raise unavailable("identity_unavailable", "the operator's answer held no usable "
                                                      "identity token")
        self._held[injection] = SubjectToken(token, now + float(seconds), now)
        return token

    def exchanged(self, injection: str, expires_at: float | None, error: str | None) -> None:
        self.channel.report_exchange({"injection": injection, "expiresAt": expires_at,
                                      "error": error})

    def forget(self, keep: set[str]) -> None:
        self._held = {name: token for name, token in self._held.items() if name in keep}
