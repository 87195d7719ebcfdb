"""Load the named SQL blocks of ``queries.sql`` once, at import.

Nothing outside ``everruns.store`` writes SQL; code here only parses the file and refuses a
malformed one (a block with no description, a duplicate name) so mistakes show up at import.
"""

from __future__ import annotations

import re
from importlib import resources

__all__ = ["QUERIES", "parse_queries"]

_NAME = re.compile(r"^-- name: ([a-z_][a-z0-9_]*)\s*$")


def parse_queries(text: str) -> dict[str, str]:
    """Return ``{name: sql}`` for every ``-- name:`` block in ``text``.

    Raises:
        ValueError: a block lacks its one-line description or a name is repeated.
    """
    queries: dict[str, str] = {}
    name: str | None = None
    lines: list[str] = []

    def flush() -> None:
        if name is None:
            return
        if not lines or not lines[0].startswith("-- "):
            raise ValueError(f"query {name!r} needs a one-line '-- ' description after its name")
        body = "\n".join(line for line in lines[1:] if not line.startswith("--")).strip()
        if not body:
            raise ValueError(f"query {name!r} is empty")
        if name in queries:
            raise ValueError(f"query {name!r} is defined twice")
        queries[name] = body.rstrip(";")

    for line in text.splitlines():
        match = _NAME.match(line)
        if match:
            flush()
            name, lines = match.group(1), []
        elif name is not None:
            lines.append(line)
    flush()
    return queries


QUERIES: dict[str, str] = parse_queries(
    resources.files("everruns.store").joinpath("queries.sql").read_text(encoding="utf-8")
)
