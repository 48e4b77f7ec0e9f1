"""Where tilev4 keeps what it builds and measures per machine.

``cache_dir()`` is ``$TILEV4_CACHE_DIR`` or the platform's user cache directory for tilev4.
"""

from tilev4.autotune.paths import cache_dir

__all__ = ["cache_dir"]
