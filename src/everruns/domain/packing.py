"""The packed wire form of batch calls: many short byte strings in one blob cut at end offsets,
and UUIDs as 16 bytes each. A protobuf codec written in Python spends its time per element;
one ``bytes`` field per column costs the same for one start or ten thousand.

Pure functions, no I/O. Every malformed blob is refused with a one-line error naming it.
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Iterable, Sequence

from everruns.errors import InvalidArgument

__all__ = ["pack_blobs", "pack_uuids", "unpack_blobs", "unpack_uuids"]

_END = 4  # bytes per end offset: little-endian uint32
_MAX_BLOB = 2**32 - 1


def pack_blobs(items: Sequence[bytes]) -> tuple[bytes, bytes]:
    """``items`` as one blob and the end offset of each item in it.

    Raises:
        InvalidArgument: the items add up to 4 GiB or more.
    """
    blob = b"".join(items)
    if len(blob) > _MAX_BLOB:
        raise InvalidArgument(f"packed items total {len(blob)} bytes; the limit is {_MAX_BLOB}")
    ends = []
    end = 0
    for item in items:
        end += len(item)
        ends.append(end)
    return blob, struct.pack(f"<{len(ends)}I", *ends)


def unpack_blobs(blob: bytes, ends: bytes, what: str) -> list[bytes]:
    """The items of ``pack_blobs``.

    Raises:
        InvalidArgument: the offsets are not 4 bytes each, go backwards or past the blob, or
            leave bytes after the last item.
    """
    if len(ends) % _END:
        raise InvalidArgument(f"{what}: end offsets take 4 bytes each, got {len(ends)} bytes")
    items: list[bytes] = []
    start = 0
    for end in struct.unpack(f"<{len(ends) // _END}I", ends):
        if end < start or end > len(blob):
            raise InvalidArgument(
                f"{what}: end offset {end} is outside {start}..{len(blob)} (item {len(items)})"
            )
        items.append(blob[start:end])
        start = end
    if start != len(blob):
        raise InvalidArgument(f"{what}: {len(blob) - start} bytes after the last item")
    return items


def pack_uuids(ids: Iterable[uuid.UUID | str]) -> bytes:
    """UUIDs (objects or their text) as 16 bytes each, in order."""
    return b"".join(
        i.bytes if isinstance(i, uuid.UUID) else bytes.fromhex(i.replace("-", "")) for i in ids
    )


def unpack_uuids(blob: bytes, what: str) -> list[str]:
    """The UUIDs of ``pack_uuids``, in their canonical text form.

    Raises:
        InvalidArgument: the blob is not a whole number of 16-byte UUIDs.
    """
    if len(blob) % 16:
        raise InvalidArgument(f"{what}: UUIDs take 16 bytes each, got {len(blob)} bytes")
    h = blob.hex()
    return [
        f"{h[n : n + 8]}-{h[n + 8 : n + 12]}-{h[n + 12 : n + 16]}-{h[n + 16 : n + 20]}-"
        f"{h[n + 20 : n + 32]}"
        for n in range(0, len(h), 32)
    ]
