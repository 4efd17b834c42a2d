"""Loading the configuration and keeping it current: injections + secrets → a RouteTable.

Reload is by polling: every second the injection files and the referenced secret files are
read and compared with what is being served. Polling follows Kubernetes' ``..data`` symlink
swaps, editors that replace files and ConfigMap updates alike, with no platform quirks.
A broken new configuration is logged and counted, and the last good one keeps serving (and
``/readyz`` says so). A Secret or key that disappears is different: removal is how users
revoke, so its injection stops at once, even while the rest of the configuration is rejected.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from keyhole_common.spec import (
    LIST_KIND,
    Problem,
    SecretInjection,
    SignatureError,
    SpecError,
    other_kinds,
    parse_injections,
    read_documents,
    verify,
)
from keyhole_common.spec.model import WorkloadIdentity
from keyhole_sidecar.cluster_values import ClusterValues
from keyhole_sidecar.credentials import CredentialRegistry
from keyhole_sidecar.credentials.subject import SubjectTokens
from keyhole_sidecar.metrics import Metrics
from keyhole_sidecar.routes import RouteTable, build_route_table, require_usable
from keyhole_sidecar.secrets import SecretsDir

log = logging.getLogger("keyhole.config")
CHANNEL_SOURCE = "the operator channel"


@dataclass(frozen=True)
class Sources:
    injections: Path
    secrets_dir: Path
    signing_key: Path | None = None
    operator: bool = False
    """The operator channel is configured: what only the operator can serve (a budget all
    the injection's pods share) is servable."""
    identity: bool = False
    """Subject tokens for spec.workloadIdentity come from somewhere (the operator, or
    --identity-token)."""


def read_signing_key(path: Path) -> bytes:
    try:
        key = path.read_bytes().rstrip(b"\r\n")
    except OSError as exc:
        raise SpecError([Problem(str(path), "", f"cannot read the signing key: {exc.strerror}")]
                        ) from None
    if len(key) < 16:
        raise SpecError([Problem(str(path), "", "the signing key is shorter than 16 bytes")])
    return key


def load_injections(sources: Sources, fresher: dict | None = None
                    ) -> tuple[list[SecretInjection], list[str]]:
    """Parse the injections, verifying the operator's signature when a key is configured:
    (the injections, the documents of other kinds set aside). ``fresher``: the same signed
    document as the operator has it now (the operator channel), read instead of the file."""
    if fresher is not None and sources.signing_key is not None:
        documents = [(CHANNEL_SOURCE, fresher)]
    else:
        documents = read_documents(sources.injections)
    if sources.signing_key is not None:
        key = read_signing_key(sources.signing_key)
        present = [(s, d) for s, d in documents if d is not None]
        if len(present) != 1 or not isinstance(present[0][1], dict) or (
            present[0][1].get("kind") != LIST_KIND
        ):
            raise SpecError([Problem(str(sources.injections), "", "with --signing-key the "
                                     f"injections must be one signed {LIST_KIND} document")])
        try:
            verify(present[0][1], key)
        except SignatureError as exc:
            raise SpecError([Problem(str(sources.injections), "signature", str(exc))]) from None
    documents, skipped = other_kinds(documents)
    if all(document is None for _, document in documents):
        only = f" (only {'; '.join(skipped)})" if skipped else ""
        raise SpecError([Problem(str(sources.injections), "", f"holds no SecretInjection{only}: "
                                 "nothing to serve. Write at least one, or an empty "
                                 f"{LIST_KIND} (items: []) to serve nothing on purpose")])
    injections = parse_injections(documents, signed=sources.signing_key is not None)
    if not sources.operator and (problems := needs_the_operator(injections)):
        raise SpecError(problems)
    if not sources.identity and (problems := needs_an_identity(injections)):
        raise SpecError(problems)
    return injections, skipped


def needs_the_operator(injections: list[SecretInjection]) -> list[Problem]:
    """What cannot be served without the operator channel: a budget all the injection's pods
    share is a count the operator keeps. Refused at load, so a sidecar never looks ready while
    it would refuse every request (503 budget_unavailable)."""
    return [Problem(injection.name, f"spec.llm.budgets[{index}].for",
                    "for: injection is a count the operator keeps for all the injection's "
                    "pods; with no operator channel (standalone) use for: pod, this "
                    "process's own count")
            for injection in injections if injection.llm is not None
            for index, budget in enumerate(injection.llm.budgets) if budget.shared]


def needs_an_identity(injections: list[SecretInjection]) -> list[Problem]:
    """Federated injections with nothing to present: refused at load, as above."""
    return [Problem(injection.name, "spec.workloadIdentity",
                    "needs an identity to present to the provider: in Kubernetes the "
                    "operator hands it over; standalone, run with --identity-token FILE "
                    "(a JWT for audience " + injection.credential.audience + ")")
            for injection in injections if isinstance(injection.credential, WorkloadIdentity)]


def load_route_table(sources: Sources) -> tuple[RouteTable, list[str]]:
    """Everything a proxy needs from disk and the documents of other kinds set aside, or
    :class:`SpecError` naming every problem."""
    injections, skipped = load_injections(sources)
    return require_usable(build_route_table(injections, SecretsDir(sources.secrets_dir).read,
                                            CredentialRegistry().source)), skipped


def _fingerprint(sources: Sources, injections: list[SecretInjection],
                 fresher: dict | None = None, values: object = None) -> str:
    """A digest of every byte the configuration depends on (never logged, never kept raw);
    ``values``: the state of the cluster injections' values (not the values)."""
    digest = hashlib.sha256()
    digest.update(repr(values).encode() + b"\0")
    if fresher is not None:
        digest.update(json.dumps(fresher, sort_keys=True).encode() + b"\0")
    paths: list[Path] = []
    if sources.injections.is_dir():
        paths.extend(sorted(p for p in sources.injections.iterdir() if not p.name.startswith(".")))
    else:
        paths.append(sources.injections)
    if sources.signing_key is not None:
        paths.append(sources.signing_key)
    secrets = SecretsDir(sources.secrets_dir)
    paths.extend(secrets.path(ref) for inj in injections for ref in inj.secret_refs())
    for path in paths:
        digest.update(str(path).encode() + b"\0")
        try:
            digest.update(path.read_bytes())
        except OSError as exc:  # a missing key and a missing Secret are told apart
            digest.update(f"<{exc.errno} {path.parent.is_dir()}>".encode())
        digest.update(b"\0")
    return digest.hexdigest()


def newest_routes(channel: tuple[dict, float] | None, file_changed_at: float) -> dict | None:
    """The routes document to serve instead of the file, if any. The operator channel reads
    the pod's annotation from the API server as it is now, so its document is the newer while
    it answers, and a revocation takes effect in seconds. Should the operator be away while the
    kubelet delivers a newer file, the file is the newer; never the stale one of the two."""
    if channel is None:
        return None
    document, fetched = channel
    return document if fetched >= file_changed_at else None


class LiveConfig:
    """The route table being served, and the loop that replaces it when files change."""

    def __init__(self, sources: Sources, metrics: Metrics,
                 channel_routes: Callable[[], tuple[dict, float] | None] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 cluster_values: ClusterValues | None = None,
                 subjects: SubjectTokens | None = None):
        self.sources = sources
        self.cluster_values = cluster_values  # the operator's values of cluster injections
        self.metrics = metrics
        self.channel_routes = channel_routes or (lambda: None)  # the operator channel's
        self.clock = clock
        self._file_digest = self._read_file_digest()
        self._file_changed_at = clock()
        self.table: RouteTable | None = None
        self.last_error: str | None = None
        self._injections: list[SecretInjection] = []
        self._fingerprint: str | None = None
        self.credentials = CredentialRegistry(on_minted=metrics.credential_minted,
                                              on_failed=metrics.credential_failed,
                                              subjects=subjects)

    def current(self) -> RouteTable:
        assert self.table is not None, "load() first"
        return self.table

    def load(self) -> bool:
        """(Re)load from disk; True when what serves is exactly what the files say.

        A document that does not parse keeps the last good injections (False); their Secrets
        are still read again, so a removed one stops injecting either way. Before anything has
        loaded, any problem but a missing Secret is fatal (False, nothing to serve)."""
        rejected: SpecError | None = None
        fresher = self.fresher()
        try:
            injections, skipped = load_injections(self.sources, fresher)
            for what in skipped:
                log.info("skipped %s: not a SecretInjection", what)
        except SpecError as exc:
            if self.table is None:
                self._fingerprint = _fingerprint(self.sources, self._injections, fresher,
                                                 self._values_state())
                return self._rejected(exc)
            rejected, injections = exc, self._injections
        fingerprint = _fingerprint(self.sources, injections, fresher, self._values_state())
        table = build_route_table(
            injections, SecretsDir(self.sources.secrets_dir).read, self.credentials.source,
            previous=self.table,
            cluster_read=self.cluster_values.reader if self.cluster_values else None)
        broken = [u for u in table.unusable if not u.missing]
        if self.table is None and broken:
            self._fingerprint = fingerprint
            return self._rejected(SpecError([u.as_problem() for u in broken]))
        self.credentials.keep_only_used()  # tokens of unchanged sources are kept
        self.metrics.follow_credentials(self.credentials.sources())
        self._injections = injections
        self._fingerprint = fingerprint
        first = self.table is None
        self.table = table
        self.metrics.routes.set(len(table))
        self.metrics.follow_injections(table)
        for unusable in table.unusable:
            if unusable.missing:
                log.warning("injection %r stopped injecting, its requests are refused (503) "
                            "until it returns: %s", unusable.injection, unusable.problem)
            elif unusable.kept_previous:
                log.error("injection %r: %s; still injecting its last good value",
                          unusable.injection, unusable.problem)
            else:
                log.error("injection %r is unavailable: %s", unusable.injection,
                          unusable.problem)
        if rejected is not None:
            return self._rejected(rejected)
        if broken:
            self.last_error = "; ".join(f"{u.injection}: {u.problem}" for u in broken)
            self.metrics.reloads.labels("error").inc()
            return False
        self.last_error = None
        self.metrics.reloads.labels("success").inc()
        self.metrics.config_timestamp.set(time.time())
        available = [r.name for r in table.routes if r.unavailable is None]
        missing = [r.name for r in table.routes if r.unavailable is not None]
        log.info("%s configuration%s: %d injection(s): %s%s", "loaded" if first else "reloaded",
                 f" from {CHANNEL_SOURCE}" if fresher is not None else "",
                 len(available), ", ".join(available) or "none",
                 f"; unavailable: {', '.join(missing)}" if missing else "")
        return True

    def _rejected(self, exc: SpecError) -> bool:
        self.last_error = str(exc)
        self.metrics.reloads.labels("error").inc()
        keeping = "keeping the last good configuration" if self.table else "nothing to serve yet"
        log.error("configuration rejected (%s): %d problem(s) follow", keeping,
                  len(exc.problems))
        for problem in exc.problems:  # a line each: log collectors split on newlines
            log.error("configuration problem: %s", problem)
        return False

    def _values_state(self) -> object:
        return self.cluster_values.state() if self.cluster_values else None

    def wants_cluster_values(self) -> bool:
        """Whether any injection served now is a cluster one (its values come from the
        operator; a pod with none never asks). Before the first load: what the routes say."""
        injections = self._injections
        if self.table is None:
            try:
                injections, _ = load_injections(self.sources)
            except SpecError:
                return False
        return any(i.cluster for i in injections)

    def fresher(self) -> dict | None:
        """The routes from the operator channel, when they are newer than the routes file."""
        digest = self._read_file_digest()
        if digest != self._file_digest:
            self._file_digest, self._file_changed_at = digest, self.clock()
        return newest_routes(self.channel_routes(), self._file_changed_at)

    def _read_file_digest(self) -> str:
        digest = hashlib.sha256()
        path = self.sources.injections
        for item in sorted(path.iterdir()) if path.is_dir() else [path]:
            try:
                digest.update(item.read_bytes())
            except OSError as exc:
                digest.update(f"<{exc.errno}>".encode())
        return digest.hexdigest()

    def changed(self) -> bool:
        """Cheap check: did any file the configuration depends on change?"""
        fresher = self.fresher()
        try:
            injections, _ = load_injections(self.sources, fresher)
        except SpecError:
            injections = self._injections
        return _fingerprint(self.sources, injections, fresher,
                            self._values_state()) != self._fingerprint

    async def watch(self, interval: float = 1.0) -> None:
        """Poll for changes forever; reload on any."""
        while True:
            await asyncio.sleep(interval)
            try:
                if self.changed():
                    self.load()
            except Exception:  # a reload bug must never take the proxy down
                log.exception("unexpected error while reloading; still serving the last config")
