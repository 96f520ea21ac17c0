"""Where writing a path would start: the checks the command-line tools make before any work."""

from __future__ import annotations

from pathlib import Path


def nearest_existing(path: str | Path) -> Path:
    """`path` if it exists, else its nearest existing ancestor: where creating it would start, and
    what stops it when that is a file rather than a folder."""
    path = Path(path)
    return next(p for p in (path, *path.parents) if p.exists())
