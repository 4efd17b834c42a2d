"""Telling someone that a request waits for approval: a JSON POST to a webhook (the chart's
``approvals.notify``), in keyhole's own shape or Slack's incoming-webhook shape.

Sent from a thread of its own, retried with backoff, never in the way of the channel call
that created the ApprovalRequest: a receiver that is slow or down delays no decision. What is
sent is what a person reads on the object (redacted arguments, no value).
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import urllib.error
import urllib.request

log = logging.getLogger("keyhole.operator.notify")

FORMATS = ("json", "slack")
BACKOFF = (1.0, 2.0, 4.0, 8.0, 16.0)
"""Seconds before each retry: five, then the notification is dropped (and said in the log)."""
QUEUE = 1000


def payload(obj: dict, what: str, form: str) -> dict:
    """The body of one notification about the ApprovalRequest ``obj``."""
    meta, spec = obj.get("metadata") or {}, obj.get("spec") or {}
    name, namespace = meta.get("name"), meta.get("namespace")
    approve = f"kubectl keyhole approve {name} -n {namespace}"
    deny = f"kubectl keyhole deny {name} -n {namespace}"
    pod = spec.get("pod") or {}
    if form == "slack":
        lines = [f"*keyhole:* pod `{namespace}/{pod.get('name')}` waits for approval: {what}",
                 f"expires {spec.get('expiresAt')}"]
        if spec.get("arguments"):
            lines.append(f"```{spec['arguments'][:1500]}```")
        lines.append(f"approve: `{approve}` (add `--for 30m` for a grant)  deny: `{deny}`")
        text = "\n".join(lines)
        return {"text": text, "blocks": [{"type": "section",
                                          "text": {"type": "mrkdwn", "text": text}}]}
    return {"kind": "ApprovalRequested", "namespace": namespace, "name": name,
            "pod": pod.get("name"), "serviceAccount": pod.get("serviceAccount"),
            "injection": spec.get("injection"), "what": what,
            "arguments": spec.get("arguments"), "requestedAt": spec.get("requestedAt"),
            "expiresAt": spec.get("expiresAt"), "approve": approve, "deny": deny}


class Notifier:
    """Posts each notification to ``url`` from one background thread."""

    def __init__(self, url: str, form: str = "json", backoff: tuple[float, ...] = BACKOFF,
                 timeout: float = 5.0):
        if not url.startswith(("https://", "http://")):
            raise ValueError(f"the approvals notification URL must be http:// or https://, "
                             f"not {url.split(':', 1)[0]!r}")
        self.url, self.form, self.backoff, self.timeout = url, form, backoff, timeout
        self._queue: queue.Queue[dict] = queue.Queue(QUEUE)
        threading.Thread(target=self._run, name="approval-notify", daemon=True).start()

    def approval_requested(self, obj: dict, what: str) -> None:
        try:
            self._queue.put_nowait(payload(obj, what, self.form))
        except queue.Full:
            log.warning("approval notifications: %d wait to be sent; dropping the one for %s",
                        QUEUE, (obj.get("metadata") or {}).get("name"))

    def _run(self) -> None:
        while True:
            self._send(self._queue.get())

    def _send(self, body: dict) -> None:
        data = json.dumps(body).encode()
        for attempt, pause in enumerate((0.0, *self.backoff)):
            time.sleep(pause)
            # S310: the scheme was checked in __init__ (http or https, never file:).
            request = urllib.request.Request(self.url, data=data, method="POST",  # noqa: S310
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as answer:  # noqa: S310
                    if answer.status < 300:
                        return
                    why = f"HTTP {answer.status}"
            except urllib.error.HTTPError as exc:
                exc.close()
                why = f"HTTP {exc.code}"
            except (OSError, ValueError) as exc:
                why = type(exc).__name__
            log.info("approval notification: attempt %d failed (%s)", attempt + 1, why)
        log.warning("approval notification for %s not delivered after %d attempts",
                    body.get("name") or "an ApprovalRequest", len(self.backoff) + 1)
