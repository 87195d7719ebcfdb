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
    """UUIDs (objects or their text, with or without dashes) as 16 bytes each, in order.

    Texts alone (ids the database generated) are converted in one piece, and only the length
    of the whole is checked; among objects each text is parsed as a UUID.

    Raises:
        ValueError: a text is not hex, the texts do not make 16 bytes each, or (among
            objects) a text is not a UUID.
    """
    items = list(ids)
    texts = [i for i in items if isinstance(i, str)]
    if len(texts) == len(items):  # one conversion for all: the generated workflow ids
        blob = bytes.fromhex("".join(texts).replace("-", ""))
        if len(blob) != 16 * len(texts):
            raise ValueError(f"{len(texts)} UUID texts hold {len(blob)} bytes, not 16 each")
        return blob
    return b"".join(i.bytes if isinstance(i, uuid.UUID) else uuid.UUID(i).bytes for i in items)


def unpack_uuids(blob: bytes, what: str) -> list[str]:
    """The UUIDs of ``pack_uuids``, in their canonical text form.

    Raises:
        InvalidArgument: the blob is not a whole number of 16-byte UUIDs.
    """
    if len(blob) % 16:
        raise InvalidArgument(f"{what}: UUIDs take 16 bytes each, got {len(blob)} bytes")
    # Hex in groups of two bytes, eight groups a UUID: 4+4-4-4-4-4+4+4 digits.
    groups = iter(blob.hex("-", 2).split("-")) if blob else iter(())
    return [
        f"{a}{b}-{c}-{d}-{e}-{f}{g}{h}"
        for a, b, c, d, e, f, g, h in zip(*[groups] * 8, strict=True)
    ]
