"""``keyhole-sidecar``: run the proxy, or ``keyhole-sidecar check`` a configuration."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import sys
from pathlib import Path

from keyhole_common.ca import CAError, CertificateAuthority
from keyhole_common.spec import SpecError
from keyhole_sidecar import __version__
from keyhole_sidecar.allocator import keep_large_buffers_off_the_heap
from keyhole_sidecar.app import Options, StartupError, run
from keyhole_sidecar.config import Sources, load_route_table
from keyhole_sidecar.egress import Egress
from keyhole_sidecar.inventory import inventory, render_text
from keyhole_sidecar.limits import describe
from keyhole_sidecar.logformat import configure
from keyhole_sidecar.upstream import ResolveOverride, upstream_tls_context

DEFAULT_LISTEN = "127.0.0.1:15080"
DEFAULT_ADMIN = "127.0.0.1:15090"


def _seconds(text: str) -> float:
    """A duration on the command line: a number of seconds, more than zero."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of seconds above 0")
    return value


def _otlp_endpoint(text: str) -> str:
    scheme, sep, rest = text.partition("://")
    if scheme not in ("http", "https") or not sep or not rest.split("/", 1)[0]:
        raise argparse.ArgumentTypeError(f"{text!r}: give the collector's OTLP/HTTP base URL, "
                                         "e.g. http://otel-collector:4318")
    return text


def _address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r}: expected HOST:PORT, e.g. {DEFAULT_LISTEN}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _loopback(text: str) -> tuple[str, int]:
    host, port = _address(text)
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise argparse.ArgumentTypeError(
            f"{text!r}: the proxy port must listen on a loopback address (127.0.0.1 or ::1); "
            "whoever reaches it can use every injected secret"
        )
    return host, port


def _resolve(text: str) -> ResolveOverride:
    try:
        return ResolveOverride.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _common(parser: argparse.ArgumentParser, check: bool) -> None:
    parser.add_argument("--injections", type=Path, required=True, metavar="FILE|DIR",
                        help="SecretInjection YAML/JSON: a file or a folder" +
                             ("" if check else " (edits apply live, within 2 s)"))
    parser.add_argument("--secrets-dir", type=Path, required=True, metavar="DIR",
                        help="secret values as <secret-name>/<key> files")
    parser.add_argument("--ca-dir", type=Path, default=Path("./ca"), metavar="DIR",
                        help="tls.crt + tls.key of the CA for intercepted hosts (default ./ca); "
                             + ("checked when present, never created" if check else
                                "created on first start when absent"))
    parser.add_argument("--upstream-ca", type=Path, metavar="FILE",
                        help="PEM bundle trusted for upstream TLS besides the system roots")
    parser.add_argument("--signing-key", type=Path, metavar="FILE",
                        help="require the injections document to be signed with this key")


SUBCOMMANDS = """commands (each with its own --help):
  keyhole-sidecar check --injections … --secrets-dir … [-v]
                                   validate a configuration without serving; exit 1 on a problem
  keyhole-sidecar transparent-rules  print the iptables rules keyhole-init would install

signals: SIGHUP reloads the configuration, --upstream-ca and the CA at once; SIGTERM drains.
"""


def build_parser(check: bool) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="keyhole-sidecar check" if check else "keyhole-sidecar",
        description=("Validate injections, secrets and CA without serving; exit 1 on any problem."
                     if check else
                     "Proxy that adds secrets to requests for the hosts they belong to."),
        epilog=None if check else SUBCOMMANDS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(parser, check)
    if check:
        parser.add_argument("-v", "--verbose", action="store_true",
                            help="also list each injection's credential kind, Secret keys with a "
                                 "fingerprint of each value (never the value), rules and limits, "
                                 "and the CA")
    else:
        parser.add_argument("--listen", type=_loopback, default=_loopback(DEFAULT_LISTEN),
                            metavar="HOST:PORT", help=f"proxy port (default {DEFAULT_LISTEN}; "
                                                      "loopback only)")
        parser.add_argument("--transparent-listen", type=_loopback, default=None,
                            metavar="HOST:PORT", help="also serve connections keyhole-init "
                                                      "redirects here (transparent capture; "
                                                      "loopback only, e.g. 127.0.0.1:15081)")
        parser.add_argument("--state-dir", type=Path, default=None, metavar="DIR",
                            help="keep what spec.limits windows and spec.llm budgets counted "
                                 "in DIR, across restarts (in a pod: an emptyDir); without it "
                                 "they are kept in memory only")
        parser.add_argument("--admin-listen", type=_address, default=_address(DEFAULT_ADMIN),
                            metavar="HOST:PORT", help="/healthz, /readyz, /metrics and /config "
                                                      f"(what is served; default "
                                                      f"{DEFAULT_ADMIN})")
        parser.add_argument("--unmatched", choices=("passthrough", "deny"),
                            default="passthrough", help="unrouted hosts: tunnel/forward them "
                                                        "untouched (default) or answer 403")
        parser.add_argument("--egress", choices=[e.value for e in Egress], default="private",
                            help="addresses the proxy may connect to: public only; public and "
                                 "private ranges (default); or any. Loopback, link-local "
                                 "(cloud metadata), multicast and reserved addresses are refused "
                                 "unless 'any'; --resolve targets are always allowed")
        parser.add_argument("--resolve", type=_resolve, action="append", default=[],
                            metavar="HOST:PORT:ADDR", help="connect to ADDR for HOST:PORT "
                                                           "(repeatable, like curl); a "
                                                           "resolved target skips --egress")
        parser.add_argument("--header-timeout", type=_seconds, default=15.0, metavar="SECONDS",
                            help="close connections that send no complete request head in "
                                 "time (default 15)")
        parser.add_argument("--idle-timeout", type=_seconds, default=120.0, metavar="SECONDS",
                            help="close keep-alive connections idle this long (default 120)")
        parser.add_argument("--upstream-timeout", type=_seconds, default=300.0, metavar="SECONDS",
                            help="wait this long for an upstream's response headers, then 504 "
                                 "(default 300; bodies may stream for longer)")
        parser.add_argument("--drain-timeout", type=_seconds, default=20.0, metavar="SECONDS",
                            help="on SIGTERM or SIGINT, stop accepting and wait this long for "
                                 "requests in flight before exiting (default 20; a second "
                                 "signal stops at once). SIGHUP reloads the configuration and "
                                 "the CA at once")
        parser.add_argument("--otlp-endpoint", type=_otlp_endpoint, default=None,
                            metavar="URL", help="send a span per request (GenAI semantic "
                                                "conventions for model APIs) to this OTLP/HTTP "
                                                "collector, e.g. http://otel-collector:4318")
        parser.add_argument("--identity-token", type=Path, metavar="FILE",
                            help="standalone: the JWT that spec.workloadIdentity presents to "
                                 "its provider (re-read at every exchange; whatever writes it "
                                 "keeps it fresh). In Kubernetes the operator hands it over")
        parser.add_argument("--operator-url", metavar="URL",
                            help="the operator channel, for budgets the injection's pods "
                                 "share (for: injection), e.g. "
                                 "https://keyhole-webhook.keyhole-system.svc:9445")
        parser.add_argument("--operator-ca", type=Path, metavar="FILE",
                            help="the CA of the operator channel's certificate (PEM)")
        parser.add_argument("--operator-token", type=Path, metavar="FILE",
                            help="the pod's projected ServiceAccount token for the channel "
                                 "(audience keyhole.dev; re-read at every call)")
        parser.add_argument("--operator-report-seconds", type=_seconds, default=10.0,
                            metavar="SECONDS", help="how often what was counted is reported "
                                                    "to the operator (default 10)")
        parser.add_argument("--operator-routes-seconds", type=_seconds, default=10.0,
                            metavar="SECONDS",
                            help="how often the pod's signed routes are asked of the operator, "
                                 "so a revocation arrives within about this long whatever the "
                                 "kubelet does (default 10; each ask is one pod read by the "
                                 "operator; with --signing-key)")
        parser.add_argument("--operator-values-seconds", type=_seconds, default=10.0,
                            metavar="SECONDS",
                            help="how often the values of the pod's cluster injections are asked "
                                 "of the operator: a rotated Secret is injected within about "
                                 "this long (default 10)")
        parser.add_argument("--operator-values-keep-seconds", type=_seconds, default=300.0,
                            metavar="SECONDS",
                            help="how long the last values of cluster injections serve while "
                                 "the operator does not answer; then their requests are refused "
                                 "(503) until it does (default 300)")
        parser.add_argument("--log-level", default="info",
                            choices=("debug", "info", "warning", "error"),
                            help="the sidecar's own log on stderr (default info); debug is "
                                 "keyhole's, libraries stay at info; no level ever holds a "
                                 "secret")
        parser.add_argument("--log-format", default="text", choices=("text", "json"),
                            help="the sidecar's log on stderr: text lines (default) or one JSON "
                                 "object per line for log collectors; the audit log on stdout "
                                 "is JSON either way")
        parser.add_argument("--version", action="version", version=f"keyhole {__version__}")
    return parser


def check(argv: list[str]) -> int:
    args = build_parser(check=True).parse_args(argv)
    problems: list[str] = []
    skipped: list[str] = []
    table = ca = None
    try:
        # Where a federated injection's identity comes from is the running proxy's concern.
        table, skipped = load_route_table(Sources(args.injections, args.secrets_dir,
                                                  args.signing_key, identity=True))
    except SpecError as exc:
        problems.extend(str(p) for p in exc.problems)
    if args.ca_dir.exists():
        try:
            ca = CertificateAuthority.load(args.ca_dir).cert
        except CAError as exc:
            problems.append(f"{args.ca_dir}: {exc}")
    if args.upstream_ca:
        try:
            upstream_tls_context(args.upstream_ca)
        except ValueError as exc:
            problems.append(str(exc))
    for what in skipped:
        print(f"skipped {what}: not a SecretInjection", file=sys.stderr)
    if problems:
        print(f"{len(problems)} problem(s):", file=sys.stderr)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    assert table is not None
    if args.verbose:
        print("\n".join(render_text(inventory(table, ca, version=__version__))))
        where = args.ca_dir.resolve()
        print(f"CA folder: {where}" if ca is not None else
              f"CA: none yet; keyhole-sidecar would create one in {where} (clients must then "
              "trust its tls.crt)")
    else:
        for route in table.routes:
            hosts = ", ".join(str(h) for h in route.injection.hosts)
            sets = [name for name, _ in route.headers] + [f"?{name}" for name, _ in route.query]
            if route.credential is not None:  # minted or signed by the proxy
                sets.append(f"Authorization ({route.source})")
            print(f"ok  {route.name}: {hosts} ← {', '.join(sets)}")
            if route.injection.limits is not None:
                print(f"    limits: {describe(route.injection.limits)}")
            for index, rule in enumerate(route.injection.rules or ()):
                if rule.limits is not None:
                    print(f"    rules[{index}] limits: {describe(rule.limits)}")
    print(f"{len(table)} injection(s) ok")
    return 0


def _event_loop_runner():
    """uvloop when installed (a faster event loop, same semantics), else asyncio's own."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run
    return uvloop.run


COMMANDS = ("check", "transparent-rules")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["check"]:
        return check(argv[1:])
    if argv[:1] == ["transparent-rules"]:  # the standalone recipe for transparent capture
        from keyhole_sidecar.capture import main as capture_main

        return capture_main(argv[1:], prog="keyhole-sidecar transparent-rules", printing=True)
    if argv and not argv[0].startswith("-"):
        print(f"keyhole-sidecar: unknown command {argv[0]!r}: the commands are "
              f"{', '.join(COMMANDS)}; without one it runs the proxy (keyhole-sidecar --help)",
              file=sys.stderr)
        return 2
    parser = build_parser(check=False)
    args = parser.parse_args(argv)
    channel = (args.operator_url, args.operator_ca, args.operator_token)
    if any(channel) and not all(channel):
        parser.error("the operator channel needs --operator-url, --operator-ca and "
                     "--operator-token together")
    if args.operator_url and not args.operator_url.startswith("https://"):
        parser.error(f"--operator-url {args.operator_url!r}: the channel is HTTPS "
                     "(https://HOST:PORT)")
    configure(args.log_level, args.log_format)
    keep_large_buffers_off_the_heap()
    options = Options(
        injections=args.injections, secrets_dir=args.secrets_dir, ca_dir=args.ca_dir,
        listen=args.listen, admin_listen=args.admin_listen, unmatched=args.unmatched,
        resolve=args.resolve, upstream_ca=args.upstream_ca, signing_key=args.signing_key,
        header_timeout=args.header_timeout, idle_timeout=args.idle_timeout,
        egress=Egress(args.egress), upstream_timeout=args.upstream_timeout,
        transparent_listen=args.transparent_listen, state_dir=args.state_dir,
        drain_timeout=args.drain_timeout, otlp_endpoint=args.otlp_endpoint,
        operator_url=args.operator_url, operator_ca=args.operator_ca,
        operator_token=args.operator_token, operator_report_seconds=args.operator_report_seconds,
        operator_routes_seconds=args.operator_routes_seconds,
        operator_values_seconds=args.operator_values_seconds,
        operator_values_keep_seconds=args.operator_values_keep_seconds,
        identity_token=args.identity_token,
    )
    try:
        _event_loop_runner()(run(options))
    except StartupError as exc:
        print(f"keyhole-sidecar: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
