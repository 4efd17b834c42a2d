"""What a model API answer cost: the model and its token usage, read from the answer the proxy
relays (JSON or a stream of server-sent events), as it passes. Pure: bytes in, a
:class:`~keyhole_sidecar.usage.meter.Usage` out; the proxy feeds it and records the result."""
