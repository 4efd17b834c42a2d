// The TypeScript MCP SDK's client, as an agent uses it: connect, list the tools, call some.
//
//   node mcp_client.mjs URL streamable|sse CALLS_JSON [sampling]
//
// CALLS_JSON is a list of [tool, arguments]. With ``sampling`` the client offers to sample
// for the server (and answers every sampling/createMessage with "sampled by the agent"). Prints one JSON object: the tool names listed,
// and for each call its result (content and isError) or the error the SDK raised. Through a
// proxy when NODE_USE_ENV_PROXY and HTTPS_PROXY say so (Node 24's fetch honours them).
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { SSEClientTransport } from "@modelcontextprotocol/sdk/client/sse.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";
import { CreateMessageRequestSchema } from "@modelcontextprotocol/sdk/types.js";

const [url, mode, calls, sampling] = process.argv.slice(2);
const transport = mode === "sse" ? new SSEClientTransport(new URL(url))
  : new StreamableHTTPClientTransport(new URL(url));
const client = new Client({ name: "keyhole-test-agent", version: "1.0.0" },
                          { capabilities: sampling ? { sampling: {} } : {} });
if (sampling) {
  client.setRequestHandler(CreateMessageRequestSchema, async () => ({
    model: "agent-model", role: "assistant",
    content: { type: "text", text: "sampled by the agent" },
  }));
}
await client.connect(transport);
const tools = (await client.listTools()).tools.map((tool) => tool.name).sort();
const results = [];
for (const [name, args] of JSON.parse(calls)) {
  try {
    const result = await client.callTool({ name, arguments: args });
    results.push({ isError: result.isError ?? false, content: result.content });
  } catch (error) {
    results.push({ error: String(error.message ?? error) });
  }
}
console.log(JSON.stringify({ tools, results }));
if (mode !== "sse") {
  await transport.terminateSession(); // DELETE: the server ends the session and its GET stream
}
await client.close();
