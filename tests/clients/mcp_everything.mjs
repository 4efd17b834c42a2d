// @modelcontextprotocol/server-everything, the MCP reference server, over HTTPS for keyhole's
// tests: Streamable HTTP on /mcp (sessions, the GET stream, DELETE) and the legacy HTTP+SSE
// transport on /sse and /message, as its own transports serve them, behind node's https.
//
//   node mcp_everything.mjs RECORD CERT KEY
//
// prints the port it listens on (127.0.0.1), then serves. Every request is appended to RECORD
// (one JSON line: method, path, body) before the server sees it: what the server received.
import { appendFileSync, readFileSync } from "node:fs";
import { randomUUID } from "node:crypto";
import https from "node:https";
import express from "express";
import { SSEServerTransport } from "@modelcontextprotocol/sdk/server/sse.js";
import { StreamableHTTPServerTransport } from "@modelcontextprotocol/sdk/server/streamableHttp.js";
import { createServer } from "@modelcontextprotocol/server-everything/dist/server/index.js";

const [record, cert, key] = process.argv.slice(2);
const app = express();
app.use(express.raw({ type: () => true, limit: "16mb" }));
app.use((req, res, next) => {
  const body = Buffer.isBuffer(req.body) ? req.body.toString("utf8") : "";
  appendFileSync(record, JSON.stringify({ method: req.method, path: req.originalUrl,
                                          authorization: req.headers.authorization ?? null,
                                          body }) + "\n");
  if (body) {
    try {
      req.body = JSON.parse(body);
    } catch {
      res.status(400).json({ jsonrpc: "2.0", id: null,
                             error: { code: -32700, message: "Parse error" } });
      return;
    }
  } else {
    req.body = undefined;
  }
  next();
});

const sessions = new Map();
app.all("/mcp", async (req, res) => {
  const id = req.headers["mcp-session-id"];
  let transport = id && sessions.get(id);
  if (!transport && req.method === "POST" && !id) {
    const { server } = createServer();
    transport = new StreamableHTTPServerTransport({
      sessionIdGenerator: () => randomUUID(),
      onsessioninitialized: (sid) => sessions.set(sid, transport),
    });
    await server.connect(transport);
  }
  if (!transport) {
    res.status(400).json({ jsonrpc: "2.0", id: null,
                           error: { code: -32000, message: "no valid session" } });
    return;
  }
  await transport.handleRequest(req, res, req.body);
});

const legacy = new Map();
app.get("/sse", async (req, res) => {
  const { server } = createServer();
  const transport = new SSEServerTransport("/message", res);
  legacy.set(transport.sessionId, transport);
  await server.connect(transport);
});
app.post("/message", async (req, res) => {
  const transport = legacy.get(req.query.sessionId);
  if (!transport) {
    res.status(404).end();
    return;
  }
  await transport.handlePostMessage(req, res, req.body);
});

const listener = https.createServer({ cert: readFileSync(cert), key: readFileSync(key) }, app);
listener.listen(0, "127.0.0.1", () => {
  console.log(listener.address().port);
  console.log = console.error; // nobody reads stdout after the port: a full pipe would block
});
