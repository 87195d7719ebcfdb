"""The packed wire form of batch calls (pure core): blobs cut at end offsets and 16-byte UUIDs
round-trip exactly, and every malformed blob is refused with a one-line error."""

from __future__ import annotations

import struct
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from everruns.domain.packing import pack_blobs, pack_uuids, unpack_blobs, unpack_uuids
from everruns.errors import InvalidArgument


@given(st.lists(st.binary(max_size=40), max_size=60))
def test_blobs_round_trip(items: list[bytes]) -> None:
    blob, ends = pack_blobs(items)
    assert len(ends) == 4 * len(items)
    assert unpack_blobs(blob, ends, "x") == items


@given(st.lists(st.uuids(), max_size=60))
def test_uuids_round_trip(ids: list[uuid.UUID]) -> None:
    packed = pack_uuids(ids)
    assert len(packed) == 16 * len(ids)
    assert unpack_uuids(packed, "x") == [str(i) for i in ids]
    assert pack_uuids(str(i) for i in ids) == packed


@given(st.lists(st.binary(max_size=20), min_size=1, max_size=20), st.data())
def test_offsets_that_do_not_fit_the_blob_are_refused(
    items: list[bytes], data: st.DataObject
) -> None:
    blob, ends = pack_blobs(items)
    offsets = list(struct.unpack(f"<{len(items)}I", ends))
    n = data.draw(st.integers(0, len(items) - 1))
    offsets[n] = data.draw(st.integers(len(blob) + 1, 2**32 - 1))  # past the blob
    with pytest.raises(InvalidArgument, match="outside"):
        unpack_blobs(blob, struct.pack(f"<{len(offsets)}I", *offsets), "inputs")


@given(st.binary(min_size=1, max_size=30))
def test_bytes_left_after_the_last_item_are_refused(tail: bytes) -> None:
    blob, ends = pack_blobs([b"ab", b"c"])
    with pytest.raises(InvalidArgument, match=f"{len(tail)} bytes after the last item"):
        unpack_blobs(blob + tail, ends, "inputs")


@given(st.binary(max_size=50).filter(lambda b: len(b) % 16 != 0))
def test_uuid_blobs_of_the_wrong_length_are_refused(blob: bytes) -> None:
    with pytest.raises(InvalidArgument, match="16 bytes each"):
        unpack_uuids(blob, "run ids")


def test_offsets_going_backwards_or_cut_short_are_refused() -> None:
    with pytest.raises(InvalidArgument, match=r"outside 2\.\.3"):
        unpack_blobs(b"abc", struct.pack("<2I", 2, 1), "inputs")
    with pytest.raises(InvalidArgument, match="4 bytes each, got 3 bytes"):
        unpack_blobs(b"abc", b"\x03\x00\x00", "inputs")
    assert unpack_blobs(b"", b"", "inputs") == []


@given(st.lists(st.uuids(), max_size=30), st.data())
def test_uuid_texts_objects_and_bare_hex_pack_alike(
    ids: list[uuid.UUID], data: st.DataObject
) -> None:
    packed = b"".join(i.bytes for i in ids)
    assert pack_uuids([i.hex for i in ids]) == packed
    forms = [data.draw(st.sampled_from([i, str(i), i.hex])) for i in ids]
    assert pack_uuids(forms) == packed


@pytest.mark.parametrize(
    "texts",
    [["not-a-uuid"], [str(uuid.UUID(int=1)), "abc"], [str(uuid.UUID(int=1))[:-2]]],
)
def test_texts_that_are_not_uuids_are_refused(texts: list[str]) -> None:
    with pytest.raises(ValueError):
        pack_uuids(texts)
    with pytest.raises(ValueError):
        pack_uuids([uuid.UUID(int=2), *texts])
