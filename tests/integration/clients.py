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

    def json(self) -> dict:
        return json.loads(self.body)

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


def curl(sidecar: Sidecar, *args: str, env: dict | None = None) -> Reply:
    """curl with the proxy variables; -i so headers come back too."""
    done = subprocess.run(["curl", "-sS", "-i", "--max-time", "30", *args],
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
    return Reply(status, headers, rest)
