"""The operator channel's vocabulary, written once for both ends: the sidecar that calls it
(``keyhole_sidecar.operator_channel``, ``usage.shared``) and the operator that answers
(``keyhole_operator.channel``, ``ledger``). The paths, the budget windows, and the bodies of
a lease call; DESIGN.md, *The operator channel*, says what each means."""

from __future__ import annotations

import base64
import datetime as dt
import json
import math
from dataclasses import dataclass

LEASES_PATH = "/v1/leases"
ROUTES_PATH = "/v1/routes"
VALUES_PATH = "/v1/values"
IDENTITY_PATH = "/v1/identity"
"""A federated injection's subject token: ``{"injection"}`` → ``{"token", "expiresIn",
"subject"}`` (the audience is the injection's, as the API server has it now)."""
EXCHANGES_PATH = "/v1/identity/exchanges"
"""What a sidecar's last exchange gave: ``{"injection", "expiresAt", "error"}`` → ``{}``."""
USAGE = "usage/day"
"""The meter of what an injection's pods spent today: a ledger entry with no limit."""


def unverified_claims(token: str) -> dict:
    """A JWT's claims, read and **not** verified — the tokens the channel carries are checked
    by whoever accepts them (the API server, a provider); this only tells how long one lives
    or whom it names. {} when it is not a JWT."""
    try:
        payload = token.split(".")[1]
        found = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def window(now: float, per: str) -> tuple[float, float]:
    """The UTC hour, day or calendar month holding ``now``: (start, end) in epoch seconds."""
    moment = dt.datetime.fromtimestamp(now, dt.UTC)
    if per == "hour":
        start = moment.replace(minute=0, second=0, microsecond=0)
        end = start + dt.timedelta(hours=1)
    elif per == "day":
        start = moment.replace(hour=0, minute=0, second=0, microsecond=0)
        end = start + dt.timedelta(days=1)
    else:
        start = moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        end = (start + dt.timedelta(days=32)).replace(day=1)
    return start.timestamp(), end.timestamp()


@dataclass(frozen=True, slots=True)
class Report:
    """What a sidecar says of one budget: counted so far in ``window`` (its start, epoch
    seconds) by this lease, and the room it asks for (tokens, or USD for spend)."""

    name: str
    window: float
    tokens: int
    usd: float
    want: float

    def as_json(self) -> dict:
        return {"name": self.name, "window": self.window, "tokens": self.tokens,
                "usd": round(self.usd, 9), "want": self.want}

    @classmethod
    def from_json(cls, entry: object) -> Report:
        """ValueError when a field is missing, of the wrong type, negative or not finite."""
        try:
            report = cls(str(entry["name"]), float(entry["window"]), int(entry["tokens"]),
                         float(entry["usd"]), float(entry["want"]))
        except (TypeError, KeyError, ValueError):
            raise ValueError("each report needs name, window, tokens, usd and want") from None
        if not all(math.isfinite(x) and x >= 0 for x in (report.window, report.tokens,
                                                          report.usd, report.want)):
            raise ValueError(f"report {report.name!r}: figures must be finite, 0 or more")
        return report


def lease_body(injection: str, lease: str, reports: list[Report]) -> dict:
    """A ``POST /v1/leases`` body: one call for all of an injection's shared budgets."""
    return {"injection": injection, "lease": lease, "budgets": [r.as_json() for r in reports]}


@dataclass(frozen=True, slots=True)
class Grant:
    """The operator's answer for one budget: the lease may count up to ``allowance``
    (cumulative in the window) until the slice expires ``expires_in`` seconds on."""

    name: str
    window: float
    allowance: float
    granted: float
    left: float | None
    expires_in: float

    def as_json(self) -> dict:
        return {"name": self.name, "window": self.window, "allowance": self.allowance,
                "granted": self.granted, "left": self.left, "expiresIn": self.expires_in}

    @classmethod
    def from_json(cls, entry: object) -> Grant:
        """ValueError when the operator's answer is not a grant."""
        try:
            left = entry.get("left")
            return cls(str(entry["name"]), float(entry["window"]), float(entry["allowance"]),
                       float(entry.get("granted", 0.0)), None if left is None else float(left),
                       float(entry["expiresIn"]))
        except (AttributeError, TypeError, KeyError, ValueError):
            raise ValueError("a grant needs name, window, allowance and expiresIn") from None
