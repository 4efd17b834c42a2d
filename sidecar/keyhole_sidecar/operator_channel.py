"""The sidecar's end of the operator channel (DESIGN.md): HTTPS to the operator, trusting the
channel's CA, authenticated with the pod-bound ServiceAccount token the kubelet keeps fresh.

Three things travel on it: slices of the budgets an injection's pods share (decided in
``usage.shared``), the pod's signed routes as the API server has them now
(``OperatorRoutes``), so that a revocation reaches the sidecar in seconds instead of at the
kubelet's next sync of the routes file (about a minute with its default settings), and the
Secret values of the pod's cluster injections (``cluster_values``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp

from keyhole_common.approvals import ACCESS_PATH, APPROVALS_PATH, MAX_WAIT, WITHDRAW_PATH
from keyhole_common.channel import (
    EXCHANGES_PATH,
    IDENTITY_PATH,
    LEASES_PATH,
    ROUTES_PATH,
    VALUES_PATH,
)
from keyhole_sidecar.usage.shared import CALL_TIMEOUT, ChannelUnavailable

log = logging.getLogger("keyhole.channel")


class ChannelRefused(ChannelUnavailable):
    """The operator answered and said no (401, 403, 404): not an outage, a decision."""

    status = 403


class ChannelBusy(ChannelRefused):
    """The operator answered 429: the pod asks too much at once (approvals waiting)."""


class OperatorChannel:
    """The wire to the operator channel: HTTPS, trusting the channel's CA, authenticated with
    the pod-bound token the kubelet keeps fresh in ``token_file``."""

    def __init__(self, url: str, ca_file: Path, token_file: Path,
                 on_answer: Callable[[str, bool], None] | None = None, limit: int = 4):
        self.base, self.limit = url.rstrip("/"), limit
        self.ca_file, self.token_file = ca_file, token_file
        self.on_answer = on_answer or (lambda call, ok: None)  # (call, answered 200), metrics
        self._session: aiohttp.ClientSession | None = None
        self._reports: set[asyncio.Task] = set()

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            try:
                context = ssl.create_default_context(cafile=str(self.ca_file))
            except (OSError, ssl.SSLError):
                raise ChannelUnavailable(
                    f"the operator channel's CA ({self.ca_file}) is not readable yet: the "
                    "operator writes it into the namespace's keyhole-ca-bundle") from None
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=context, limit=self.limit), trust_env=False,
                timeout=aiohttp.ClientTimeout(total=CALL_TIMEOUT))
        return self._session

    async def _post(self, path: str, body: dict | None, timeout: float | None = None) -> dict:
        try:
            token = self.token_file.read_text().strip()
        except OSError as exc:
            raise ChannelUnavailable(f"cannot read the pod's channel token {self.token_file} "
                                     f"({exc.strerror})") from None
        url = self.base + path
        try:
            limit = {} if timeout is None else {"timeout": aiohttp.ClientTimeout(total=timeout)}
            async with self._client().post(
                    url, json=body, headers={"Authorization": f"Bearer {token}"},
                    **limit) as resp:
                answer = await resp.json(content_type=None)
                if resp.status != 200:
                    kind = ChannelBusy if resp.status == 429 else ChannelRefused \
                        if resp.status in (401, 403, 404) else ChannelUnavailable
                    refused = kind(f"the operator refused ({resp.status}): "
                                   f"{str((answer or {}).get('error'))[:300]}")
                    refused.status = resp.status
                    raise refused
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            await self.close()  # the next call dials afresh, with the CA file as it is then
            raise ChannelUnavailable(f"the operator channel {url} did not answer "
                                     f"({type(exc).__name__})") from None
        if not isinstance(answer, dict):
            raise ChannelUnavailable(f"the operator channel {url} answered no JSON object")
        return answer

    async def _call(self, path: str, body: dict | None, timeout: float | None = None) -> dict:
        call = path.split("/", 2)[-1].replace("/", "_")  # leases, routes, values, approvals...
        try:
            answer = await self._post(path, body, timeout)
        except ChannelUnavailable:
            self.on_answer(call, False)
            raise
        self.on_answer(call, True)
        return answer

    async def lease(self, body: dict) -> list[dict]:
        return list((await self._call(LEASES_PATH, body)).get("budgets") or [])

    async def routes(self) -> str:
        routes = (await self._call(ROUTES_PATH, None)).get("routes")
        if not isinstance(routes, str):
            raise ChannelUnavailable("the operator channel answered no routes")
        return routes

    async def values(self) -> dict:
        return await self._call(VALUES_PATH, None)

    async def approval(self, body: dict) -> dict:
        """Ask for (or wait on) an approval: the operator answers within ``body['wait']``."""
        return await self._call(APPROVALS_PATH, body, timeout=MAX_WAIT + CALL_TIMEOUT)

    async def withdraw(self, body: dict) -> dict:
        return await self._call(WITHDRAW_PATH, body)

    async def access(self, body: dict) -> dict:
        return await self._call(ACCESS_PATH, body)

    async def identity(self, body: dict) -> dict:
        return await self._call(IDENTITY_PATH, body)

    def report_exchange(self, body: dict) -> None:
        """Tell the operator how an exchange went (it shows it in the injection's status), in
        the background: the request that caused the exchange never waits for this."""
        task = asyncio.ensure_future(self._report(body))
        self._reports.add(task)
        task.add_done_callback(self._reports.discard)

    async def reported(self) -> None:
        """Wait for the reports under way (at shutdown, before the session closes)."""
        if self._reports:
            await asyncio.gather(*self._reports, return_exceptions=True)

    async def _report(self, body: dict) -> None:
        try:
            await self._call(EXCHANGES_PATH, body)
        except ChannelUnavailable as exc:
            log.info("could not report an exchange to the operator: %s", exc)

    async def close(self) -> None:
        """Close the session, forgetting it first: a call made while it closes dials a new
        one, where it would have been handed the closing session and failed with
        ``RuntimeError('Session is closed')`` — which ended the routes or values follower
        that made it, so a pod stayed revoked after the operator came back."""
        session, self._session = self._session, None
        if session is not None:
            await session.close()


class OperatorRoutes:
    """The pod's signed routes from the operator, polled every ``every`` seconds.

    A document is taken only when its signature checks (``verify`` raises otherwise): the
    channel carries what the operator signed, nothing else. Which serves, this or the routes
    file (the same annotation as the kubelet last delivered it), is ``config.newest_routes``:
    the newer of the two."""

    def __init__(self, channel: OperatorChannel, every: float,
                 verify: Callable[[dict], None], clock: Callable[[], float] = time.monotonic):
        self.channel, self.every, self.verify, self.clock = channel, every, verify, clock
        self.document: dict | None = None
        self.fetched = 0.0
        self.problem: str | None = None

    def current(self) -> tuple[dict, float] | None:
        """The last signed routes the operator sent, and when (``clock`` time)."""
        return None if self.document is None else (self.document, self.fetched)

    async def fetch(self) -> None:
        try:
            document = json.loads(await self.channel.routes())
            self.verify(document)
        except (ChannelUnavailable, ValueError) as exc:  # SignatureError is a ValueError
            problem = str(exc)
            if problem != self.problem:
                log.warning("routes from the operator channel: %s; the last routes it sent "
                            "serve until the routes file changes", problem)
            self.problem = problem
            return
        if self.problem is not None:
            log.info("routes from the operator channel: answering again")
        self.problem = None
        self.document, self.fetched = document, self.clock()

    async def follow_forever(self) -> None:
        while True:
            await self.fetch()
            await asyncio.sleep(self.every)
