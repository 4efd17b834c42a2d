"""The operator's side of workload identity federation: the injections' ServiceAccounts in
keyhole's namespace, their tokens (TokenRequest, cached while most of their life is left),
the issuer's discovery document, and the sidecars' reports of their exchanges written into
the injection's ``status.workloadIdentity``. The decisions are :mod:`identities` (pure)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from kubernetes.client.rest import ApiException

from keyhole_operator import identities

log = logging.getLogger("keyhole.operator.identity")

DISCOVERY_SECONDS = 300.0  # the issuer rarely changes; its document is read this often


class IdentityDesk:
    def __init__(self, cluster, home: str, clock: Callable[[], float] = time.time):
        self.cluster, self.home, self.clock = cluster, home, clock
        self._tokens: dict[tuple[str, str], tuple[str, float, float]] = {}
        self._written: dict[tuple[str | None, str], tuple[float, dict]] = {}
        self._discovery: tuple[float, dict] | None = None
        self._made: set[str] = set()  # accounts known to exist
        self._lock = threading.Lock()

    def token(self, namespace: str | None, injection: str, audience: str) -> tuple[str, float]:
        """A token of the injection's ServiceAccount for ``audience`` and seconds it has
        left; the account is created when it does not exist yet."""
        account = identities.account_name(namespace, injection)
        now = self.clock()
        with self._lock:
            held = self._tokens.get((account, audience))
        if held is not None:
            value, issued, expires = held
            if now < issued + (expires - issued) * identities.REUSE_FRACTION:
                return value, expires - now
        found = self.cluster.request_token(self.home, account, audience,
                                           identities.TOKEN_SECONDS)
        if found is None:  # first use, or someone deleted it: make it, then ask again
            self._made.discard(account)
            self.ensure(namespace, injection)
            found = self.cluster.request_token(self.home, account, audience,
                                               identities.TOKEN_SECONDS)
            if found is None:
                raise LookupError(f"ServiceAccount {self.home}/{account} cannot be created")
        value, expires = found
        with self._lock:
            self._tokens[(account, audience)] = (value, now, expires)
        return value, expires - now

    def ensure(self, namespace: str | None, injection: str) -> str:
        """The injection's ServiceAccount exists (created if not); its name."""
        account = identities.account_name(namespace, injection)
        if account not in self._made:  # once per process: every reconcile asks
            self.cluster.ensure_service_account(
                identities.account_manifest(self.home, account, namespace, injection))
            self._made.add(account)
        return account

    def forget(self, namespace: str | None, injection: str) -> None:
        """The injection is gone or no longer federates: its account and tokens go too."""
        account = identities.account_name(namespace, injection)
        with self._lock:
            self._tokens = {k: v for k, v in self._tokens.items() if k[0] != account}
            self._written.pop((namespace, injection), None)
            self._made.discard(account)
        self.cluster.delete_service_account(self.home, account)

    def discovery(self) -> dict | None:
        """The issuer's discovery document, re-read every few minutes; None while unreadable
        (the status then lacks the issuer, and says so)."""
        now = self.clock()
        if self._discovery is not None and now < self._discovery[0] + DISCOVERY_SECONDS:
            return self._discovery[1]
        try:
            document = self.cluster.discovery()
        except (ApiException, OSError, ValueError) as exc:  # one read failed: said in the log
            log.warning("cannot read the API server's OIDC discovery document: %s", exc)
            return None if self._discovery is None else self._discovery[1]
        self._discovery = (now, document)
        return document

    def published(self, namespace: str | None, injection: str, audience: str) -> dict:
        """``status.workloadIdentity`` for a federated injection (its account made)."""
        account = self.ensure(namespace, injection)
        return identities.published(self.discovery(), self.home, account, audience)

    def report(self, namespace: str | None, injection: str, pod: str,
               exchange: identities.Exchange) -> bool:
        """Write a sidecar's report into the injection's status (not every one: see
        ``identities.worth_writing``); True when written."""
        now = self.clock()
        entry = exchange.record(pod, now)
        with self._lock:
            last = self._written.get((namespace, injection))
            if not identities.worth_writing(last[1] if last else None, entry, now,
                                            last[0] if last else None):
                return False
            self._written[(namespace, injection)] = (now, entry)
        self.cluster.patch_identity_status(namespace, injection, {"lastExchange": entry})
        return True
