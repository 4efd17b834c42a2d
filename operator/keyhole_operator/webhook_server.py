"""kopf's webhook server, with the AdmissionReview's shape checked first.

kopf answers a malformed review with a 500 from deep inside its resource lookup; this server
answers 400 naming what is missing, before kopf sees the body. For ``CONNECT`` reviews
(``kubectl exec``, ``attach``, ``port-forward``) the object is the connect options, which name
no pod: the review's name and namespace are put into the options' metadata, so the handler
sees which pod is meant.
"""

from __future__ import annotations

import json

import aiohttp.web
import kopf

REQUIRED = ("uid", "operation", "resource", "userInfo")


def review_problem(body: object) -> str | None:
    """What is wrong with an AdmissionReview body, or None when kopf can take it."""
    if not isinstance(body, dict):
        return "the body is not a JSON object"
    request = body.get("request")
    if not isinstance(request, dict):
        return "no 'request' object"
    missing = [k for k in REQUIRED if k not in request]
    if missing:
        return f"'request' lacks {', '.join(missing)}"
    resource = request["resource"]
    if not isinstance(resource, dict) or not {"group", "version", "resource"} <= resource.keys():
        return "'request.resource' needs group, version and resource"
    objects = [request.get("object"), request.get("oldObject")]
    if not any(isinstance(o, dict) for o in objects):
        return "'request.object' or 'request.oldObject' must be an object"
    return None


def with_connect_target(body: dict) -> dict:
    """A CONNECT review's options, given the pod's name and namespace as their metadata."""
    request = body["request"]
    if request.get("operation") == "CONNECT" and isinstance(request.get("object"), dict):
        request["object"]["metadata"] = {"name": request.get("name"),
                                         "namespace": request.get("namespace")}
    return body


class ReviewCheckingWebhookServer(kopf.WebhookServer):
    @staticmethod
    async def _serve(fn, request: aiohttp.web.Request) -> aiohttp.web.Response:
        try:
            body = json.loads(await request.read())
        except ValueError:
            body = None
        problem = review_problem(body)
        if problem:
            return aiohttp.web.json_response(
                {"error": f"not an AdmissionReview: {problem}"}, status=400)
        # kopf's WebhookFn protocol, as its own server calls it.
        transport = request.transport
        try:
            answer = await fn(with_connect_target(body), webhook=request.match_info.get("id"),
                              headers=dict(request.headers),
                              sslpeer=transport.get_extra_info("peercert") if transport else None)
        except Exception as exc:  # kopf's errors about the review itself (none are exported)
            return aiohttp.web.json_response(
                {"error": f"cannot review this request: {type(exc).__name__}"}, status=400)
        return aiohttp.web.json_response(answer)
