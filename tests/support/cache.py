"""Where test and bench infrastructure is built once and kept: the user's cache, outside the
work tree, each entry named by what it was built from (Go only builds this infrastructure;
nothing of the product is Go)."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path


def cache_root() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "keyhole"


def go_program(source: Path, name: str) -> Path:
    """The Go program in the folder ``source``, built once per version of its ``.go``,
    ``go.mod`` and ``go.sum`` files (its dependencies from the Go module proxy)."""
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(source.iterdir())
                                     if p.suffix in (".go", ".mod", ".sum"))).hexdigest()[:12]
    binary = cache_root() / f"{name}-{digest}"
    if not binary.exists():
        binary.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["go", "build", "-o", str(binary), "."], check=True, cwd=source,
                       capture_output=True, env={**os.environ, "GOFLAGS": "-mod=mod"},
                       timeout=600)
    return binary
