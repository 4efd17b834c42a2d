"""Wiring: build every part from the command-line options and run until stopped."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import platform
import signal
import ssl
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from keyhole_common.ca import CAError, CertificateAuthority, ca_fingerprint
from keyhole_common.spec import verify
from keyhole_sidecar import __version__, logformat
from keyhole_sidecar.admin import admin_app
from keyhole_sidecar.approvals import MAX_HELD as APPROVALS_HELD
from keyhole_sidecar.approvals import Approvals
from keyhole_sidecar.audit import AuditLog
from keyhole_sidecar.certs import LeafCache
from keyhole_sidecar.cluster_values import ClusterValues
from keyhole_sidecar.config import LiveConfig, Sources, read_signing_key
from keyhole_sidecar.credentials.subject import ChannelSubjectTokens, FileSubjectTokens
from keyhole_sidecar.egress import Egress, EgressPolicy
from keyhole_sidecar.httplog import protocol_logger
from keyhole_sidecar.inventory import inventory
from keyhole_sidecar.limits import Limiter
from keyhole_sidecar.metrics import Metrics
from keyhole_sidecar.operator_channel import OperatorChannel, OperatorRoutes
from keyhole_sidecar.proxy.context import ProxyContext, ProxySettings
from keyhole_sidecar.proxy.wire.frontdoor import FrontDoor
from keyhole_sidecar.proxy.wire.pool import UpstreamPool
from keyhole_sidecar.upstream import (
    OverridingResolver,
    ResolveOverride,
    make_session,
    upstream_tls_context,
)
from keyhole_sidecar.usage.budgets import Budgets
from keyhole_sidecar.usage.shared import SharedBudgets

log = logging.getLogger("keyhole")


@dataclass
class Options:
    """Everything ``keyhole-sidecar`` is told on its command line."""

    injections: Path
    secrets_dir: Path
    ca_dir: Path
    listen: tuple[str, int] = ("127.0.0.1", 15080)
    admin_listen: tuple[str, int] = ("127.0.0.1", 15090)
    unmatched: str = "passthrough"
    resolve: list[ResolveOverride] = field(default_factory=list)
    upstream_ca: Path | None = None
    signing_key: Path | None = None
    reload_interval: float = 1.0
    drain_timeout: float = 20.0
    header_timeout: float = 15.0
    idle_timeout: float = 120.0
    egress: Egress = Egress.PRIVATE
    upstream_timeout: float = 300.0
    otlp_endpoint: str | None = None  # traces: an OTLP/HTTP collector's base URL
    transparent_listen: tuple[str, int] | None = None  # keyhole-init redirects here
    state_dir: Path | None = None  # spec.limits.window counts, kept across restarts
    operator_url: str | None = None  # the operator channel: budgets shared by an injection's pods
    operator_ca: Path | None = None
    operator_token: Path | None = None
    operator_report_seconds: float = 10.0
    operator_routes_seconds: float = 10.0  # how often the pod's routes are asked of the operator
    operator_values_seconds: float = 10.0  # how often cluster injections' values are asked
    operator_values_keep_seconds: float = 300.0  # their last values serve this long unanswered
    identity_token: Path | None = None  # standalone: spec.workloadIdentity's subject token


class CAWatch:
    """Follows a rotated CA (the operator replaces it before it expires) without a restart."""

    def __init__(self, ca_dir: Path, leaves: LeafCache, metrics: Metrics):
        self.ca_dir, self.leaves, self.metrics = ca_dir, leaves, metrics
        self.seen = ca_fingerprint(ca_dir)

    def check(self) -> str:
        """Load the CA if its files changed; what happened, in a few words."""
        current = ca_fingerprint(self.ca_dir)
        if current == self.seen:
            return "CA unchanged"
        self.seen = current
        try:
            ca = CertificateAuthority.load(self.ca_dir)
        except CAError as exc:
            self.metrics.reloads.labels("error").inc()
            log.error("the CA in %s changed but cannot be used (%s); still signing with the "
                      "previous one", self.ca_dir, exc)
            return "CA rejected"
        self.leaves.replace_ca(ca)
        self.metrics.reloads.labels("success").inc()
        log.info("CA in %s changed: new leaf certificates are signed by %s", self.ca_dir,
                 ca.cert.subject.rfc4514_string())
        return "CA reloaded"

    async def watch(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            self.check()


class StartupError(RuntimeError):
    """Cannot start; the message says what to fix."""


def raise_file_limit() -> None:
    """Every client connection and tunnel is a file descriptor: use all the hard limit allows."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def run(options: Options, *, ready: asyncio.Event | None = None,
              stop: asyncio.Event | None = None) -> None:
    raise_file_limit()
    metrics = Metrics()
    metrics.build.info({"version": __version__, "python": platform.python_version(),
                        "event_loop": type(asyncio.get_running_loop()).__module__.split(".")[0]})
    channel = routes = values = None
    if options.operator_url and options.operator_ca and options.operator_token:
        channel = OperatorChannel(options.operator_url, options.operator_ca,
                                  options.operator_token,
                                  on_answer=lambda call, ok: metrics.channel_up.labels(call).set(
                                      1 if ok else 0))
        if options.signing_key is not None:  # routes come signed, or not at all
            signing_key = options.signing_key
            routes = OperatorRoutes(channel, options.operator_routes_seconds,
                                    lambda doc: verify(doc, read_signing_key(signing_key)))
            values = ClusterValues(channel, options.operator_values_seconds,
                                   options.operator_values_keep_seconds)
    subjects = (ChannelSubjectTokens(channel) if channel is not None else
                FileSubjectTokens(options.identity_token) if options.identity_token else None)
    config = LiveConfig(Sources(options.injections, options.secrets_dir, options.signing_key,
                                operator=channel is not None,
                                identity=subjects is not None),
                        metrics, channel_routes=routes.current if routes else None,
                        cluster_values=values, subjects=subjects)
    if values is not None:
        values.wanted = config.wants_cluster_values
        if config.wants_cluster_values():  # asked before the first load, so none waits for it
            await values.fetch()
    if not config.load():  # the log above names each problem
        raise StartupError("the configuration has the problems logged above; fix them and "
                           "start again (keyhole-sidecar check lists them too)")
    logformat.SCRUBBER.source = lambda: config.current().redactor()
    try:  # every input checked before the one side effect (a new CA on disk)
        upstream_tls = upstream_tls_context(options.upstream_ca)
        upstream_tls_h2 = upstream_tls_context(options.upstream_ca, alpn=("h2", "http/1.1"))
    except ValueError as exc:
        raise StartupError(str(exc)) from None
    try:
        ca = CertificateAuthority.load_or_create(options.ca_dir)
    except CAError as exc:
        raise StartupError(str(exc)) from None
    leaves = LeafCache(ca, on_mint=metrics.leaves_minted.inc)
    resolver = OverridingResolver(options.resolve, EgressPolicy(options.egress))
    session = make_session(resolver, upstream_tls)
    settings = ProxySettings(unmatched=options.unmatched,  # type: ignore[arg-type]
                             header_timeout=options.header_timeout,
                             idle_timeout=options.idle_timeout,
                             upstream_timeout=options.upstream_timeout)
    pool = UpstreamPool(resolver, upstream_tls, upstream_tls_h2)
    limiter = Limiter(options.state_dir, on_refused=metrics.limit_refused)
    metrics.watch_windows(limiter.windows_left)
    budgets = Budgets(options.state_dir, clock=limiter.clock, on_refused=metrics.budget_refused)
    shared = SharedBudgets(channel, limiter.clock, options.operator_report_seconds,
                           on_refused=metrics.budget_refused)
    metrics.watch_budgets(lambda: budgets.remaining() + shared.remaining(),
                          lambda: budgets.limits() + shared.limits(), budgets.used)
    # Long-polls of their own: requests held for approval never take the connections that
    # routes, values and budgets ride on.
    approvals = Approvals(None if channel is None else OperatorChannel(
        options.operator_url, options.operator_ca, options.operator_token,
        on_answer=channel.on_answer, limit=APPROVALS_HELD))
    metrics.approvals_held.set_function(lambda: approvals.held)
    metrics.approval_oldest.set_function(approvals.oldest_wait)
    tracing = None
    if options.otlp_endpoint:
        from keyhole_sidecar.tracing import Tracing

        tracing = Tracing(options.otlp_endpoint)
    ctx = ProxyContext(settings=settings, routes=config.current, leaves=leaves,
                       resolver=resolver, pool=pool, session=session, metrics=metrics,
                       audit=AuditLog(), limiter=limiter, budgets=budgets, shared=shared,
                       approvals=approvals, traces=tracing.request_done if tracing else None)
    server_kwargs = dict(
        logger=protocol_logger(metrics.decisions.labels("denied", "malformed").inc),
        keepalive_timeout=settings.idle_timeout, max_line_size=settings.max_line_size,
        max_field_size=settings.max_field_size, max_headers=settings.max_headers,
        access_log=None, auto_decompress=False, lingering_time=2.0,
    )
    loop = asyncio.get_running_loop()

    def readiness() -> str | None:
        if config.table is None:
            return "no configuration loaded"
        if config.last_error is not None:  # the problems name files: they go to the log only
            return ("the configuration on disk was rejected (the sidecar's log names each "
                    "problem); still serving the last good one")
        try:
            leaves.check()
        except CAError as exc:
            return str(exc)
        return None

    def described() -> dict:
        return inventory(config.current(), leaves.ca.cert, version=__version__,
                         rejected=readiness() if config.last_error is not None else None)

    admin_runner = web.AppRunner(admin_app(metrics, readiness, described), access_log=None)
    await admin_runner.setup()
    servers: list = []
    flag = "--listen"
    try:
        servers.append(await loop.create_server(
            lambda: FrontDoor(ctx, server_kwargs), options.listen[0], options.listen[1],
            reuse_address=True, backlog=1024,
        ))
        if options.transparent_listen:
            from keyhole_sidecar.proxy.wire.transparent import TransparentPort

            flag = "--transparent-listen"
            servers.append(TransparentPort(ctx, server_kwargs, options.transparent_listen))
        flag = "--admin-listen"
        admin_site = web.TCPSite(admin_runner, options.admin_listen[0], options.admin_listen[1],
                                 reuse_address=True)
        await admin_site.start()
    except OSError as exc:
        for server in servers:
            server.close()
        await admin_runner.cleanup()
        await session.close()
        await resolver.close()
        why = os.strerror(exc.errno) if exc.errno else str(exc)
        raise StartupError(f"{flag}: cannot listen ({why}); choose another address with "
                           f"{flag} HOST:PORT") from None
    proxy_server = servers[0]
    ca_watch = CAWatch(options.ca_dir, leaves, metrics)
    watchers = [asyncio.create_task(config.watch(options.reload_interval)),
                asyncio.create_task(ca_watch.watch(options.reload_interval)),
                asyncio.create_task(shared.report_forever())]
    if routes is not None:
        watchers.append(asyncio.create_task(routes.follow_forever()))
    if values is not None:
        watchers.append(asyncio.create_task(values.follow_forever()))
    host, port = proxy_server.sockets[0].getsockname()[:2]
    admin_host, admin_port = admin_runner.addresses[0][:2]
    log.info("keyhole-sidecar proxying on %s:%s (unmatched hosts: %s), admin on %s:%s",
             host, port, options.unmatched, admin_host, admin_port)
    if options.transparent_listen:
        log.info("transparent port on %s:%s", *options.transparent_listen)
    stop = stop or asyncio.Event()
    force = asyncio.Event()  # a second TERM or INT: stop draining
    stopping: list[int] = []

    def on_stop(sig: int) -> None:
        stopping.append(sig)
        if len(stopping) > 1:
            log.warning("%s again: not waiting for requests in flight", signal.Signals(sig).name)
            force.set()
        stop.set()

    def reload_upstream_ca() -> str:
        """--upstream-ca read again (a private upstream's CA rotated): new connections verify
        against the bundle as it is now; a bundle that does not load keeps the last good one."""
        if options.upstream_ca is None:
            return ""
        try:
            tls = upstream_tls_context(options.upstream_ca)
            tls_h2 = upstream_tls_context(options.upstream_ca, alpn=("h2", "http/1.1"))
            upstream_tls.load_verify_locations(cafile=str(options.upstream_ca))
        except (ValueError, OSError, ssl.SSLError) as exc:
            log.error("SIGHUP: %s; the last good --upstream-ca still serves", exc)
            return "; --upstream-ca rejected (still the last good bundle)"
        pool.tls, pool.tls_h2 = tls, tls_h2  # the data path: exactly the bundle now
        return "; --upstream-ca reloaded"

    def on_hup() -> None:
        ok = config.load()
        log.info("SIGHUP: configuration %s%s; %s", "reloaded" if ok else "rejected (see above; "
                 "still serving the last good one)", reload_upstream_ca(), ca_watch.check())

    def on_ignored(sig: int) -> None:
        log.info("%s ignored (SIGHUP reloads, SIGTERM drains and stops)",
                 signal.Signals(sig).name)

    with contextlib.suppress(NotImplementedError, RuntimeError):
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_stop, sig)
        loop.add_signal_handler(signal.SIGHUP, on_hup)
        for sig in (signal.SIGUSR1, signal.SIGUSR2):
            loop.add_signal_handler(sig, on_ignored, sig)
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
        for server in servers:  # stop accepting; let what is in flight finish
            server.close()
        if stopping and ctx.inflight.count:
            log.info("draining: %d request(s) in flight, waiting up to %gs",
                     ctx.inflight.count, options.drain_timeout)
            if not await ctx.inflight.wait_idle(options.drain_timeout, force):
                log.warning("%d request(s) still in flight after %gs; stopping anyway",
                            ctx.inflight.count, options.drain_timeout)
    finally:
        log.info("shutting down")
        for watcher in watchers:
            watcher.cancel()
        for server in servers:
            server.close()
        ctx.audit.flush()
        await approvals.close()  # a client that left while held: its withdrawal sent
        if channel is not None:
            await channel.reported()  # how the last exchanges went, for the status
        await shared.close()  # what was counted goes to the operator before the pod ends
        if tracing is not None:  # sends what is queued (the exporter's timeout bounds it)
            await loop.run_in_executor(None, tracing.shutdown)
        pool.close()
        await admin_runner.cleanup()
        await session.close()
        await resolver.close()
