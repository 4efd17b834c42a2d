"""keyhole's sidecar: an HTTP proxy that adds secrets to requests so agents never hold them.

Layers, outermost first: ``cli`` → ``app`` (wiring) → ``proxy`` (sockets, TLS, HTTP) →
``routes``/``policy``/``inject``/``redact`` (pure decisions) → ``spec`` (the API model).
The spec model is shared with the operator; nothing here imports Kubernetes.
"""

__version__ = "0.1.0"
