"""``keyhole-operator``: run the operator and its webhooks against any kubeconfig."""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import sys
import tempfile
from pathlib import Path

import kopf

from keyhole_common.cidr import parse_cidr
from keyhole_operator.settings import Settings, SidecarResources


def _address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: expected HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)  # noqa: S104 - a server address


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of seconds above 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="keyhole-operator", description=(
        "Reconciles SecretInjections, keeps each namespace's CA and signing key, and serves "
        "the webhooks that inject the keyhole sidecar into labelled pods."))
    p.add_argument("--master-key-file", type=Path, required=True, metavar="FILE",
                   help="secret from which each namespace's routes signing key is derived")
    p.add_argument("--sidecar-image", default=Settings.sidecar_image, metavar="IMAGE")
    p.add_argument("--image-pull-policy", default=Settings.image_pull_policy)
    p.add_argument("--unmatched", choices=("passthrough", "deny"), default=Settings.unmatched,
                   help="what sidecars do with hosts no injection routes")
    p.add_argument("--sidecar-otlp-endpoint", metavar="URL",
                   help="OTLP/HTTP collector every sidecar sends its request spans to, e.g. "
                        "http://otel-collector.monitoring:4318")
    p.add_argument("--no-native-sidecar", action="store_true",
                   help="inject a regular container (for Kubernetes < 1.29)")
    p.add_argument("--sidecar-upstream-ca", type=Path, metavar="FILE",
                   help="PEM certificates every sidecar trusts for upstream TLS besides the "
                        "public roots (an internal CA for private APIs)")
    p.add_argument("--capture", choices=("proxy", "transparent"), default=Settings.capture,
                   help="default for injections without spec.capture: proxy variables only, or "
                        "transparent capture too (keyhole-init; Pod Security privileged)")
    p.add_argument("--capture-exempt-cidr", action="append", default=[], metavar="CIDR",
                   type=parse_cidr,
                   help="destinations transparent capture leaves alone: the cluster's Service "
                        "and Pod CIDRs (repeatable)")
    p.add_argument("--no-proxy", action="append", default=[], metavar="HOST",
                   help="extra NO_PROXY entry for agents, e.g. the API server address (repeatable)")
    p.add_argument("--allow-host-path", action="append", default=[], metavar="PATH",
                   help="a node folder agents of injected pods may mount read-only (repeatable; "
                        "none by default, never one holding the kubelet's or runtime's files)")
    p.add_argument("--protected-secrets-configmap", default="", metavar="NAMESPACE/NAME",
                   help="the ConfigMap the chart's policy reads: which Secrets of each namespace "
                        "no pod but the sidecar may mount (kept current by the operator)")
    p.add_argument("--operator-service-account", default=Settings.operator_service_account,
                   metavar="USER", help="the user allowed to change keyhole.dev/ pod annotations")
    p.add_argument("--sidecar-cpu-request", default=SidecarResources.cpu_request)
    p.add_argument("--sidecar-memory-request", default=SidecarResources.memory_request)
    p.add_argument("--sidecar-memory-limit", default=SidecarResources.memory_limit)
    p.add_argument("--sidecar-cpu-limit", default=None)
    p.add_argument("--webhook-listen", type=_address, default=("0.0.0.0", 9443),  # noqa: S104
                   metavar="HOST:PORT", help="where the webhook server listens (default 0.0.0.0:9443)")
    p.add_argument("--webhook-host", metavar="HOST",
                   help="host name or IP the API server uses to reach the webhook (for managed "
                        "configurations and the self-signed certificate)")
    p.add_argument("--webhook-cert", type=Path, metavar="FILE", help="serving certificate (PEM)")
    p.add_argument("--webhook-key", type=Path, metavar="FILE", help="its private key (PEM)")
    p.add_argument("--webhook-ca", type=Path, metavar="FILE",
                   help="CA bundle for the webhook configurations' caBundle")
    p.add_argument("--manage-webhook-configurations", action="store_true",
                   help="let the operator create its webhook configurations (development; the "
                        "Helm chart creates them itself)")
    p.add_argument("--channel-listen", type=_address, metavar="HOST:PORT",
                   help="serve the operator channel (sidecars lease shared budgets) here, over "
                        "TLS with the webhook's certificate, e.g. 0.0.0.0:9445; off by default")
    p.add_argument("--channel-url", metavar="URL",
                   help="where sidecars reach the channel, e.g. "
                        "https://keyhole-webhook.keyhole-system.svc:9445")
    p.add_argument("--channel-ca", type=Path, metavar="FILE",
                   help="the CA that signed the channel's certificate, delivered to sidecars "
                        "(default: --webhook-ca)")
    p.add_argument("--channel-lease-seconds", type=_positive_seconds, default=120.0,
                   metavar="SECONDS",
                   help="how long a sidecar may spend a slice of a shared budget without "
                        "hearing from the operator (default 120)")
    p.add_argument("--cluster-secrets-namespace", default=Settings.cluster_secrets_namespace,
                   metavar="NAMESPACE",
                   help="where the Secrets of ClusterSecretInjections live (default "
                        f"{Settings.cluster_secrets_namespace}); their values reach sidecars "
                        "over the operator channel, never a mount")
    p.add_argument("--identity-namespace", default=Settings.identity_namespace,
                   metavar="NAMESPACE",
                   help="where federated injections' ServiceAccounts live (default "
                        f"{Settings.identity_namespace}; keyhole's own namespace): their "
                        "tokens are the identities spec.workloadIdentity presents")
    p.add_argument("--cluster-values-keep-seconds", type=_positive_seconds,
                   default=Settings.cluster_values_keep_seconds, metavar="SECONDS",
                   help="how long sidecars keep serving a cluster injection's last values "
                        "while the operator does not answer (default 300); then they refuse "
                        "its requests until it does")
    p.add_argument("--approvals-keep-seconds", type=_positive_seconds,
                   default=Settings.approvals_keep_seconds, metavar="SECONDS",
                   help="how long a decided or expired ApprovalRequest is kept before it is "
                        "deleted (default 86400, a day); its outcome stays in Events and the "
                        "sidecar's audit log")
    p.add_argument("--approvals-notify-url", metavar="URL",
                   default=os.environ.get("KEYHOLE_APPROVALS_NOTIFY_URL") or None,
                   help="POST a JSON notification here when a request starts waiting for "
                        "approval (default: $KEYHOLE_APPROVALS_NOTIFY_URL; none)")
    p.add_argument("--approvals-notify-format", choices=("json", "slack"), default="json",
                   help="json (keyhole's fields) or slack (an incoming webhook's text)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--standalone", action="store_true",
                       help="no peering: for a single replica or development")
    group.add_argument("--peering", default="keyhole", metavar="NAME",
                       help="kopf peering name: one replica reconciles, all serve webhooks")
    p.add_argument("--ca-promote-after", type=float, default=Settings.ca_promote_after,
                   metavar="SECONDS",
                   help="how long a namespace's next CA is trusted by agents before sidecars "
                        "sign with it (default 600; longer than the kubelets' sync period)")
    p.add_argument("--resync-seconds", type=float, default=30.0, metavar="SECONDS",
                   help="how often each SecretInjection's status, pods and CA are re-checked")
    p.add_argument("--metrics-listen", type=_address, default=None, metavar="HOST:PORT",
                   help="serve Prometheus metrics here (e.g. 0.0.0.0:8000); off by default")
    p.add_argument("--liveness", default="http://0.0.0.0:8080/healthz", metavar="URL")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.add_argument("--reload", action="store_true",
                   help="development: restart in place when the operator's source files change "
                        "(skaffold dev syncs them into the container)")
    return p


def _restart_on_change() -> None:
    """Re-exec this process when a source file of the operator or the shared spec changes."""
    import threading
    import time

    import keyhole_common
    import keyhole_operator

    roots = [Path(keyhole_operator.__file__).parent, Path(keyhole_common.__file__).parent]

    def stamp() -> list[tuple[str, int]]:
        return sorted((str(p), p.stat().st_mtime_ns) for r in roots for p in r.rglob("*.py"))

    def watch() -> None:
        first = stamp()
        while True:
            time.sleep(1)
            if stamp() != first:
                logging.getLogger("keyhole.operator").warning("source changed: restarting")
                os.execv(sys.executable,  # noqa: S606 - restarts this very program
                         [sys.executable, "-m", "keyhole_operator.cli", *sys.argv[1:]])

    threading.Thread(target=watch, daemon=True, name="reload").start()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # --log-level debug is keyhole's own: kopf, the kubernetes client and urllib3 write the
    # objects and requests they handle at DEBUG (Secrets the operator reads among them).
    wanted = logging.getLevelName(args.log_level.upper())
    logging.basicConfig(level=max(wanted, logging.INFO), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("keyhole").setLevel(wanted)
    try:
        master_key = args.master_key_file.read_bytes().strip()
    except OSError as exc:
        print(f"keyhole-operator: cannot read --master-key-file: {exc.strerror}", file=sys.stderr)
        return 2
    if len(master_key) < 32:
        print("keyhole-operator: the master key must be at least 32 bytes", file=sys.stderr)
        return 2
    upstream_ca = ""
    if args.sidecar_upstream_ca:
        from keyhole_operator.trust import read_pem_certificates

        try:
            upstream_ca = read_pem_certificates(args.sidecar_upstream_ca,
                                                "--sidecar-upstream-ca")
        except ValueError as exc:
            print(f"keyhole-operator: {exc}", file=sys.stderr)
            return 2
    if (args.channel_listen is None) != (args.channel_url is None):
        print("keyhole-operator: give both --channel-listen and --channel-url, or neither",
              file=sys.stderr)
        return 2
    if args.channel_url and not args.channel_url.startswith("https://"):
        print(f"keyhole-operator: --channel-url {args.channel_url!r}: the channel is HTTPS "
              "(https://HOST:PORT)", file=sys.stderr)
        return 2
    channel_ca = ""
    if args.channel_ca:
        from keyhole_operator.trust import read_pem_certificates

        try:
            channel_ca = read_pem_certificates(args.channel_ca, "--channel-ca")
        except ValueError as exc:
            print(f"keyhole-operator: {exc}", file=sys.stderr)
            return 2
    from keyhole_operator.guard import check_allowed_host_paths

    try:
        check_allowed_host_paths(args.allow_host_path)
    except ValueError as exc:
        print(f"keyhole-operator: --allow-host-path: {exc}", file=sys.stderr)
        return 2
    if args.protected_secrets_configmap and "/" not in args.protected_secrets_configmap:
        print("keyhole-operator: --protected-secrets-configmap takes NAMESPACE/NAME, e.g. "
              "keyhole-system/keyhole-protected-secrets", file=sys.stderr)
        return 2
    no_proxy = list(args.no_proxy)
    api_server = os.environ.get("KUBERNETES_SERVICE_HOST")  # in a pod: agents reach it directly
    if api_server and api_server not in no_proxy:
        no_proxy.append(api_server)
    settings = Settings(
        sidecar_image=args.sidecar_image, image_pull_policy=args.image_pull_policy,
        unmatched=args.unmatched, native_sidecar=not args.no_native_sidecar,
        otlp_endpoint=args.sidecar_otlp_endpoint,
        no_proxy=tuple(no_proxy), operator_service_account=args.operator_service_account,
        resources=SidecarResources(cpu_request=args.sidecar_cpu_request,
                                   memory_request=args.sidecar_memory_request,
                                   memory_limit=args.sidecar_memory_limit,
                                   cpu_limit=args.sidecar_cpu_limit),
        upstream_ca=upstream_ca, ca_promote_after=args.ca_promote_after,
        channel_url=args.channel_url,
        capture=args.capture, capture_exempt_cidrs=tuple(args.capture_exempt_cidr),
        allowed_host_paths=tuple(args.allow_host_path),
        protected_secrets_configmap=args.protected_secrets_configmap,
        cluster_secrets_namespace=args.cluster_secrets_namespace,
        identity_namespace=args.identity_namespace,
        cluster_values_keep_seconds=args.cluster_values_keep_seconds,
        approvals_keep_seconds=args.approvals_keep_seconds,
    )
    if args.reload:
        _restart_on_change()
    from keyhole_operator import approval_handlers, grant_handlers, handlers  # kopf's now
    from keyhole_operator.approval_desk import Board

    assert approval_handlers.DECIDE_WEBHOOK and grant_handlers.STAMP_WEBHOOK
    board = Board()  # the channel's approval calls wait on it; the watch wakes them

    handlers.register_refresh(args.resync_seconds)
    handlers.register_cluster_refresh(args.resync_seconds)
    if args.metrics_listen:
        from keyhole_operator import metrics

        metrics.serve(*args.metrics_listen)

    addr, port = args.webhook_listen
    host = args.webhook_host or addr
    cert, key, ca = args.webhook_cert, args.webhook_key, args.webhook_ca
    if (cert is None) != (key is None):
        print("keyhole-operator: give both --webhook-cert and --webhook-key, or neither",
              file=sys.stderr)
        return 2
    if cert is None:
        from keyhole_operator.webhook_tls import self_signed

        folder = Path(tempfile.mkdtemp(prefix="keyhole-webhook-"))
        ca, cert, key = self_signed(folder, [host, addr] if addr != host else [host])
        logging.getLogger("keyhole.operator").warning(
            "no --webhook-cert: serving a self-signed certificate (development only)")
    if not args.standalone:
        from keyhole_operator.kube import Cluster

        try:
            Cluster().ensure_peering(args.peering)
        except RuntimeError as exc:
            print(f"keyhole-operator: {exc}", file=sys.stderr)
            return 2
    if args.channel_url:
        from dataclasses import replace

        from keyhole_operator.channel import Channel, serve
        from keyhole_operator.kube import Cluster
        from keyhole_operator.trust import read_pem_certificates

        if not channel_ca and ca is None:
            print("keyhole-operator: --channel-url needs the CA of the webhook certificate: "
                  "give --channel-ca or --webhook-ca", file=sys.stderr)
            return 2
        try:
            channel_ca = channel_ca or read_pem_certificates(Path(ca), "--webhook-ca")
        except ValueError as exc:
            print(f"keyhole-operator: {exc}", file=sys.stderr)
            return 2
        settings = replace(settings, channel_ca=channel_ca)
        notifier = None
        if args.approvals_notify_url:
            from keyhole_operator.notify import Notifier

            try:
                notifier = Notifier(args.approvals_notify_url, args.approvals_notify_format)
            except ValueError as exc:
                print(f"keyhole-operator: --approvals-notify-url: {exc}", file=sys.stderr)
                return 2
        serve(Channel(Cluster(), master_key, lease_seconds=args.channel_lease_seconds,
                      central_namespace=args.cluster_secrets_namespace, board=board,
                      notifier=notifier, home=args.identity_namespace),
              *args.channel_listen, str(cert), str(key))
    from keyhole_operator.webhook_server import ReviewCheckingWebhookServer

    server = ReviewCheckingWebhookServer(addr=addr, port=port, host=host, certfile=str(cert),
                                pkeyfile=str(key), cafile=str(ca) if ca else None)
    runtime = handlers.Runtime(settings=settings, master_key=master_key, webhook_server=server,
                               manage_webhook_configurations=args.manage_webhook_configurations,
                               board=board)
    # kopf pauses every replica when peers share a priority: each draws its own, and the
    # highest reconciles (all of them serve the webhooks).
    priority = 0 if args.standalone else secrets.SystemRandom().randint(1, 2**31 - 1)
    kopf.run(clusterwide=True, standalone=args.standalone, priority=priority,
             peering_name=None if args.standalone else args.peering,
             liveness_endpoint=args.liveness, memo=kopf.Memo(runtime=runtime))
    return 0


if __name__ == "__main__":
    sys.exit(main())
