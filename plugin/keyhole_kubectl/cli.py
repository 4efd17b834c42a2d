"""``kubectl keyhole`` (the ``kubectl-keyhole`` executable kubectl finds on PATH).

  kubectl keyhole status                    injections, readiness, pods, the CA's age
  kubectl keyhole who-can-use NAME          pods that can use an injection or a Secret
  kubectl keyhole explain pod POD           why a pod does (not) get each key
  kubectl keyhole explain si NAME           what a provider's trust rule must name
  kubectl keyhole approvals                 requests held for a person's approval
  kubectl keyhole approve|deny NAME         decide one (approve --for 30m: a grant)
  kubectl keyhole grant pod/NAME --injection I --for 2h   just-in-time access

with kubectl's ``-n``, ``-A``, ``-o json|yaml|wide``, ``--kubeconfig`` and ``--context``.
It reads the API only (get/list of secretinjections, pods and configmaps), except approve
and deny, which write an ApprovalRequest's decision (its status, with the approve verb).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

import yaml

USAGE_EXAMPLES = """examples:
  kubectl keyhole status -A
  kubectl keyhole who-can-use openai-credentials -n agents
  kubectl keyhole explain pod agent-7d9f -n agents -o yaml
  kubectl keyhole approvals -A
  kubectl keyhole approve agent-7d9f-x2k4q -n agents --for 30m --reason "release day"
"""


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-n", "--namespace", help="the namespace (default: the context's)")
    parser.add_argument("-o", "--output", choices=("json", "yaml", "wide"),
                        help="json or yaml: the whole answer; wide: more columns")
    parser.add_argument("--kubeconfig", help="path to the kubeconfig (default: $KUBECONFIG)")
    parser.add_argument("--context", help="the kubeconfig context to use")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kubectl keyhole", epilog=USAGE_EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     description="Which pods can use which key, and why a pod "
                                                 "does or does not get its key.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    status = commands.add_parser("status", help="injections, readiness, pods, the CA's age")
    _common(status)
    status.add_argument("-A", "--all-namespaces", action="store_true",
                        help="every namespace that holds a SecretInjection")
    who = commands.add_parser("who-can-use", help="pods that can use an injection or a Secret, "
                                                  "and who could go around keyhole")
    _common(who)
    who.add_argument("name", metavar="SECRET|INJECTION",
                     help="a SecretInjection or Secret name (or si/NAME, secret/NAME)")
    explain = commands.add_parser(
        "explain", help="why a pod does or does not get each key; what a federated "
                        "injection's trust rule must name",
        description="Why a pod does or does not get each key: for every injection of its "
                    "namespace (and the cluster injections that serve it), whether its labels "
                    "are selected, whether the sidecar holds the key, and what to change. For "
                    "an injection with spec.workloadIdentity: the issuer, keys, subject and "
                    "audience a provider's trust rule must name, and its last exchange.",
        epilog="examples:\n  kubectl keyhole explain pod agent-7d9f -n agents -o wide\n"
               "  kubectl keyhole explain si claude -n agents",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(explain)
    explain.add_argument("kind", choices=(*POD_KINDS, *INJECTION_KINDS, *CLUSTER_KINDS),
                         metavar="pod|si|clustersi",
                         help="a pod: why it does (not) get each key; an injection that "
                              "federates (spec.workloadIdentity): the issuer, keys, subject "
                              "and audience a provider's trust rule must name")
    explain.add_argument("pod", metavar="NAME", help="its name, in -n NAMESPACE (default: "
                                                     "the context's namespace)")
    waiting = commands.add_parser("approvals", help="requests held for a person's approval")
    _common(waiting)
    waiting.add_argument("-A", "--all-namespaces", action="store_true",
                         help="every namespace")
    waiting.add_argument("--all", action="store_true", dest="every",
                         help="decided and expired ones too")
    give = commands.add_parser(
        "grant", help="an injection for a pod, Deployment or StatefulSet, for a bounded time",
        description="The operator applies the injection's labels to the target and removes "
                    "them when the time is up (deleting the AccessGrant revokes at once).",
        epilog="example:\n  kubectl keyhole grant deployment/agent --injection stripe --for 2h "
               "--reason 'refunds backlog' -n agents",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(give)
    give.add_argument("target", metavar="KIND/NAME", help="pod/NAME, deployment/NAME or "
                                                          "statefulset/NAME")
    give.add_argument("--injection", required=True, help="the SecretInjection (or "
                                                         "ClusterSecretInjection) to grant")
    give.add_argument("--for", dest="length", required=True, metavar="DURATION",
                      help="how long: 30m, 2h (at most 168h)")
    give.add_argument("--reason", help="why, recorded with who granted it")
    for verb, what in (("approve", "let the held request through"),
                       ("deny", "refuse the held request")):
        decide = commands.add_parser(verb, help=what)
        _common(decide)
        decide.add_argument("name", metavar="NAME", help="the ApprovalRequest (kubectl keyhole "
                                                         "approvals lists them)")
        decide.add_argument("--reason", help="why, recorded with who decided")
        if verb == "approve":
            decide.add_argument("--for", dest="grant", metavar="DURATION",
                                help="a grant: the same request from the same pod passes "
                                     "this long without asking again (30m, 2h; at most "
                                     "168h)")
            decide.add_argument("--workload", action="store_true",
                                help="with --for: every pod of the asking pod's workload "
                                     "(its Deployment's ReplicaSet, StatefulSet, Job) too")
    return parser


POD_KINDS = ("pod", "po", "pods")
INJECTION_KINDS = ("si", "secretinjection", "secretinjections")
CLUSTER_KINDS = ("clustersi", "clustersecretinjection", "clustersecretinjections")


def table(rows: list[list[str]], headers: list[str]) -> str:
    """kubectl's layout: upper-case headers, columns three spaces apart."""
    cells = [headers, *rows]
    widths = [max(len(str(row[i])) for row in cells) for i in range(len(headers))]
    return "\n".join("   ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)
                                ).rstrip() for row in cells)


def _dash(values) -> str:
    return ",".join(values) if values else "<none>"


def _shown_name(item: dict) -> str:
    """A cluster injection is shown as kubectl names it, beside the namespace's own."""
    cluster = item.get("kind") == "ClusterSecretInjection"
    return f"clustersecretinjection/{item['name']}" if cluster else item["name"]


def render_status(answer: dict, wide: bool, all_namespaces: bool) -> str:
    headers = ["NAME", "HOSTS", "READY", "SELECTED", "WITH-KEY", "RESTART", "CAN-BYPASS"]
    rows = [[_shown_name(i), _dash(i["hosts"]), i["ready"], i["selectedPods"], i["withKey"],
             i["restartRequired"], len(i["canBypass"])] for i in answer["injections"]]
    if any(i.get("exchange") for i in answer["injections"]):  # some federate
        headers.append("LAST-EXCHANGE")
        for row, item in zip(rows, answer["injections"], strict=True):
            row.append(item.get("exchange") or "-")
    if wide:
        headers += ["SPENT-TODAY", "BUDGET-LEFT", "MESSAGE"]
        for row, item in zip(rows, answer["injections"], strict=True):
            row += [item["spentToday"] or "-", item["budgetLeft"] or "-",
                    item["readyMessage"] or ""]
    if all_namespaces:
        headers.insert(0, "NAMESPACE")
        for row, item in zip(rows, answer["injections"], strict=True):
            row.insert(0, item["namespace"])
    out = [table(rows, headers) if rows else "No SecretInjections found.", ""]
    spaces = [[s["namespace"], s["pods"], s["podsWithSidecar"],
               f"{s['ca']['ageDays']}d" if s["ca"] else "<none>",
               s["ca"]["expires"] if s["ca"] else "<none>"] for s in answer["namespaces"]]
    out.append(table(spaces, ["NAMESPACE", "PODS", "WITH-SIDECAR", "CA-AGE", "CA-EXPIRES"]))
    if answer["grants"]:
        grants = [[g["namespace"], g["name"], g["target"], g["injection"], g["grantedBy"],
                   f"{g['secondsLeft'] // 60}m{g['secondsLeft'] % 60}s"]
                  for g in answer["grants"]]
        out += ["", table(grants, ["NAMESPACE", "GRANT", "TARGET", "INJECTION", "GRANTED-BY",
                                   "LEFT"])]
    return "\n".join(out)


def render_who(answer: dict, wide: bool) -> str:
    target = answer["target"]
    headers = ["POD", "SERVICEACCOUNT", "INJECTION", "ACCESS"]
    rows = [[p["pod"], p["serviceAccount"], p["injection"], p["access"]]
            for p in answer["pods"]]
    if wide:
        headers += ["NODE", "WHY"]
        for row, pod in zip(rows, answer["pods"], strict=True):
            row += [pod["node"] or "<none>", pod["why"]]
    out = [f"{target['kind']} {target['name']} in namespace {answer['namespace']}:",
           table(rows, headers) if rows else "no pod is selected"]
    if answer["canBypass"]:
        out += ["", "could go around keyhole (the operator's report; remove these permissions):"]
        for item in answer["canBypass"]:
            out.append(f"  ServiceAccount {item['serviceAccount']} (pods "
                       f"{', '.join(item['pods'])}): {'; '.join(item['permissions'])}")
    return "\n".join(out)


def render_explain(answer: dict, wide: bool) -> str:
    sidecar = answer["sidecar"]
    out = [f"pod {answer['namespace']}/{answer['pod']} (ServiceAccount "
           f"{answer['serviceAccount']})"]
    if answer["optedOut"]:
        out.append('  opted out: keyhole.dev/inject: "false"')
    if sidecar["present"] and sidecar["ready"] is None:
        out.append("  sidecar: injected; the kubelet has not reported it yet (is the pod "
                   "scheduled?)")
    elif sidecar["present"]:
        out.append(f"  sidecar: ready={sidecar['ready']}, restarts={sidecar['restarts']}, "
                   f"state={sidecar['state']}")
        last = sidecar["lastTermination"]
        if last:
            out.append(f"  last exit: {last['exitCode']} {last['reason'] or ''}".rstrip())
            if last["message"]:
                out += [f"    {line}" for line in last["message"].splitlines()[-5:]]
    if sidecar["present"]:
        out.append(f"  mounted Secrets: {', '.join(answer['mountedSecrets']) or 'none'}")
    else:
        out.append("  sidecar: none (the webhook did not inject this pod)")
    rows = [[_shown_name({**i, "name": i["injection"]}), i["verdict"], i["why"]]
            for i in answer["injections"]]
    headers = ["INJECTION", "VERDICT", "WHY"]
    if wide:
        headers.insert(1, "HOSTS")
        for row, item in zip(rows, answer["injections"], strict=True):
            row.insert(1, _dash(item["hosts"]))
    out += ["", table(rows, headers) if rows else "no SecretInjection in this namespace"]
    return "\n".join(out)


def render_identity(answer: dict) -> str:
    shown = _shown_name({"kind": answer["kind"], "name": answer["name"]})
    out = [f"{shown} (namespace {answer['namespace']}): hosts {_dash(answer['hosts'])}"]
    if answer["provider"] is None:
        return "\n".join([*out, "  no spec.workloadIdentity: it injects a key, it does not "
                                 "federate"])
    out.append(f"  federates with {answer['provider']}; a trust rule there must name:")
    issuer = answer["issuer"] or "<not yet published: is the operator running?>"
    out += [f"    issuer     {issuer}",
            f"    discovery  {issuer}/.well-known/openid-configuration" if answer["issuer"]
            else "",
            f"    keys       {answer['jwksURI'] or '-'}",
            f"    subject    {answer['subject'] or '-'}",
            f"    audience   {answer['audience'] or '-'}",
            f"  identity: ServiceAccount {answer['serviceAccount'] or '-'} (only the operator "
            "mints its tokens)",
            f"  last exchange: {answer['lastExchange']}"]
    return "\n".join(line for line in out if line)


def render_approvals(rows: list[dict], wide: bool, all_namespaces: bool) -> str:
    if not rows:
        return "No requests wait for approval."
    headers = ["NAME", "AGE", "POD", "INJECTION", "WHAT", "STATE", "EXPIRES-IN"]
    cells = [[r["name"], r["age"], r["pod"], r["injection"], r["what"], r["state"],
              r["expiresIn"] or "-"] for r in rows]
    if wide:
        headers += ["DECIDED-BY", "ARGUMENTS"]
        for row, r in zip(cells, rows, strict=True):
            row += [r["decidedBy"] or "-", (r["arguments"] or "-")[:120]]
    if all_namespaces:
        headers.insert(0, "NAMESPACE")
        for row, r in zip(cells, rows, strict=True):
            row.insert(0, r["namespace"])
    return table(cells, headers)


def _approvals_command(args, api, namespace: str, all_namespaces: bool) -> int:
    import time

    from keyhole_kubectl import approvals, cluster

    if args.command == "grant":
        import secrets

        try:
            body = approvals.access_grant(args.target, args.injection, args.length,
                                          args.reason, secrets.token_hex(3))
        except approvals.BadDecision as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        with api:
            made = cluster.grant(api, namespace, body)
        stamped = (made.get("metadata") or {}).get("annotations") or {}
        print(f"accessgrant.keyhole.dev/{made['metadata']['name']} created: {args.target} may "
              f"use injection {args.injection} for {args.length} (granted by "
              f"{stamped.get('keyhole.dev/granted-by')})")
        return 0
    if args.command == "approvals":
        with api:
            items = cluster.approvals(api, None if all_namespaces else namespace)
        rows = approvals.listing(items, time.time(), args.every)
        _emit(rows, args.output,
              lambda: render_approvals(rows, args.output == "wide", all_namespaces))
        return 0
    try:
        body = approvals.decision("Approved" if args.command == "approve" else "Denied",
                                  getattr(args, "grant", None), args.reason,
                                  getattr(args, "workload", False))
    except approvals.BadDecision as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    with api:
        decided = cluster.decide(api, namespace, args.name, body)
    stamped = (decided.get("status") or {}).get("decision") or {}
    grant = f" for {args.grant}" if getattr(args, "grant", None) else ""
    print(f"approvalrequest.keyhole.dev/{args.name} {stamped.get('verdict', '').lower()}"
          f"{grant} (by {stamped.get('decidedBy')})")
    return 0


def _emit(answer: dict | list, output: str | None, render: Callable[[], str]) -> None:
    if output == "json":
        print(json.dumps(answer, indent=2))
    elif output == "yaml":
        print(yaml.safe_dump(answer, sort_keys=False), end="")
    else:
        print(render())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from keyhole_kubectl import cluster, report
    except ImportError as exc:  # the kubernetes client is the operator extra's
        print(f"kubectl-keyhole: {exc.name} is missing: pip install 'keyhole[operator]'",
              file=sys.stderr)
        return 1
    try:
        api, default_namespace = cluster.connect(args.kubeconfig, args.context)
        all_namespaces = getattr(args, "all_namespaces", False)
        namespace = None if all_namespaces else (args.namespace or default_namespace)
        if args.command in ("approvals", "approve", "deny", "grant"):
            return _approvals_command(args, api, namespace, all_namespaces)
        with api:
            spaces = cluster.read(api, namespace)
        wide = args.output == "wide"
        if args.command == "status":
            answer = report.status(spaces)
            _emit(answer, args.output, lambda: render_status(answer, wide, all_namespaces))
        elif args.command == "who-can-use":
            answer = report.who_can_use(spaces[0], args.name)
            _emit(answer, args.output, lambda: render_who(answer, wide))
        elif args.kind in POD_KINDS:
            answer = report.explain_pod(spaces[0], args.pod)
            _emit(answer, args.output, lambda: render_explain(answer, wide))
        else:
            answer = report.explain_identity(spaces[0], args.pod, args.kind in CLUSTER_KINDS)
            _emit(answer, args.output, lambda: render_identity(answer))
    except (cluster.ClusterError, report.NotFound) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
