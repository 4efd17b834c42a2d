"""Pod injection as a pure function: ``mutate(pod, injections, settings, key) -> Mutation``.

The webhook diffs the original pod against the mutated one to produce its JSON Patch, so
there are no hand-written patch operations, and ``mutate`` is idempotent: applying it to its
own output changes nothing (Kubernetes may call the webhook again after other webhooks).
"""

from keyhole_operator.mutation.pod import Mutation, Refused, mutate

__all__ = ["Mutation", "Refused", "mutate"]
