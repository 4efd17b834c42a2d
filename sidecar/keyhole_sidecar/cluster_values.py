"""The Secret values of the pod's cluster injections: from the operator, in memory only.

A ClusterSecretInjection's Secrets live in keyhole's central namespace; nothing of them is
mounted into the pod. The operator sends their values over the channel (``/v1/values``) to
the pods they serve now, and this follower asks every ``every`` seconds, so a rotated Secret
is injected within about that long. What happens when it cannot ask:

- the operator refuses (the pod or its namespace is no longer served, the injection is gone):
  the values are dropped at once — a revoke;
- the operator does not answer (an outage): the last values keep serving for ``keep_for``
  seconds after the last answer, then they are dropped and the injection's requests are
  refused (503, saying why) until the operator answers again — fail closed.

A value is never written to disk, logged or put in an error; the reader cleans it exactly as
a mounted file is cleaned (``secrets.clean_value``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import time
from collections.abc import Callable

from keyhole_common.spec import SecretKeyRef
from keyhole_sidecar.operator_channel import ChannelRefused, OperatorChannel
from keyhole_sidecar.secrets import SecretMissing, clean_value
from keyhole_sidecar.usage.shared import ChannelUnavailable

log = logging.getLogger("keyhole.channel")


def parse_answer(answer: dict) -> tuple[dict[str, dict[str, bytes]], dict[str, dict[str, str]],
                                        dict[str, str]]:
    """(values, missing, refused) of a ``/v1/values`` answer; ValueError when malformed."""
    served, refused = answer.get("injections"), answer.get("refused") or {}
    if not isinstance(served, dict) or not isinstance(refused, dict):
        raise ValueError("the operator's values answer is not in the expected shape")
    values: dict[str, dict[str, bytes]] = {}
    missing: dict[str, dict[str, str]] = {}
    for name, entry in served.items():
        if not isinstance(entry, dict):
            raise ValueError(f"the operator's values for {name!r} are not in the expected shape")
        try:
            values[name] = {str(ref): base64.b64decode(raw, validate=True)
                            for ref, raw in (entry.get("values") or {}).items()}
        except (binascii.Error, TypeError, ValueError):
            raise ValueError(f"the operator's values for {name!r} are not base64") from None
        missing[name] = {str(ref): str(why) for ref, why in (entry.get("missing") or {}).items()}
    return values, missing, {str(k): str(v) for k, v in refused.items()}


class ClusterValues:
    """What the operator last sent, and the reader a cluster injection's route is built with."""

    def __init__(self, channel: OperatorChannel, every: float, keep_for: float,
                 clock: Callable[[], float] = time.monotonic):
        self.channel, self.every, self.keep_for, self.clock = channel, every, keep_for, clock
        self.wanted: Callable[[], bool] = lambda: True
        self._values: dict[str, dict[str, bytes]] = {}
        self._missing: dict[str, dict[str, str]] = {}
        self._refused: dict[str, str] = {}
        self._dropped: str | None = None  # why every value was dropped (the operator said no)
        self._answered: float | None = None
        self.generation = 0
        self.problem: str | None = None

    def expired(self) -> bool:
        return self._answered is not None and self.clock() - self._answered > self.keep_for

    def state(self) -> tuple[int, bool]:
        """Changes whenever what the readers return may change: for the reload's fingerprint
        (never the values themselves)."""
        return self.generation, self.expired()

    def reader(self, injection: str) -> Callable[..., str]:
        """``read(ref)`` for one cluster injection, raising SecretMissing (the injection's
        requests are refused, 503, with the summary) when its value cannot be used now."""

        def read(ref: SecretKeyRef, *, multiline: bool = False) -> str:
            where = f"ClusterSecretInjection {injection!r}"
            if self._dropped is not None:
                raise SecretMissing(f"{where}: {self._dropped}", self._dropped)
            if injection in self._refused:
                why = self._refused[injection]
                raise SecretMissing(f"{where}: the operator no longer serves it: {why}", why)
            if self._answered is None:
                why = ("the operator has not sent this cluster injection's values yet"
                       + (f" ({self.problem})" if self.problem else ""))
                raise SecretMissing(f"{where}: {why}", why)
            if self.expired():
                why = (f"the operator channel has not answered for over {self.keep_for:g} s "
                       f"(the last values are kept that long): {self.problem or 'no answer'}")
                raise SecretMissing(f"{where}: {why}", why)
            key = str(ref)
            raw = self._values.get(injection, {}).get(key)
            if raw is None:
                why = self._missing.get(injection, {}).get(key) or (
                    f"the operator sent no value for Secret {ref.name!r} key {ref.key!r}")
                raise SecretMissing(f"{where}: {why}", why)
            return clean_value(raw, f"{where}: Secret {ref.name!r} key {ref.key!r} (from the "
                                    "operator)", multiline=multiline)

        return read

    def _set(self, values, missing, refused, dropped: str | None) -> None:
        changed = (values, missing, refused, dropped) != (
            self._values, self._missing, self._refused, self._dropped)
        self._values, self._missing, self._refused, self._dropped = (
            values, missing, refused, dropped)
        self.generation += changed

    async def fetch(self) -> None:
        """Ask once; keep, replace or drop the values as the answer says."""
        try:
            values, missing, refused = parse_answer(await self.channel.values())
        except ChannelRefused as exc:
            self._answered = self.clock()
            self._report(str(exc))
            self._set({}, {}, {}, f"the operator refused to send values: {exc}")
            return
        except (ChannelUnavailable, ValueError) as exc:
            self._report(str(exc))  # kept until keep_for runs out (state() sees the expiry)
            return
        if self.problem is not None:
            log.info("cluster injection values: the operator answers again")
        self.problem = None
        self._answered = self.clock()
        self._set(values, missing, refused, None)

    def _report(self, problem: str) -> None:
        if problem != self.problem:
            log.warning("cluster injection values: %s", problem)
        self.problem = problem

    async def follow_forever(self) -> None:
        while True:
            if self.wanted():
                await self.fetch()
            elif self._values or self._answered is not None:
                self._answered = None
                self._set({}, {}, {}, None)
            await asyncio.sleep(self.every)
