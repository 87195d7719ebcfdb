"""How much one gRPC call may carry: the senders' byte budget and the arithmetic of splitting.

The control plane refuses a message whose declared length is over its limit
(``EVERRUNS_MAX_MESSAGE_BYTES``) before reading it, so a client or worker that batches many
payloads into one call (starts, activity results, decisions) cuts the batch into calls that
each stay under a budget, well below the limit. The sizes here are upper bounds of the encoded
protobuf, computed from the lengths of the variable fields, never by encoding twice. Pure
functions, no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

__all__ = [
    "ENVELOPE_BYTES",
    "SEND_BUDGET",
    "field_bytes",
    "split",
    "take",
    "text_bytes",
    "within",
]

SEND_BUDGET = 16 * 1024 * 1024
"""The most one batch call carries (its encoded request): a quarter of the control plane's
default limit, so that a busy sender never meets it and a large batch is never one long
message that delays the calls sharing its connection. One item alone always goes, whatever its
size; the control plane then decides."""

ENVELOPE_BYTES = 1024
"""Room for what wraps a request beside its own fields: the `Call` of the call stream (id,
route, flags) and the fields an estimate leaves out (integers, flags)."""


def field_bytes(length: int) -> int:
    """The most a bytes or string field (or a nested message) of ``length`` bytes takes in a
    protobuf message: a tag, its length as a varint, and itself."""
    return 2 + _varint_len(length) + length


def text_bytes(text: str) -> int:
    """``text``'s length in UTF-8."""
    return len(text) if text.isascii() else len(text.encode())


def _varint_len(value: int) -> int:
    return max(1, (value.bit_length() + 6) // 7)


def take(sizes: Iterable[int], *, budget: int, max_items: int) -> int:
    """How many of the leading items one call carries: as many as fit in ``budget`` bytes
    together, at most ``max_items``, and at least one (when there is one)."""
    taken = used = 0
    for size in sizes:
        if taken == max_items or (taken and used + size > budget):
            break
        taken += 1
        used += size
    return taken


def split(sizes: Sequence[int], *, budget: int, max_items: int) -> list[range]:
    """``sizes``' positions cut into calls in order (`take` for each): every position in
    exactly one range, each range within ``budget`` unless it is a single item."""
    chunks = []
    start = 0
    while start < len(sizes):
        end = start + take(
            (sizes[i] for i in range(start, len(sizes))), budget=budget, max_items=max_items
        )
        chunks.append(range(start, end))
        start = end
    return chunks


def within(size: int, limit: int) -> bool:
    """Whether a request of (at most) ``size`` bytes fits a control plane's message limit
    ``limit`` once wrapped for sending (0: a limit not known, as from an older control
    plane)."""
    return limit <= 0 or size + ENVELOPE_BYTES <= limit
