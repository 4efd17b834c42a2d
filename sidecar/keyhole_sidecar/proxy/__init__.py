"""The network side of the sidecar: sockets, CONNECT, TLS interception and HTTP forwarding.

``frontdoor`` owns each accepted socket and decides what it is; ``tunnel`` pipes blind
tunnels; ``handlers`` turns a parsed request into a :class:`~sidecar.proxy.forward.Target`;
``forward`` sends it upstream and streams the (redacted) answer back.
"""
