"""A Python HTTP client configured only by environment variables, as an agent's would be.

usage: pyclient.py requests|httpx|urllib|aiohttp METHOD URL [BODY]
Prints one JSON object: status, headers (list of pairs), body (text).
"""

import asyncio
import json
import sys


def main() -> None:
    library, method, url = sys.argv[1:4]
    body = sys.argv[4].encode() if len(sys.argv) > 4 else None
    if library == "requests":
        import requests

        r = requests.request(method, url, data=body, timeout=20, allow_redirects=False)
        result = (r.status_code, list(r.headers.items()), r.text)
    elif library == "httpx":
        import httpx

        with httpx.Client(trust_env=True, timeout=20) as client:
            r = client.request(method, url, content=body)
            result = (r.status_code, list(r.headers.items()), r.text)
    elif library == "urllib":
        import urllib.error
        import urllib.request

        request = urllib.request.Request(url, data=body, method=method)
        try:
            with urllib.request.urlopen(request, timeout=20) as r:
                result = (r.status, list(r.headers.items()), r.read().decode())
        except urllib.error.HTTPError as exc:
            result = (exc.code, list(exc.headers.items()), exc.read().decode())
    elif library == "aiohttp":
        import aiohttp

        async def fetch():
            async with aiohttp.ClientSession(trust_env=True) as session, session.request(
                method, url, data=body, allow_redirects=False
            ) as r:
                return r.status, list(r.headers.items()), await r.text()

        result = asyncio.run(fetch())
    else:
        raise SystemExit(f"unknown library {library}")
    status, headers, text = result
    print(json.dumps({"status": status, "headers": headers, "body": text}))


if __name__ == "__main__":
    main()
