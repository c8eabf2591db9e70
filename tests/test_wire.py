"""The wire format: round trips, one test per validation rule, and fuzzing."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gossip_sgp import wire
from gossip_sgp.errors import WireError
from gossip_sgp.message import Message, MessageKind

RANK, WORLD, FP = 1, 4, 0x1234_5678_9ABC
LIMIT = 1 << 20


def message(*tensors: torch.Tensor, **fields: Any) -> Message:
    base: dict[str, Any] = dict(
        sender=2,
        receiver=RANK,
        round=7,
        seq=3,
        weight=1 / 3,
        fingerprint=FP,
        sent_at=1.5e9,
        gauge=-0.25,
    )
    return Message(tensors=tensors, **{**base, **fields})


def decode(frames: list[Any], **kw: Any) -> Message:
    args: dict[str, Any] = dict(rank=RANK, world_size=WORLD, fingerprint=FP, max_bytes=LIMIT)
    return wire.decode(frames, **{**args, **kw})


def writable(frames: list[bytes | memoryview]) -> list[bytes | bytearray | memoryview]:
    """What a receiver gets: the header as bytes, payloads as writable buffers."""
    return [bytes(frames[0]), *(bytearray(f) for f in frames[1:])]


def sample(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    if dtype.is_floating_point:
        return torch.randn(shape).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, shape, dtype=dtype)


def assert_same(got: Message, sent: Message) -> None:
    """Every field of the message arrived exactly; a new Message field fails here first."""
    for field in dataclasses.fields(Message):
        if field.name != "tensors":
            assert getattr(got, field.name) == getattr(sent, field.name), field.name
    assert len(got.tensors) == len(sent.tensors)
    for a, b in zip(got.tensors, sent.tensors, strict=True):
        assert a.dtype == b.dtype
        assert a.shape == b.shape
        assert a.reshape(-1).view(torch.uint8).equal(b.reshape(-1).view(torch.uint8))


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("name", sorted(wire.DTYPES))
@pytest.mark.parametrize("copy", [False, True], ids=["zero-copy", "read-only"])
def test_round_trip_every_dtype(name: str, copy: bool) -> None:
    sent = message(sample(wire.DTYPES[name], (3, 5)), sample(wire.DTYPES[name], (17,)))
    frames = wire.encode(sent)
    received = [bytes(f) for f in frames] if copy else writable(frames)
    assert_same(decode(received), sent)


def test_round_trip_mixed_tensors_and_fields() -> None:
    sent = message(
        torch.randn(4, 3).t(),  # not contiguous
        torch.empty(0),
        torch.empty(2, 0, 3, dtype=torch.int64),
        torch.tensor(2.5, dtype=torch.float64),  # 0-dim
        torch.arange(10, dtype=torch.bfloat16),
        codec="int8-block",
        incarnation=(1 << 63) - 1,
        raw_bytes=0,
        seq=(1 << 63) - 1,
        weight=5e-324,  # the smallest positive float is still a valid weight
    )
    assert_same(decode(writable(wire.encode(sent))), sent)


def test_no_tensors() -> None:
    sent = message()
    assert_same(decode(wire.encode(sent)), sent)


def test_payload_is_zero_copy_when_buffer_is_writable_and_aligned() -> None:
    sent = message(torch.arange(1024, dtype=torch.float32))
    frames = writable(wire.encode(sent))
    got = decode(frames)
    got.tensors[0][0] = 42.0
    assert torch.frombuffer(frames[1], dtype=torch.float32)[0] == 42.0


def test_misaligned_buffer_is_copied() -> None:
    backing = bytearray(4 * 16 + 1)
    view = memoryview(backing)[1:]
    view[:] = torch.arange(16, dtype=torch.float32).numpy().tobytes()
    header = wire.encode(message(torch.zeros(16)))[0]
    got = decode([header, view])
    assert got.tensors[0].data_ptr() % 4 == 0
    assert got.tensors[0].equal(torch.arange(16, dtype=torch.float32))


def test_encode_frames_alias_the_tensor() -> None:
    tensor = torch.arange(8, dtype=torch.float32)
    frames = wire.encode(message(tensor))
    assert isinstance(frames[1], memoryview)
    del tensor  # the frame keeps the storage alive
    assert bytes(frames[1]) == torch.arange(8, dtype=torch.float32).numpy().tobytes()


def test_fingerprint_none_accepts_any_model() -> None:
    sent = message(torch.ones(2), fingerprint=99)
    assert decode(wire.encode(sent), fingerprint=None).fingerprint == 99


def test_float16_sum_overflow_is_not_non_finite() -> None:
    sent = message(torch.full((100,), 60000.0, dtype=torch.float16))
    assert_same(decode(writable(wire.encode(sent))), sent)


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (message(torch.ones(2, dtype=torch.bool)), "bad_dtype"),
        (message(torch.ones(2, dtype=torch.complex64)), "bad_dtype"),
        (message(torch.ones(2), weight=0.0), "bad_weight"),
        (message(torch.ones(2), weight=math.nan), "bad_weight"),
        (message(torch.ones([1] * 9)), "malformed"),
        (message(torch.ones(2), gauge=math.nan), "malformed"),
    ],
)
def test_encode_refuses_what_decode_would_reject(bad: Message, reason: str) -> None:
    with pytest.raises(WireError) as info:
        wire.encode(bad)
    assert info.value.reason == reason


OPTIONAL_FIELDS: dict[str, Any] = {
    "incarnation": 7,
    "to_incarnation": 0,
    "skip": True,
    "never": True,
    "audit": (3, 9),
    "join": True,
    "refused": True,
    "answer": True,
    "raw_bytes": 24,
    "ref": 0,
    "key": True,
    "adpsgd": 2,
    "steps": 12345,
}
"""A value other than the default for every optional header field of ``Message``."""


def test_every_optional_header_field_crosses_the_wire_and_defaults_cost_nothing() -> None:
    required = {"sender", "receiver", "round", "seq", "weight", "tensors", "fingerprint"}
    required |= {"sent_at", "kind", "codec", "gauge"}
    assert {f.name for f in dataclasses.fields(Message)} - required == OPTIONAL_FIELDS.keys()
    sent = message(torch.ones(2, 3), **OPTIONAL_FIELDS)
    got = decode(writable(wire.encode(sent)))
    assert_same(got, sent)
    assert msgpack.unpackb(wire.encode(message())[0])["meta"] == {}
    for name, value in OPTIONAL_FIELDS.items():  # each alone, too
        assert getattr(decode(writable(wire.encode(message(**{name: value})))), name) == value


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("incarnation", -1),
        ("ref", 1 << 63),
        ("audit", (-1, 3)),
        ("adpsgd", 3),
        ("raw_bytes", 1.0),
        ("steps", -2),
        ("steps", (1 << 53) + 1),
    ],
)
def test_a_header_field_out_of_range_is_refused_by_the_sender_too(field: str, value: Any) -> None:
    with pytest.raises(WireError) as info:
        wire.encode(message(**{field: value}))
    assert info.value.reason == "malformed"


@pytest.mark.parametrize("kind", [MessageKind.HEARTBEAT, MessageKind.JOIN])
def test_heartbeat_and_join_round_trip_and_rules(kind: MessageKind) -> None:
    beat = message(weight=0.0, kind=kind, skip=True, incarnation=1 << 62, round=7)
    got = wire.decode(
        wire.encode(beat), rank=RANK, world_size=WORLD, fingerprint=FP, max_bytes=LIMIT
    )
    assert (got.kind, got.weight, got.tensors, got.skip, got.incarnation, got.round) == (
        kind,
        0.0,
        (),
        True,
        1 << 62,
        7,
    )
    for bad in (
        message(weight=0.5, kind=kind),
        message(torch.ones(2), weight=0.0, kind=kind),
    ):
        with pytest.raises(WireError) as info:
            wire.encode(bad)
        assert info.value.reason == "bad_weight"


# ------------------------------------------------------------------ one test per rule


def valid_frames() -> tuple[dict[str, Any], list[bytes]]:
    frames = wire.encode(message(torch.ones(2, 3), torch.arange(4, dtype=torch.int32)))
    return msgpack.unpackb(frames[0]), [bytes(f) for f in frames]


def with_header(change: Callable[[dict[str, Any]], Any]) -> list[bytes]:
    header, frames = valid_frames()
    result = change(header)
    header = header if result is None else result
    return [msgpack.packb(header), *frames[1:]]


def setter(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda h: h.__setitem__(key, value)


HEADER_CASES: list[tuple[str, Callable[[dict[str, Any]], Any], str]] = [
    ("not a map", lambda h: [1, 2], "malformed"),
    ("no version", lambda h: h.pop("v") and None, "malformed"),
    ("version as str", setter("v", "1"), "malformed"),
    ("another version", setter("v", wire.PROTOCOL_VERSION + 1), "version"),
    ("an older version", setter("v", wire.PROTOCOL_VERSION - 1), "version"),
    ("version 0", setter("v", 0), "version"),
    ("extra key", setter("extra", 1), "malformed"),
    ("missing key", lambda h: h.pop("seq") and None, "malformed"),
    ("unknown kind", setter("kind", 99), "malformed"),
    ("kind as float", setter("kind", 0.0), "malformed"),
    ("sender is self", setter("sender", RANK), "unknown_sender"),
    ("sender too large", setter("sender", WORLD), "unknown_sender"),
    ("sender negative", setter("sender", -1), "unknown_sender"),
    ("sender as bool", setter("sender", True), "malformed"),
    ("sender as str", setter("sender", "2"), "malformed"),
    ("other receiver", setter("receiver", 3), "wrong_receiver"),
    ("receiver as None", setter("receiver", None), "malformed"),
    ("other model", setter("fingerprint", FP + 1), "wrong_model"),
    ("fingerprint negative", setter("fingerprint", -1), "malformed"),
    ("weight zero", setter("weight", 0.0), "bad_weight"),
    ("weight negative", setter("weight", -0.5), "bad_weight"),
    ("weight nan", setter("weight", math.nan), "bad_weight"),
    ("weight inf", setter("weight", math.inf), "bad_weight"),
    ("weight as int", setter("weight", 1), "bad_weight"),
    ("weight as str", setter("weight", "0.5"), "bad_weight"),
    ("weight over the world size", setter("weight", WORLD * 1.001), "bad_weight"),
    ("weight 1e308", setter("weight", 1e308), "bad_weight"),
    ("round negative", setter("round", -1), "malformed"),
    ("round too large", setter("round", 1 << 63), "malformed"),
    ("seq as float", setter("seq", 3.0), "malformed"),
    ("sent_at nan", setter("sent_at", math.nan), "malformed"),
    ("sent_at as int", setter("sent_at", 5), "malformed"),
    ("gauge inf", setter("gauge", -math.inf), "malformed"),
    ("gauge as None", setter("gauge", None), "malformed"),
    ("codec empty", setter("codec", ""), "malformed"),
    ("codec too long", setter("codec", "x" * 65), "malformed"),
    ("codec as int", setter("codec", 5), "malformed"),
    ("meta as list", setter("meta", []), "malformed"),
    ("meta unknown key", setter("meta", {"block": 1}), "malformed"),
    ("meta str value", setter("meta", {"skip": "b"}), "malformed"),
    ("meta float value", setter("meta", {"ref": 1.5}), "malformed"),
    ("meta bool value", setter("meta", {"raw_bytes": True}), "malformed"),
    ("meta flag of 2", setter("meta", {"key": 2}), "malformed"),
    ("meta negative number", setter("meta", {"incarnation": -1}), "malformed"),
    ("meta number too large", setter("meta", {"to_incarnation": 1 << 63}), "malformed"),
    ("meta half an audit", setter("meta", {"audit_from": 3}), "malformed"),
    ("meta adpsgd of 3", setter("meta", {"adpsgd": 3}), "malformed"),
    ("meta too many", setter("meta", {str(i): i for i in range(33)}), "malformed"),
    ("meta bytes key", setter("meta", {b"k": 1}), "malformed"),
    ("tensors not list", setter("tensors", {}), "malformed"),
    ("fewer specs than frames", lambda h: h["tensors"].pop() and None, "malformed"),
    ("more specs than frames", lambda h: h["tensors"].append(["uint8", [0]]), "malformed"),
    ("spec not a pair", lambda h: h["tensors"].__setitem__(0, ["float32"]), "malformed"),
    ("dtype bool", lambda h: h["tensors"][0].__setitem__(0, "bool"), "bad_dtype"),
    ("dtype object", lambda h: h["tensors"][0].__setitem__(0, "object"), "bad_dtype"),
    ("dtype as int", lambda h: h["tensors"][0].__setitem__(0, 5), "malformed"),
    ("shape negative", lambda h: h["tensors"][0].__setitem__(1, [-2, -3]), "malformed"),
    ("shape as str", lambda h: h["tensors"][0].__setitem__(1, "6"), "malformed"),
    ("shape 9 dims", lambda h: h["tensors"][0].__setitem__(1, [1] * 9), "malformed"),
    ("shape bigger than frame", lambda h: h["tensors"][0].__setitem__(1, [3, 3]), "size_mismatch"),
    ("dtype wider than frame", lambda h: h["tensors"][1].__setitem__(0, "int64"), "size_mismatch"),
    ("shape over the limit", lambda h: h["tensors"][0].__setitem__(1, [1 << 40]), "oversized"),
]


@pytest.mark.parametrize(
    ("change", "reason"), [c[1:] for c in HEADER_CASES], ids=[c[0] for c in HEADER_CASES]
)
def test_header_rule(change: Callable[[dict[str, Any]], Any], reason: str) -> None:
    with pytest.raises(WireError) as info:
        decode(with_header(change))
    assert info.value.reason == reason
    assert reason in wire.REJECT_REASONS


@pytest.mark.parametrize(
    ("frames", "reason"),
    [
        ([], "malformed"),
        ([b""], "malformed"),
        ([b"\xc1"], "malformed"),  # a byte msgpack never uses
        ([b"\x81\xa1v\x01trailing"], "malformed"),
        ([b"\x80" * (wire.MAX_HEADER_BYTES + 1)], "oversized"),
        ([msgpack.packb({"v": 1, "x": b"bin"})], "malformed"),  # bin is never allowed
        ([msgpack.packb(list(range(2000)))], "malformed"),  # array over the limit
        ([b"\x00"] * (wire.MAX_TENSORS + 2), "malformed"),
        ([msgpack.packb({"v": 1}), object()], "malformed"),  # not a buffer
    ],
)
def test_frame_rule(frames: list[Any], reason: str) -> None:
    with pytest.raises(WireError) as info:
        decode(frames)
    assert info.value.reason == reason


def test_payload_size_rules() -> None:
    _, frames = valid_frames()
    for payload in (frames[1][:-1], frames[1] + b"\0", b""):
        with pytest.raises(WireError, match="size_mismatch"):
            decode([frames[0], payload, frames[2]])
    with pytest.raises(WireError, match="oversized"):
        decode(frames, max_bytes=len(frames[1]) + len(frames[2]) - 1)
    decode(frames, max_bytes=len(frames[1]) + len(frames[2]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_payload_is_rejected(dtype: torch.dtype, bad: float) -> None:
    tensor = torch.ones(1000, dtype=dtype)
    tensor[567] = bad
    with pytest.raises(WireError) as info:
        decode(writable(wire.encode(message(torch.ones(3), tensor))))
    assert info.value.reason == "non_finite"


# -------------------------------------------------------------------------------- fuzzing

msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def check_decoded(frames: list[bytes], **kw: Any) -> None:
    """Decoding ``frames`` raises WireError or yields exactly what the header says."""
    try:
        got = decode(frames, **kw)
    except WireError as exc:
        reason = exc.reason
        assert reason in wire.REJECT_REASONS
        return
    header = msgpack.unpackb(frames[0])
    for key in ("sender", "receiver", "round", "seq", "weight", "fingerprint", "sent_at", "gauge"):
        assert getattr(got, key) == header[key]
    assert (int(got.kind), got.codec) == (header["kind"], header["codec"])
    # What the header said, less what says nothing: a flag of 0, incarnation 0 (defaults).
    silent = {"skip", "never", "join", "refused", "answer", "key", "incarnation"}
    assert wire.meta(got) == {k: v for k, v in header["meta"].items() if v or k not in silent}
    assert len(got.tensors) == len(header["tensors"]) == len(frames) - 1
    for tensor, (name, shape), frame in zip(
        got.tensors, header["tensors"], frames[1:], strict=True
    ):
        assert tensor.dtype == wire.DTYPES[name]
        assert list(tensor.shape) == shape
        assert tensor.reshape(-1).view(torch.uint8).numpy().tobytes() == bytes(frame)


@FUZZ
@given(st.lists(st.binary(max_size=64), max_size=5))
def test_fuzz_random_frames(frames: list[bytes]) -> None:
    check_decoded(frames)


@FUZZ
@given(msgpack_values, st.lists(st.binary(max_size=64), max_size=3))
def test_fuzz_random_msgpack_header(header: Any, payload: list[bytes]) -> None:
    check_decoded([msgpack.packb(header), *payload])


@FUZZ
@given(st.data())
def test_fuzz_flipped_header_bytes(data: st.DataObject) -> None:
    _, frames = valid_frames()
    header = bytearray(frames[0])
    for i in data.draw(st.lists(st.integers(0, len(header) - 1), min_size=1, max_size=4)):
        header[i] ^= data.draw(st.integers(1, 255))
    check_decoded([bytes(header), *frames[1:]])


@FUZZ
@given(st.data())
def test_fuzz_replaced_header_field(data: st.DataObject) -> None:
    header, frames = valid_frames()
    key = data.draw(st.sampled_from(sorted(header)))
    header[key] = data.draw(msgpack_values)
    check_decoded(
        [msgpack.packb(header), *frames[1:]], fingerprint=data.draw(st.none() | st.just(FP))
    )


def test_weight_of_the_whole_job_passes() -> None:
    sent = message(torch.ones(2), weight=float(WORLD))  # a worker holding all the mass
    assert decode(writable(wire.encode(sent))).weight == WORLD


def test_an_empty_tensor_with_overflowing_strides_is_a_wire_error() -> None:
    """``torch.empty((0, 2**31, 2**31, 2**31))`` raises RuntimeError (its strides overflow):
    such a message passed every check and raised it out of decode, stopping the worker."""
    header, frames = valid_frames()
    header["tensors"][0][1] = [0, 1 << 31, 1 << 31, 1 << 31]
    with pytest.raises(WireError) as info:
        decode([msgpack.packb(header), b"", *frames[2:]])
    assert info.value.reason == "oversized"


dims = st.sampled_from([0, 1, 2, 3]) | st.integers(0, (1 << 63) - 1)


@FUZZ
@given(st.data())
def test_fuzz_well_formed_headers_with_any_shapes(data: st.DataObject) -> None:
    """Headers that pass every field check, tensors of any dtype and shape, each frame the
    size its spec claims (when that is small): decode builds them or raises WireError."""
    header, _ = valid_frames()
    specs, payload = [], []
    for _ in range(data.draw(st.integers(1, 3))):
        name = data.draw(st.sampled_from(sorted(wire.DTYPES)))
        shape = data.draw(st.lists(dims, max_size=wire.MAX_DIMS))
        specs.append([name, shape])
        payload.append(bytes(min(math.prod(shape) * wire.DTYPES[name].itemsize, 256)))
    header["tensors"] = specs
    check_decoded([msgpack.packb(header), *payload])


@FUZZ
@given(st.data())
def test_fuzz_resized_payload(data: st.DataObject) -> None:
    _, frames = valid_frames()
    i = data.draw(st.integers(1, len(frames) - 1))
    cut = data.draw(st.integers(0, len(frames[i])))
    frames[i] = frames[i][:cut] + data.draw(st.binary(max_size=16))
    check_decoded(frames)
