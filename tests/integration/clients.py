"""Running real clients (as subprocesses, configured only by environment) and reading results."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tests.support.sidecar import Sidecar

CLIENTS = Path(__file__).resolve().parent.parent / "clients"
PYTHON_LIBRARIES = ("requests", "httpx", "urllib", "aiohttp")


@dataclass
class Reply:
    status: int
    headers: list[tuple[str, str]]
    body: str
    protocol: str | None = None

    def json(self) -> dict:
        return json.loads(self.body)

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (any case), or None."""
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)

    def everything(self) -> str:
        """All a client got: what a leak check must search."""
        return f"{self.status}\n" + "\n".join(f"{k}: {v}" for k, v in self.headers) + self.body


def python_client(sidecar: Sidecar, library: str, method: str, url: str,
                  body: str | None = None, **env: str) -> Reply:
    command = [sys.executable, str(CLIENTS / "pyclient.py"), library, method, url]
    if body is not None:
        command.append(body)
    done = subprocess.run(command, env=sidecar.client_env(**env), capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, f"{library} failed:\n{done.stderr}"
    data = json.loads(done.stdout)
    return Reply(data["status"], [tuple(h) for h in data["headers"]], data["body"])


def node_fetch(sidecar: Sidecar, method: str, url: str, body: str | None = None,
               node: str = "node") -> Reply:
    command = [node, str(CLIENTS / "fetch.mjs"), method, url] + ([body] if body else [])
    done = subprocess.run(command, env=sidecar.client_env(), capture_output=True, text=True,
                          timeout=60, cwd=CLIENTS)
    assert done.returncode == 0, f"node fetch failed:\n{done.stderr}"
    data = json.loads(done.stdout)
    return Reply(data["status"], [tuple(h) for h in data["headers"]], data["body"])


def curl(sidecar: Sidecar, *args: str, env: dict | None = None, http2: bool = False) -> Reply:
    """curl with the proxy variables; -i so headers come back too. HTTP/1.1 unless ``http2``
    (curl would pick h2, which the proxy's leaves offer, and print names in lowercase)."""
    version = "--http2" if http2 else "--http1.1"
    done = subprocess.run(["curl", "-sS", "-i", version, "--max-time", "30", *args],
                          env=sidecar.client_env(**(env or {})), capture_output=True, timeout=60)
    assert done.returncode == 0, f"curl failed ({done.returncode}): {done.stderr.decode()}"
    return parse_raw_response(done.stdout)


def parse_raw_response(raw: bytes) -> Reply:
    """Split curl -i output; skips interim (1xx) and proxy CONNECT responses."""
    text = raw.decode("utf-8", "replace")
    while True:
        head, _, rest = text.partition("\r\n\r\n")
        status = int(head.split(" ", 2)[1])
        if (status < 200 or "Connection established" in head.split("\r\n")[0]) and rest:
            text = rest
            continue
        break
    headers = [tuple(line.split(": ", 1)) for line in head.split("\r\n")[1:] if ": " in line]
    reply = Reply(status, headers, rest)
    reply.protocol = head.split(" ", 1)[0]  # HTTP/1.1, HTTP/2
    return reply


def _run_json(command: list[str], env: dict[str, str], what: str, cwd=CLIENTS) -> Reply:
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, cwd=cwd)
    assert done.returncode == 0, f"{what} failed:\n{done.stderr}"
    data = json.loads(done.stdout.strip().splitlines()[-1])
    reply = Reply(data["status"], [tuple(h) for h in data["headers"]], data["body"])
    reply.protocol = data.get("proto") or data.get("version")
    return reply


def go_fetch(sidecar: Sidecar, binary: Path, method: str, url: str) -> Reply:
    return _run_json([str(binary), method, url], sidecar.client_env(), "go client")


def java_fetch(sidecar: Sidecar, method: str, url: str) -> Reply:
    """Java with the options keyhole's webhook appends to JAVA_TOOL_OPTIONS."""
    store = sidecar.workdir / "truststore.p12"
    if not store.exists():
        subprocess.run(["keytool", "-importcert", "-noprompt", "-alias", "keyhole", "-file",
                        str(sidecar.ca_cert), "-keystore", str(store), "-storetype", "PKCS12",
                        "-storepass", "changeit"], check=True, capture_output=True)
    port = sidecar.proxy_port
    options = (f"-Dhttps.proxyHost=127.0.0.1 -Dhttps.proxyPort={port} "
               f"-Dhttp.proxyHost=127.0.0.1 -Dhttp.proxyPort={port} "
               f"-Djavax.net.ssl.trustStore={store} -Djavax.net.ssl.trustStorePassword=changeit "
               "-Djavax.net.ssl.trustStoreType=PKCS12")
    return _run_json(["java", str(CLIENTS / "Fetch.java"), method, url],
                     sidecar.client_env(JAVA_TOOL_OPTIONS=options), "java client")


NODE24 = CLIENTS / "node_modules" / ".bin" / "node"


def websocket(sidecar: Sidecar, url: str, send: str | None = None) -> list[str]:
    """aiohttp's WebSocket client through the proxy (CONNECT): the first message the server
    sends and, when ``send`` is given, its answer to it."""
    import ssl

    import aiohttp

    from tests.support import aio

    async def talk() -> list[str]:
        context = ssl.create_default_context(cafile=str(sidecar.ca_cert))
        async with aiohttp.ClientSession() as session, session.ws_connect(
                url, proxy=sidecar.url, ssl=context) as ws:
            got = [await ws.receive_str(timeout=5)]
            if send is not None:
                await ws.send_str(send)
                got.append(await ws.receive_str(timeout=5))
            return got
    return aio.run(talk())
