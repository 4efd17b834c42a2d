"""An agent's MCP session with the official Python SDK, configured by nothing but the
environment (SSL_CERT_FILE): connect, list the tools, call each one asked.

    python mcp_agent.py URL CALLS_JSON

prints one JSON object: the tool names listed, and each call's text and isError."""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import sys

import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client


async def main(url: str, calls: list) -> dict:
    verify = ssl.create_default_context(cafile=os.environ.get("SSL_CERT_FILE"))
    async with httpx2.AsyncClient(verify=verify, timeout=30) as http, Client(
            streamable_http_client(url, http_client=http), mode="legacy") as client:
        tools = sorted(t.name for t in (await client.list_tools()).tools)
        results = []
        for name, arguments in calls:
            result = await client.call_tool(name, arguments)
            results.append({"isError": result.is_error, "text": result.content[0].text})
    return {"tools": tools, "results": results}


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(sys.argv[1], json.loads(sys.argv[2])))))
