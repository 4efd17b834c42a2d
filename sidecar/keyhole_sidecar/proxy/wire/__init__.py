"""The wire: sockets, TLS and framing. The doors accept connections and hand each to one
owner — HTTP/1.1 (llhttp), HTTP/2 (``h2``) or a blind tunnel; the pool speaks to upstreams in
whichever protocol they pick. Only this package touches aiohttp's internals."""
