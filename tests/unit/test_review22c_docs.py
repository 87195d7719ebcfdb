"""Review 22c: docs/internals.md spells out the ``error`` object failure events carry, but not
the ``retry_after`` that session 22 added to it (`everruns.RetryAfter`; `error_info`,
`error_from_exception`), which `retry_after_of` reads back on the control plane to hold the
next attempt: whoever writes an error object by hand (a worker in another language, a test)
learns of the field only from the code."""

from __future__ import annotations

from pathlib import Path

from everruns.errors import RetryAfter
from everruns.worker.failure import error_from_exception

INTERNALS = Path(__file__).resolve().parents[2] / "docs" / "internals.md"


def test_the_documented_error_object_has_every_field_the_worker_sends() -> None:
    # The paragraph that begins "`error` is " (wrapped over a few lines).
    text = INTERNALS.read_text()
    start = text.index("\n`error` is ") + 1
    paragraph = text[start : text.index("\n\n", start)]
    for field in error_from_exception(RetryAfter(3.0, "busy")):
        assert f'"{field}"' in paragraph, f"{field!r} missing from internals.md: {paragraph}"
