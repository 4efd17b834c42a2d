"""The real ``keyhole-sidecar`` with the cycle collector off, for tests/security/test_memory.py.

Reference counting frees a closed connection at once only if nothing of it forms a cycle; what
does waits for the cycle collector, which for long-lived garbage runs rarely — how memory
climbed under load (issue 30). With the collector off, anything a closed connection left in a
cycle stays; asked (a file ``<workdir>/gc.ask`` appears), the probe collects once, saving what
it found, and writes the count of each type to ``<workdir>/gc.json``.

    python -m tests.support.gc_probe <keyhole-sidecar arguments>
"""

from __future__ import annotations

import collections
import gc
import json
import sys
import threading
import time
from pathlib import Path


def _answer(folder: Path) -> None:
    ask, answer = folder / "gc.ask", folder / "gc.json"
    while True:
        time.sleep(0.05)
        if not ask.exists():
            continue
        ask.unlink()
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        found = collections.Counter(type(o).__name__ for o in gc.garbage)
        gc.garbage.clear()
        gc.set_debug(0)
        partial = answer.with_suffix(".tmp")
        partial.write_text(json.dumps(found))
        partial.replace(answer)


def main() -> int:
    gc.disable()
    folder = Path(sys.argv[sys.argv.index("--ca-dir") + 1]).parent
    threading.Thread(target=_answer, args=(folder,), daemon=True).start()
    from keyhole_sidecar.cli import main as sidecar

    return sidecar(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
