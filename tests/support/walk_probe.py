"""The real ``keyhole-sidecar``, recording the walk of each request through the modules, for
tests/test_architecture.py.

At the points where a request leaves the proxy (the upstream pool's exchange) and where its
answer does (the client reply's send and write), the probe notes which keyhole modules are on
the stack, outermost first. Asked (a file ``<workdir>/walk.ask`` appears), it writes every
walk noted so far to ``<workdir>/walk.json``.

    python -m tests.support.walk_probe <keyhole-sidecar arguments>
"""

from __future__ import annotations

import functools
import json
import sys
import threading
import time
from pathlib import Path

WALKS: list[list[str]] = []


def _walk() -> list[str]:
    frame, modules = sys._getframe(2), []
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if name.startswith("keyhole_sidecar."):
            modules.append(name)
        frame = frame.f_back
    return modules[::-1]


def _noting(method):
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        WALKS.append(_walk())
        return method(*args, **kwargs)
    return wrapper


def _answer(folder: Path) -> None:
    ask, answer = folder / "walk.ask", folder / "walk.json"
    while True:
        time.sleep(0.05)
        if ask.exists():
            ask.unlink()
            partial = answer.with_suffix(".tmp")
            partial.write_text(json.dumps(WALKS))
            partial.replace(answer)


def main() -> int:
    from keyhole_sidecar.cli import main as sidecar
    from keyhole_sidecar.proxy.wire import http1, pool

    pool.UpstreamPool.exchange = _noting(pool.UpstreamPool.exchange)
    http1.Reply.send = _noting(http1.Reply.send)
    http1.Reply.write = _noting(http1.Reply.write)
    folder = Path(sys.argv[sys.argv.index("--ca-dir") + 1]).parent
    threading.Thread(target=_answer, args=(folder,), daemon=True).start()
    return sidecar(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
