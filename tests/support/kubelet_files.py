"""How the kubelet writes Secret, ConfigMap and downward-API volumes: new files in a fresh
timestamped folder, then an atomic swap of the ``..data`` symlink, each key a symlink through
it. Shared by the sidecar's reload tests and the cluster tests' kubelet stand-in."""

from __future__ import annotations

import os
import time
from pathlib import Path


def write_atomically(folder: Path, files: dict[str, bytes], mode: int = 0o444) -> None:
    """The kubelet's AtomicWriter: new data in a fresh folder, then swap ``..data``."""
    folder.mkdir(parents=True, exist_ok=True)
    fresh = folder / f"..{time.strftime('%Y_%m_%d_%H_%M_%S')}.{time.monotonic_ns()}"
    fresh.mkdir()
    for name, content in files.items():
        (fresh / name).write_bytes(content)
        (fresh / name).chmod(mode)
    link = folder / "..data_tmp"
    link.symlink_to(fresh.name)
    os.replace(link, folder / "..data")
    for name in files:
        if not (folder / name).is_symlink():
            (folder / name).symlink_to(f"..data/{name}")
