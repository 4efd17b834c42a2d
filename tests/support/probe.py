"""Polling an HTTP endpoint until a server is ready, closing every answer it gets."""

from __future__ import annotations

import ssl
import urllib.error
import urllib.request


def http_status(url: str, *, context: ssl.SSLContext | None = None, timeout: float = 2.0
                ) -> int | str:
    """The status ``url`` answers with, or why there was none. An error status arrives as an
    ``HTTPError`` that holds the connection open: closed here, or the garbage collector finds
    its socket later and the warning fails whichever test is running then."""
    try:
        with urllib.request.urlopen(url, context=context, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as error:
        with error:
            return error.code
    except OSError as error:
        return str(error)
