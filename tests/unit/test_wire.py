"""The compiled protobuf codec (`everruns._aio.wire`) against betterproto2's own: for every
message class of the protocol it compiles, random messages encode to the same bytes and decode
to equal messages both ways; unknown fields are skipped; malformed input is refused with one
error line; classes it does not compile keep betterproto2's codec."""

from __future__ import annotations

import inspect
import struct
from typing import Any

import betterproto2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from everruns._aio.wire import FastCodec, WireError, decoder_for, encoder_for
from everruns._proto.everruns import v1 as pb

MESSAGES = sorted(
    (
        cls
        for _, cls in inspect.getmembers(pb, inspect.isclass)
        if issubclass(cls, betterproto2.Message) and cls is not betterproto2.Message
    ),
    key=lambda cls: cls.__name__,
)
COMPILED = [cls for cls in MESSAGES if encoder_for(cls) is not None]

_SCALARS: dict[str, st.SearchStrategy[Any]] = {
    "string": st.text(max_size=12),
    "bytes": st.binary(max_size=12),
    "int32": st.integers(-(2**31), 2**31 - 1),
    "int64": st.integers(-(2**63), 2**63 - 1),
    "uint32": st.integers(0, 2**32 - 1),
    "uint64": st.integers(0, 2**64 - 1),
    "bool": st.booleans(),
    "double": st.floats(allow_nan=False),
    "float": st.floats(width=32, allow_nan=False),
}


def messages(cls: type, depth: int = 0) -> st.SearchStrategy[Any]:
    """Random instances of a compiled message class. Nested messages in repeated fields are
    never empty (betterproto2 writes an empty one under field number 1, whatever its own)."""
    meta = cls._betterproto  # type: ignore[attr-defined]
    fields: dict[str, st.SearchStrategy[Any]] = {}
    for name, field in meta.meta_by_field_name.items():
        if field.proto_type == "message":
            nested = meta.cls_by_field[name]
            fields[name] = (
                st.lists(messages(nested, depth + 1).filter(bool), max_size=3)
                if depth < 3
                else st.just([])
            )
        elif field.repeated:
            fields[name] = st.lists(_SCALARS[field.proto_type], max_size=3)
        else:
            fields[name] = _SCALARS[field.proto_type]
    return st.fixed_dictionaries({}, optional=fields).map(lambda values: cls(**values))


def test_the_hot_messages_are_compiled() -> None:
    hot = {
        pb.Task,
        pb.HistoryEvent,
        pb.PollTasksRequest,
        pb.PollTasksResponse,
        pb.CompleteWorkflowTaskRequest,
        pb.CompleteWorkflowTaskResponse,
        pb.CompleteActivityTasksRequest,
        pb.CompleteActivityTasksResponse,
        pb.StartWorkflowRequest,
        pb.StartWorkflowsRequest,
        pb.StartWorkflowsResponse,  # packed repeated bools
    }
    assert hot <= set(COMPILED)
    # A single nested message stays with betterproto2.
    assert decoder_for(pb.DescribeWorkflowResponse) is None


@pytest.mark.parametrize("cls", COMPILED, ids=lambda cls: cls.__name__)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_same_bytes_and_equal_messages_as_betterproto2(cls: type, data: st.DataObject) -> None:
    message = data.draw(messages(cls))
    encode, decode = encoder_for(cls), decoder_for(cls)
    assert encode is not None and decode is not None
    wire = bytes(message)
    assert encode(message) == wire
    decoded = decode(wire)
    assert decoded == message and type(decoded) is cls
    assert decoded.__dict__.keys() == cls().__dict__.keys()
    assert cls.parse(encode(message)) == message


_TASK_FIELDS = frozenset(pb.Task._betterproto.field_name_by_number)


@given(st.integers(1, 2**29 - 1).filter(lambda n: n not in _TASK_FIELDS), st.binary(max_size=20))
def test_unknown_fields_are_skipped(number: int, payload: bytes) -> None:
    task = pb.Task(task_id="t", lease_token=7, history=[pb.HistoryEvent(sequence_num=1)])
    unknown = _key(number, 2) + _varint(len(payload)) + payload + _key(number, 0) + b"\x05"
    decode = decoder_for(pb.Task)
    assert decode is not None
    assert decode(bytes(task) + unknown) == task
    assert decode(unknown + bytes(task)) == task


@pytest.mark.parametrize(
    ("wire", "error"),
    [
        (b"\x08", "truncated varint"),  # a key, then no value
        (b"\x0a\x05ab", "runs past the end"),
        (b"\x18\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01", "longer than ten bytes"),
        (b"\x0a\x02\xff\xfe", "not UTF-8"),
        (b"\x0b", "unknown wire type 3"),
        (b"\x08\x01", "wire type 0, not 2"),
        (b"\x82\x01\x01\x08", "truncated varint"),  # a history event cut inside
    ],
)
def test_malformed_messages_are_refused_with_one_line(wire: bytes, error: str) -> None:
    decode = decoder_for(pb.Task)
    assert decode is not None
    with pytest.raises(WireError, match=error) as caught:
        decode(wire)
    assert "\n" not in str(caught.value)


def test_negative_integers_take_ten_bytes_like_betterproto2() -> None:
    task = pb.Task(attempt=-1, lease_token=-(2**63))
    encode = encoder_for(pb.Task)
    assert encode is not None and encode(task) == bytes(task)
    assert len(encode(pb.Task(attempt=-1))) == 11


def test_packed_numbers_are_read_packed_or_not_and_refused_when_cut() -> None:
    decode = decoder_for(pb.StartWorkflowsResponse)
    assert decode is not None
    packed = _key(4, 2) + _varint(3) + b"\x01\x00\x01"
    unpacked = _key(4, 0) + b"\x01" + _key(4, 0) + b"\x00"
    assert decode(packed).created == [True, False, True]
    assert decode(unpacked + packed).created == [True, False, True, False, True]
    with pytest.raises(WireError, match="StartWorkflowsResponse: packed field created: truncated"):
        decode(_key(4, 2) + _varint(1) + b"\x80")


def test_the_codec_uses_compiled_code_where_it_has_it_and_betterproto2_elsewhere() -> None:
    codec = FastCodec()
    reply = pb.DescribeWorkflowResponse(workflow=pb.WorkflowDescription(workflow_id="w"))
    assert codec.encode(reply, pb.DescribeWorkflowResponse) == bytes(reply)
    assert codec.decode(bytes(reply), pb.DescribeWorkflowResponse) == reply
    tasks = pb.PollTasksResponse(tasks=[pb.Task(task_id="t", input=b"1")])
    assert codec.decode(codec.encode(tasks, pb.PollTasksResponse), pb.PollTasksResponse) == tasks
    with pytest.raises(TypeError, match="must be of type"):
        codec.encode(tasks, pb.Task)


def _key(number: int, wire: int) -> bytes:
    return _varint(number << 3 | wire)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def test_floats_round_trip_bit_for_bit() -> None:
    event = pb.HistoryEvent(sequence_num=3, time=1.7e9 + 0.123456789)
    decode = decoder_for(pb.HistoryEvent)
    assert decode is not None
    assert struct.pack("<d", decode(bytes(event)).time) == struct.pack("<d", event.time)
