"""Reading secret values from files laid out as Kubernetes mounts Secrets: ``<dir>/<name>/<key>``.

Kubernetes updates a mounted Secret by swapping a ``..data`` symlink; reading the path each
time (never caching a file descriptor) follows the swap for free.
"""

from __future__ import annotations

import logging
from pathlib import Path

from keyhole_common.spec import SecretKeyRef


class SecretUnavailable(ValueError):
    """A referenced Secret key cannot be used. The message names the file, never a value."""


class SecretMissing(SecretUnavailable):
    """The Secret's folder or its key's file is not there: the Secret or the key was removed,
    which is how users revoke. ``summary`` names the Secret and key but no path (it is what a
    refused agent reads)."""

    def __init__(self, message: str, summary: str):
        super().__init__(message)
        self.summary = summary


log = logging.getLogger("keyhole.secrets")
_MULTILINE_ALLOWED = frozenset("\n\r\t")


def clean_value(raw: bytes, where: str, *, multiline: bool = False) -> str:
    """Strip trailing CR/LF, require UTF-8 and no other control characters. ``multiline``
    values (a PEM private key, which the proxy uses but never sends) may hold line breaks."""
    value = raw.rstrip(b"\r\n")
    if not value:
        raise SecretUnavailable(f"{where}: the value is empty; write the key into this file")
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SecretUnavailable(f"{where}: not UTF-8 text (byte {exc.start})") from None
    for index, char in enumerate(text):
        if multiline and char in _MULTILINE_ALLOWED:
            continue
        if ord(char) < 0x20 or ord(char) == 0x7F:
            raise SecretUnavailable(
                f"{where}: control character {ord(char):#04x} at position {index}; a secret used "
                "in a header or URL may only end in CR/LF"
            )
    return text


class SecretsDir:
    """The ``--secrets-dir`` folder."""

    def __init__(self, root: Path):
        self.root = root

    def path(self, ref: SecretKeyRef) -> Path:
        return self.root / ref.name / ref.key

    def read(self, ref: SecretKeyRef, *, multiline: bool = False) -> str:
        """Return the cleaned value of ``ref`` or raise :class:`SecretUnavailable`."""
        path = self.path(ref)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            if not (self.root / ref.name).is_dir():
                raise SecretMissing(
                    f"Secret {ref.name!r} not found: expected folder {self.root / ref.name}",
                    f"Secret {ref.name!r} is missing",
                ) from None
            raise SecretMissing(
                f"Secret {ref.name!r} has no key {ref.key!r}: expected file {path}",
                f"Secret {ref.name!r} has no key {ref.key!r} (the Secret or the key was "
                "removed)",
            ) from None
        except IsADirectoryError:
            raise SecretUnavailable(f"{path} is a folder, expected a file") from None
        except PermissionError:
            raise SecretUnavailable(f"{path} is not readable by this process") from None
        except OSError as exc:
            raise SecretUnavailable(f"{path}: cannot read ({exc.strerror})") from None
        value = clean_value(raw, str(path), multiline=multiline)
        _warn_if_pasted_wrong(value, path)
        return value


def looks_pasted_wrong(value: str) -> str | None:
    """Why ``value`` looks like a paste mistake (sent as is, it is almost always refused
    upstream), or None: spaces around it, or quotes around it."""
    if value != value.strip(" \t"):
        return "it begins or ends with a space or tab"
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return "it is wrapped in quotes"
    return None


_warned: set[tuple[Path, str]] = set()


def _warn_if_pasted_wrong(value: str, path: Path) -> None:
    """Warned once per file and cause: the value is sent exactly as it is, never trimmed."""
    why = looks_pasted_wrong(value)
    if why is not None and (path, why) not in _warned:
        _warned.add((path, why))
        log.warning("%s: %s, and it is sent exactly as it is; rewrite the file if that was a "
                    "paste mistake", path, why)
