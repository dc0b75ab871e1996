"""How a client presents a key to the gateway, and how both read one from a file."""

from __future__ import annotations

from pathlib import Path

# "Bearer <key>": the API key (inference) or the admin key (everything)
AUTH_HEADER = "authorization"


def read_key_file(path: str | Path) -> str:
    """A key from a file: its one line, surrounding whitespace stripped. ValueError if the
    file cannot be read or is empty (a server or client started without its intended key must
    not carry on silently). The key itself is never part of a message."""
    try:
        key = Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or type(exc).__name__
        raise ValueError(f"cannot read key file {path}: {reason}") from None
    if not key:
        raise ValueError(f"key file {path} is empty")
    return key
