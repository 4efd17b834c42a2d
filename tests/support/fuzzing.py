"""What the relay fuzzers (HTTP/1.1 and HTTP/2) do to bytes: overwrite parts, cut in pieces."""

from __future__ import annotations


def mutate(data: bytes, edits: list[tuple[int, bytes]]) -> bytes:
    """Overwrite ``data`` with each edit's bytes at its position (modulo the length)."""
    for position, insert in edits:
        at = position % (len(data) + 1)
        data = data[:at] + insert + data[at + len(insert):]
    return data


def pieces(data: bytes, sizes: list[int]) -> list[bytes]:
    """``data`` cut into pieces of these sizes (the rest in one last piece)."""
    out, at = [], 0
    for size in sizes:
        if at >= len(data):
            break
        out.append(data[at:at + size])
        at += size
    if at < len(data):
        out.append(data[at:])
    return out
