"""The one count of a budget all pods of an injection share (``for: injection``): pure
arithmetic on the entry kept in the injection's ``status.ledger``.

Sidecars *lease* slices of the budget. Each sidecar process holds one lease per budget (a
random id it draws at start) and, every time it calls, reports what it has counted in the
window so far and asks for room. The operator records the report and grants a slice: the
lease may count up to ``allowance`` (what it reported plus the slice) until the slice
expires. What a lease holds stays committed until the lease reports again, so:

- the slices granted never add up to more than the budget: ``committed`` (what every lease
  reported, plus what each still holds, plus what ended leases held) never passes ``limit``
  through a grant;
- a sidecar killed mid-lease leaves its slice counted as spent (it may have spent all of
  it): its pod's next sidecar draws a new lease id and the old lease is *retired*, holding
  and all — so a crash can only waste budget, never create it;
- reports are cumulative, so a report sent twice (an answer lost on the way) counts once.

Overshoot: a sidecar admits a request while its lease has room, and settles answers at the
figures the API reported, so each request in flight when the budget runs out may pass it by
what it uses beyond its reservation — the bound a per-pod budget has, summed over the pods.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass

from keyhole_common.channel import USAGE, Grant, Report, window
from keyhole_common.spec.model import Budget

LEASE_SECONDS = 120.0
"""How long a slice is good without the sidecar hearing from the operator: the time the
operator may be away before sidecars stop admitting on this budget."""
MAX_LEASES = 500
"""Leases kept in one entry; beyond, the longest expired are retired (counted, not listed)."""


@dataclass(frozen=True, slots=True)
class Holder:
    """Who asks: the pod the token is bound to, and the lease its sidecar drew."""

    pod: str
    uid: str
    lease: str


def window_start(now: float, per: str) -> float:
    """The UTC hour, day or month holding ``now``: its start, in epoch seconds."""
    return window(now, per)[0]


def _iso(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _epoch(iso: str) -> float:
    return dt.datetime.strptime(iso, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC).timestamp()


def _used(lease: dict, unit: str) -> float:
    return float(lease["usd"]) if unit == "USD" else float(lease["tokens"])


def _retire(entry: dict, lease: dict) -> None:
    """An ended lease: what it counted, and all it held (it may have spent it), stay spent."""
    retired = entry["retired"]
    retired["tokens"] += int(lease["tokens"])
    retired["usd"] = round(retired["usd"] + float(lease["usd"]), 9)
    retired["used"] = round(retired["used"] + _used(lease, entry["unit"])
                            + float(lease["held"]), 9)


def _summarise(entry: dict) -> dict:
    leases = entry["leases"]
    unit = entry["unit"]
    entry["spent"] = round(entry["retired"]["used"] + sum(_used(x, unit) for x in leases), 9)
    entry["held"] = round(sum(float(x["held"]) for x in leases), 9)
    entry["tokens"] = entry["retired"]["tokens"] + sum(int(x["tokens"]) for x in leases)
    entry["usd"] = round(entry["retired"]["usd"] + sum(float(x["usd"]) for x in leases), 9)
    limit = entry.get("limit")  # a merge patch drops a null: the meter has none
    entry["left"] = None if limit is None else round(max(limit - entry["spent"]
                                                         - entry["held"], 0.0), 9)
    return entry


def fresh(name: str, budget: Budget | None, start: float) -> dict:
    """An empty entry for the window starting at ``start``."""
    limit = None if budget is None else float(budget.tokens if budget.tokens is not None
                                              else budget.spend or 0.0)
    unit = "USD" if budget is not None and budget.spend is not None else "tokens"
    return _summarise({"name": name, "window": _iso(start), "limit": limit, "unit": unit,
                       "leases": [], "retired": {"tokens": 0, "usd": 0.0, "used": 0.0}})


def settle(entry: dict | None, name: str, budget: Budget | None, holder: Holder,
           report: Report, now: float, lease_seconds: float = LEASE_SECONDS
           ) -> tuple[dict, Grant]:
    """Record ``report`` of ``holder``'s lease and grant it a slice: the new entry and the
    grant. ``budget`` None is the usage meter (no limit: nothing to grant)."""
    per = budget.per if budget is not None else "day"
    start = window_start(now, per)
    if entry is None or entry.get("window") != _iso(start):
        entry = fresh(name, budget, start)
    else:
        entry = {**entry, "leases": [dict(x) for x in entry.get("leases") or []],
                 "retired": {"tokens": 0, "usd": 0.0, "used": 0.0,
                             **(entry.get("retired") or {})}}
        if budget is not None:  # the figure may have been edited: the new one counts
            entry["limit"] = fresh(name, budget, start)["limit"]
    leases = entry["leases"]
    mine = None
    for lease in list(leases):
        if lease["uid"] == holder.uid and lease["lease"] != holder.lease:
            _retire(entry, lease)  # the pod's sidecar restarted: its old lease ended
            leases.remove(lease)
        elif lease["uid"] == holder.uid:
            mine = lease
    if mine is None:
        mine = {"pod": holder.pod, "uid": holder.uid, "lease": holder.lease, "tokens": 0,
                "usd": 0.0, "held": 0.0, "expires": _iso(now)}
        leases.append(mine)
    if report.window == start:  # a report of an ended window counts nothing in this one
        mine["tokens"] = max(int(mine["tokens"]), report.tokens)
        mine["usd"] = round(max(float(mine["usd"]), report.usd), 9)
    mine["held"] = 0.0
    if len(leases) > MAX_LEASES:
        for lease in sorted((x for x in leases if x is not mine),
                            key=lambda x: x["expires"])[:len(leases) - MAX_LEASES]:
            _retire(entry, lease)
            leases.remove(lease)
    _summarise(entry)
    granted = 0.0
    if entry.get("limit") is not None:
        room = entry["left"]
        want = max(report.want, 0.0)
        granted = min(want, room)
        if entry["unit"] == "tokens":
            granted = float(math.floor(granted))
        mine["held"] = round(granted, 9)
        _summarise(entry)
    mine["expires"] = _iso(now + lease_seconds)
    allowance = _used(mine, entry["unit"]) + granted
    return entry, Grant(name, start, round(allowance, 9), granted, entry.get("left"),
                        lease_seconds)


def usage_summary(entries: list[dict]) -> dict:
    """``status.usage``: what ``kubectl get si`` shows — spent today and the tightest shared
    budget's room. Every key is present (None when there is nothing to say): the status is
    written as a merge patch, where an absent key would keep an old value."""
    summary: dict = {"day": None, "spentToday": None, "budgetLeft": None}
    meter = next((e for e in entries if e["name"] == USAGE), None)
    if meter is not None:
        summary["day"] = meter["window"][:10]
        summary["spentToday"] = f"{meter['tokens']} tokens, ${meter['usd']:.4f}"
    budgets = [e for e in entries if e["name"] != USAGE and e.get("limit")
               and e.get("left") is not None]
    if budgets:
        tightest = min(budgets, key=lambda e: e["left"] / e["limit"])
        left = (f"${tightest['left']:.4f}" if tightest["unit"] == "USD"
                else f"{int(tightest['left'])} tokens")
        summary["budgetLeft"] = f"{left} ({tightest['name']})"
    return summary

