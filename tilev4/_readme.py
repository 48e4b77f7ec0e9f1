"""Generated sections of the README: the text between a begin and an end marker is replaced as a whole."""

from __future__ import annotations

from pathlib import Path


def replace_section(readme: Path, begin: str, end: str, body: str) -> None:
    """Write ``body`` between the ``begin`` / ``end`` markers of ``readme`` (kept); ValueError if one is missing."""
    text = readme.read_text()
    if begin not in text or end not in text:
        raise ValueError(f"{readme}: the markers {begin} / {end} are missing")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(head + begin + body + end + tail)
