"""What tokens cost: the table keyhole ships, and each injection's own ``spec.llm.prices``.

USD per million tokens. A model matches the first pattern that fits it — the injection's
prices first, then this table, whose specific names come before their families. A model that
matches nothing has no price: it is counted in tokens and flagged as unpriced, never free.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable

from keyhole_common.spec.model import Price
from keyhole_sidecar.usage.meter import Usage

CHECKED = "2025-08-31"
"""When the table was last compared with the providers' published price pages (standard,
non-batch prices; prompts under the long-context thresholds). Prices change: override or
extend them per injection with ``spec.llm.prices``; docs/budgets.md says how to update this."""

SHIPPED: tuple[Price, ...] = (
    # OpenAI
    Price("gpt-5-nano*", 0.05, 0.40, 0.005),
    Price("gpt-5-mini*", 0.25, 2.00, 0.025),
    Price("gpt-5*", 1.25, 10.00, 0.125),
    Price("gpt-4.1-nano*", 0.10, 0.40, 0.025),
    Price("gpt-4.1-mini*", 0.40, 1.60, 0.10),
    Price("gpt-4.1*", 2.00, 8.00, 0.50),
    Price("gpt-4o-mini*", 0.15, 0.60, 0.075),
    Price("gpt-4o*", 2.50, 10.00, 1.25),
    Price("o4-mini*", 1.10, 4.40, 0.275),
    Price("o3-mini*", 1.10, 4.40, 0.55),
    Price("o3*", 2.00, 8.00, 0.50),
    Price("o1*", 15.00, 60.00, 7.50),
    Price("text-embedding-3-small*", 0.02, 0.0),
    Price("text-embedding-3-large*", 0.13, 0.0),
    # Anthropic (cache writes: 5-minute cache, 1.25 times input)
    Price("claude-opus-4*", 15.00, 75.00, 1.50, 18.75),
    Price("claude-sonnet-4*", 3.00, 15.00, 0.30, 3.75),
    Price("claude-3-7-sonnet*", 3.00, 15.00, 0.30, 3.75),
    Price("claude-haiku-4*", 1.00, 5.00, 0.10, 1.25),
    Price("claude-3-5-haiku*", 0.80, 4.00, 0.08, 1.00),
    # Google Gemini
    Price("gemini-2.5-pro*", 1.25, 10.00, 0.31),
    Price("gemini-2.5-flash-lite*", 0.10, 0.40, 0.025),
    Price("gemini-2.5-flash*", 0.30, 2.50, 0.075),
    Price("gemini-2.0-flash-lite*", 0.075, 0.30),
    Price("gemini-2.0-flash*", 0.10, 0.40, 0.025),
)


def price_of(model: str | None, own: Iterable[Price]) -> Price | None:
    """The price of ``model``: the injection's own first, then the shipped table."""
    if not model:
        return None
    name = model.lower()
    for price in (*own, *SHIPPED):
        if fnmatch.fnmatchcase(name, price.model.lower()):
            return price
    return None


def cost(usage: Usage, price: Price | None) -> float | None:
    """USD for ``usage`` at ``price``; None when there is no price."""
    if price is None:
        return None
    cached = price.cached_input if price.cached_input is not None else price.input
    write = price.cache_write if price.cache_write is not None else price.input
    fresh = max(usage.input - usage.cached_input - usage.cache_write, 0)
    return (fresh * price.input + usage.cached_input * cached + usage.cache_write * write
            + usage.output * price.output) / 1_000_000
