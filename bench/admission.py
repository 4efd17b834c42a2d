"""What the pod webhook costs pod creation: latency at a steady rate, and reviews per pod.

    .venv/bin/python -m bench.admission                      # 1,000 pods at 20 creates/s
    .venv/bin/python -m bench.admission --pods 200 --rate 10  # quicker

A real kube-apiserver (the test control plane, built once and cached) and the real operator
process with the chart's RBAC, the chart's pod webhook settings (reinvocationPolicy
IfNeeded, the keyhole.dev label match condition) and the chart's resync period (the cluster
tests run the operator with a 2 s one, which reconciles fifteen times as often). Half the
pods are tagged for an injection, half not (the match condition keeps the API server from
calling keyhole for those). After ``--warmup`` untimed pods (the first review after a start
is reported on its own, as ``first_pod_ms``), each ``create`` is timed at the client, so a
figure is the whole admission path as a user waits for it; the operator's own counter says
how many reviews it answered per tagged pod. No kubelet runs: pods stay Pending, which
admission does not care about.
"""

from __future__ import annotations

import argparse
import json
import secrets
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import yaml

RESULTS = Path(__file__).resolve().parent / "results"


def _reviews(metrics_port: int) -> float:
    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text
    sample = 'keyhole_operator_admissions_total{result="injected",webhook="keyhole-inject"}'
    return sum(float(line.rpartition(" ")[2]) for line in text.splitlines()
               if line.startswith(sample))


def _charts_pod_webhook(kube) -> None:
    """The kopf-managed configuration, given the chart's settings for the pod webhook."""
    config = kube.get("mutatingwebhookconfiguration", "keyhole.dev", None)
    index = next(i for i, hook in enumerate(config["webhooks"])
                 if hook["name"].startswith("keyhole-inject"))
    condition = [{"name": "tagged-for-keyhole", "expression":
                  "has(object.metadata.labels) && "
                  "object.metadata.labels.exists(k, k.startsWith('keyhole.dev/'))"}]
    kube.kubectl("patch", "mutatingwebhookconfiguration", "keyhole.dev", "--type", "json", "-p",
                 json.dumps([
                     {"op": "add", "path": f"/webhooks/{index}/reinvocationPolicy",
                      "value": "IfNeeded"},
                     {"op": "add", "path": f"/webhooks/{index}/matchConditions",
                      "value": condition},
                     {"op": "add", "path": f"/webhooks/{index}/timeoutSeconds", "value": 5}]))


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench.admission", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pods", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=20.0, help="creates per second")
    parser.add_argument("--label", default="", help="a name for this run in the results file")
    parser.add_argument("--warmup", type=int, default=20,
                        help="pods created untimed first, one at a time")
    parser.add_argument("--resync-seconds", type=float, default=None,
                        help="the operator's resync period (default: the chart's)")
    args = parser.parse_args()

    import kubernetes

    from keyhole_operator.webhook_tls import self_signed
    from tests.chart.helm import CHART, helm
    from tests.cluster.conftest import ROOT, start_operator
    from tests.cluster.controlplane import ControlPlane, bin_dir, build
    from tests.cluster.kube import Kube, kubectl_binary
    from tests.cluster.test_operator import apply_injections, openai_injection, pod

    with tempfile.TemporaryDirectory(prefix="keyhole-admission-") as folder:
        root = Path(folder)
        plane = ControlPlane(root / "plane")
        plane.start(build())
        operator = None
        try:
            kube = Kube(plane.kubeconfig, kubectl_binary(bin_dir()))
            for kind in ("secretinjection", "clustersecretinjection", "approvalrequest",
                         "accessgrant"):
                kube.kubectl("apply", "-f", str(ROOT / "crds" / f"{kind}.yaml"))
                kube.wait_established(f"{kind}s.keyhole.dev")
            kube.kubectl("create", "namespace", "keyhole-system")
            kube.apply(helm("template", "keyhole", str(CHART), "--namespace", "keyhole-system",
                            "--show-only", "templates/rbac.yaml").stdout)
            kube.kubectl("apply", "-f", str(ROOT / "tests" / "cluster" / "manifests" /
                                            "manage-webhooks.yaml"))
            cert = self_signed(root / "tls", ["127.0.0.1"])
            resync = args.resync_seconds or yaml.safe_load(
                (CHART / "values.yaml").read_text())["operator"]["resyncSeconds"]
            operator = start_operator(kube, root / "operator", "--resync-seconds", str(resync),
                                      cert=cert, channel=True)
            _charts_pod_webhook(kube)
            namespace = "agents"
            kube.kubectl("create", "namespace", namespace)
            kube.kubectl("create", "serviceaccount", "default", "-n", namespace)
            apply_injections(kube, namespace, openai_injection())
            api = kubernetes.client.CoreV1Api(
                kubernetes.config.new_client_from_config(str(plane.kubeconfig)))
            run = secrets.token_hex(2)

            def create(number: int) -> tuple[bool, float]:
                tagged = number % 2 == 0
                body = pod(f"agent-{run}-{number}", {"keyhole.dev/openai": "true"} if tagged
                           else {"app": "agent"})
                started = time.perf_counter()
                api.create_namespaced_pod(namespace, body)
                return tagged, (time.perf_counter() - started) * 1000

            # Untimed first pods: the API server's first connection to the webhook, the
            # operator's first reads. What a steady rate costs is the figure; a cold start
            # is one pod's, once.
            warmup = [create(-2 - number) for number in range(args.warmup)]  # a tagged one first
            before = _reviews(operator.metrics_port)
            results: list[tuple[bool, float]] = []
            lock = threading.Lock()
            started = time.perf_counter()
            with ThreadPoolExecutor(max_workers=32) as pool:
                futures = []
                for number in range(args.pods):  # a steady rate, whatever each create takes
                    delay = started + number / args.rate - time.perf_counter()
                    if delay > 0:
                        time.sleep(delay)
                    futures.append(pool.submit(create, number))
                for future in futures:
                    with lock:
                        results.append(future.result())
            elapsed = time.perf_counter() - started
            reviews = _reviews(operator.metrics_port) - before
        finally:
            if operator is not None:
                operator.stop()
            plane.stop()

    def figures(times: list[float]) -> dict:
        times = sorted(times)
        return {"p50_ms": round(statistics.median(times), 1),
                "p99_ms": round(times[int(0.99 * (len(times) - 1))], 1),
                "max_ms": round(times[-1], 1)}

    tagged = [t for is_tagged, t in results if is_tagged]
    untagged = [t for is_tagged, t in results if not is_tagged]
    summary = {"label": args.label, "pods": args.pods, "rate": args.rate, "resync_s": resync,
               "achieved_rate": round(args.pods / elapsed, 1),
               "tagged": figures(tagged), "untagged": figures(untagged),
               "reviews_per_tagged_pod": round(reviews / len(tagged), 2),
               "first_pod_ms": round(warmup[0][1], 1) if warmup else None}
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "admission.json"
    runs = json.loads(out.read_text()) if out.exists() else []
    runs.append(summary)
    out.write_text(json.dumps(runs, indent=1) + "\n")
    json.dump(summary, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
