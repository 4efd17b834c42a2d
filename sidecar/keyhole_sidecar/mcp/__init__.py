"""The Model Context Protocol, as far as keyhole governs it (``spec.mcp``): a strict reader of
JSON-RPC messages (``jsonrpc``), the decisions on them (``policy``) and the server-sent event
framing of answers (``sse``). Pure: no sockets, no proxy; the MCP stage
(``keyhole_sidecar.proxy.stages.mcp``) puts them on the data path."""
