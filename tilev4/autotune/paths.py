"""Cache locations."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

__all__ = ["cache_dir"]


def cache_dir() -> Path:
    """``$TILEV4_CACHE_DIR`` if set, else the user cache directory (e.g. ``~/.cache/tilev4``)."""
    env = os.environ.get("TILEV4_CACHE_DIR")
    return Path(env).expanduser() if env else Path(platformdirs.user_cache_dir("tilev4", appauthor=False))
