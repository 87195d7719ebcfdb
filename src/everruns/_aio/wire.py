"""A faster protobuf codec for grpclib, wire-compatible with betterproto2's.

betterproto2 encodes a message by walking every field through generic helpers (defaults looked
up by name, one dispatch per value) and decodes into a generic field table: about 100 µs to
encode and 75 µs to decode one `Task` on the machines we measure on, the largest single cost of
a claim. This codec compiles, once per message class and from the class's own generated
metadata, an encoder and a decoder that do only what that message needs.

It covers the field kinds our protocol uses (strings, bytes, 32/64-bit integers, bools,
doubles, floats, repeated strings, bytes and messages, and repeated integers and bools, packed
as proto3 writes them and read packed or not); a class with any other kind (maps, oneofs,
optional fields, repeated doubles or floats, a single nested message) keeps betterproto2's
own codec.
Encoding writes fields in betterproto2's order and skips the same defaults, so both produce the
same bytes; decoding skips unknown fields and refuses a malformed message with one error line.
Pure functions but for the grpclib codec class at the end.
"""

from __future__ import annotations

import importlib
import importlib.util
import struct
from collections.abc import Callable
from typing import Any, TypeVar

import betterproto2
from grpclib.encoding.proto import ProtoCodec

__all__ = ["FastCodec", "WireError", "decoder_for", "encoder_for"]

Encoder = Callable[[Any], bytes]
Decoder = Callable[[bytes], Any]
_Codec = TypeVar("_Codec", Encoder, Decoder)

_VARINT, _FIXED64, _LENGTH, _FIXED32 = 0, 1, 2, 5
_WIRE = {
    "string": _LENGTH,
    "bytes": _LENGTH,
    "message": _LENGTH,
    "int32": _VARINT,
    "int64": _VARINT,
    "uint32": _VARINT,
    "uint64": _VARINT,
    "bool": _VARINT,
    "double": _FIXED64,
    "float": _FIXED32,
}
_REPEATABLE = {"string", "bytes", "message"}
_DOUBLE = struct.Struct("<d")
_FLOAT = struct.Struct("<f")


class WireError(ValueError):
    """A message that is not valid protobuf for its type."""


def _varint(value: int) -> bytes:
    if 0 <= value < 0x80:
        return bytes((value,))
    if value < 0:
        value += 1 << 64  # negative integers: ten bytes, two's complement
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data):
            raise WireError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise WireError("varint longer than ten bytes")


def _fields(
    cls: type, compiled: Callable[[type], _Codec | None]
) -> list[tuple[str, betterproto2.FieldMetadata, _Codec | None]] | None:
    """The fields of a message class in betterproto2's order, each with the ``compiled`` code
    of its nested message class; None if one is of a kind this codec leaves to betterproto2."""
    meta = cls._betterproto  # type: ignore[attr-defined]
    fields = []
    for name, field in meta.meta_by_field_name.items():
        plain = field.map_meta is None and field.group is None and field.unwrap is None
        if not plain or field.optional or field.proto_type not in _WIRE:
            return None
        if field.repeated and _WIRE[field.proto_type] in (_FIXED64, _FIXED32):
            return None  # repeated doubles or floats: none in our protocol
        if not field.repeated and field.proto_type == "message":
            return None  # a single nested message (None and empty differ)
        nested = None
        if field.proto_type == "message":
            nested = compiled(meta.cls_by_field[name])
            if nested is None:
                return None
        fields.append((name, field, nested))
    return fields


_encoders: dict[type, Encoder | None] = {}
_decoders: dict[type, Decoder | None] = {}


def encoder_for(cls: type) -> Encoder | None:
    """The compiled encoder of a message class (None: betterproto2 must encode it)."""
    if cls not in _encoders:
        _encoders[cls] = None  # a message that contains itself is left to betterproto2
        _encoders[cls] = _compile_encoder(cls)
    return _encoders[cls]


def decoder_for(cls: type) -> Decoder | None:
    """The compiled decoder of a message class (None: betterproto2 must decode it)."""
    if cls not in _decoders:
        _decoders[cls] = None
        _decoders[cls] = _compile_decoder(cls)
    return _decoders[cls]


def _compile_encoder(cls: type) -> Encoder | None:
    fields = _fields(cls, encoder_for)
    if fields is None:
        return None
    plan: list[tuple[str, bytes, str, bool, Encoder | None]] = []
    for name, field, nested in fields:
        wire = _LENGTH if field.repeated else _WIRE[field.proto_type]
        tag = _varint((field.number << 3) | wire)
        plan.append((name, tag, field.proto_type, bool(field.repeated), nested))

    def encode(message: Any) -> bytes:
        out: list[bytes] = []
        put = out.append
        for name, tag, kind, repeated, nested in plan:
            value = getattr(message, name)
            if not value:  # the default (0, "", b"", False, 0.0, []) is not written
                continue
            if repeated and kind not in _REPEATABLE:  # numbers, packed in one field
                packed = _packed(value)
                put(tag)
                put(_varint(len(packed)))
                put(packed)
            elif repeated:
                for item in value:
                    if nested is not None:
                        item = nested(item)
                    elif kind == "string":
                        item = item.encode()
                    put(tag)
                    put(_varint(len(item)))
                    put(item)
            elif kind == "string":
                raw = value.encode()
                put(tag)
                put(_varint(len(raw)))
                put(raw)
            elif kind == "bytes":
                put(tag)
                put(_varint(len(value)))
                put(value)
            elif kind == "double":
                put(tag)
                put(_DOUBLE.pack(value))
            elif kind == "float":
                put(tag)
                put(_FLOAT.pack(value))
            else:  # integers and bools
                put(tag)
                put(_varint(int(value)))
        return b"".join(out)

    return encode


def _packed(values: list[Any]) -> bytes:
    return b"".join(_varint(int(v)) for v in values)


def _unpacked(what: str, name: str, data: bytes) -> list[int]:
    """The varints of a packed field."""
    raws = []
    pos = 0
    try:
        while pos < len(data):
            raw, pos = _read_varint(data, pos)
            raws.append(raw)
    except WireError as exc:
        raise WireError(f"{what}: packed field {name}: {exc}") from None
    return raws


def _signed(value: int, bits: int) -> int:
    value &= (1 << 64) - 1
    if value >= 1 << 63:
        value -= 1 << 64
    if bits == 32:  # int32 keeps its low 32 bits, sign included
        value = (value + (1 << 31)) % (1 << 32) - (1 << 31)
    return value


def _number(kind: str, raw: Any) -> Any:
    """A number field's value from its raw wire value."""
    if kind == "double":
        return _DOUBLE.unpack(raw)[0]
    if kind == "float":
        return _FLOAT.unpack(raw)[0]
    if kind == "bool":
        return raw != 0
    if kind == "int64":
        return _signed(raw, 64)
    if kind == "int32":
        return _signed(raw, 32)
    if kind == "uint32":
        return raw & 0xFFFFFFFF
    return raw & 0xFFFFFFFFFFFFFFFF


def _compile_decoder(cls: type) -> Decoder | None:
    fields = _fields(cls, decoder_for)
    if fields is None:
        return None
    by_number: dict[int, tuple[str, str, int, bool, Decoder | None]] = {}
    for name, field, nested in fields:
        wire = _WIRE[field.proto_type]
        by_number[field.number] = (name, field.proto_type, wire, bool(field.repeated), nested)
    what = cls.__name__
    # What the generated __init__ would set, without its per-field factories: the defaults of
    # the scalars (immutable, shared), a new list per repeated field, no unknown fields.
    defaults = cls._betterproto.default_gen  # type: ignore[attr-defined]
    scalars = {name: defaults[name]() for name, field, _ in fields if not field.repeated}
    lists = [name for name, field, _ in fields if field.repeated]
    new = object.__new__

    def build(values: dict[str, Any]) -> Any:
        message: Any = new(cls)
        state = message.__dict__
        state.update(scalars)
        for name in lists:
            state[name] = []
        state.update(values)
        state["_unknown_fields"] = b""
        return message

    def decode(data: bytes) -> Any:
        values: dict[str, Any] = {}
        raw: Any
        pos, end = 0, len(data)
        while pos < end:
            key, pos = _read_varint(data, pos)
            number, wire = key >> 3, key & 7
            if wire == _VARINT:
                raw, pos = _read_varint(data, pos)
            elif wire == _LENGTH:
                size, pos = _read_varint(data, pos)
                raw, pos = data[pos : pos + size], pos + size
            elif wire == _FIXED64:
                raw, pos = data[pos : pos + 8], pos + 8
            elif wire == _FIXED32:
                raw, pos = data[pos : pos + 4], pos + 4
            else:
                raise WireError(f"{what}: field {number} has unknown wire type {wire}")
            if pos > end:
                raise WireError(f"{what}: field {number} runs past the end of the message")
            field = by_number.get(number)
            if field is None:
                continue  # an unknown field: skipped
            name, kind, expected, repeated, nested = field
            if repeated and wire == _LENGTH and expected != _LENGTH:  # packed numbers
                for one in _unpacked(what, name, raw):
                    values.setdefault(name, []).append(_number(kind, one))
                continue
            if wire != expected:
                raise WireError(f"{what}: field {name} has wire type {wire}, not {expected}")
            if nested is not None:
                value: Any = nested(raw)
            elif kind == "string":
                try:
                    value = raw.decode()
                except UnicodeDecodeError as exc:
                    raise WireError(f"{what}: field {name} is not UTF-8: {exc}") from None
            elif kind == "bytes":
                value = bytes(raw)
            else:
                value = _number(kind, raw)
            if repeated:
                values.setdefault(name, []).append(value)
            else:
                values[name] = value
        return build(values)

    return decode


class FastCodec(ProtoCodec):
    """grpclib's protobuf codec, with the compiled encoder and decoder of each message class
    that has them."""

    def __init__(self) -> None:
        _import_pydantic_dataclasses()

    def encode(self, message: Any, message_type: Any) -> bytes:
        if not isinstance(message, message_type):
            raise TypeError(f"message must be of type {message_type!r}, not {type(message)!r}")
        encode = encoder_for(message_type)
        return encode(message) if encode is not None else super().encode(message, message_type)

    def decode(self, data: bytes, message_type: Any) -> Any:
        decode = decoder_for(message_type)
        return decode(data) if decode is not None else super().decode(data, message_type)


_imported = False


def _import_pydantic_dataclasses() -> None:
    """betterproto2 asks ``pydantic.dataclasses``, when pydantic is installed, whether a
    message class is a pydantic dataclass the first time it encodes a message; that first
    question imports the module, which takes about 0.1 s. A codec is made when a channel or a
    server opens: the import happens then, not inside the first call that betterproto2
    encodes (measured: the first `StartWorkflows` answer took 0.1 s more than the next)."""
    global _imported
    if not _imported:
        _imported = True
        if importlib.util.find_spec("pydantic") is not None:
            importlib.import_module("pydantic.dataclasses")
