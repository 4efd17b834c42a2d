"""keyhole's Kubernetes operator: reconciles SecretInjections, keeps each namespace's CA and
signing key, injects the sidecar into labelled pods, and grants or revokes access live.

Layers: ``cli`` → ``handlers`` (thin kopf handlers, the only Kubernetes I/O besides ``kube``)
→ pure decisions (``mutation``, ``selectors``, ``routes``, ``trust``, ``status``,
``privileges``, ``guard``) → the shared spec model (``keyhole_common.spec``).
"""
