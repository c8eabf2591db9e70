"""The wire format: a :class:`~gossip_sgp.message.Message` as a list of frames, and back.

Frame 0 is a small msgpack map (the header); frame ``1 + i`` is the raw bytes of tensor ``i``
(C order, the host's byte order: little-endian wherever PyTorch runs). Nothing that crosses
the network is ever unpickled or executed. :func:`decode` checks every header field, and the
size of every frame against the header, before it reads a single payload byte; anything
invalid raises :class:`~gossip_sgp.errors.WireError` with one of :data:`REJECT_REASONS`.
The format, its limits and the reasons are documented in ``docs/wire-format.md``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import msgpack
import torch

from gossip_sgp.errors import WireError
from gossip_sgp.message import Message, MessageKind

__all__ = [
    "DTYPES",
    "MAX_HEADER_BYTES",
    "PROTOCOL_VERSION",
    "REJECT_REASONS",
    "FrameBuffer",
    "all_finite",
    "decode",
    "encode",
    "meta",
    "tensor_spec",
]

PROTOCOL_VERSION = 2
"""Bumped on any incompatible change of the header or the frame layout."""

REJECT_REASONS = (
    "malformed",
    "version",
    "oversized",
    "unknown_sender",
    "wrong_receiver",
    "wrong_model",
    "bad_weight",
    "bad_dtype",
    "size_mismatch",
    "non_finite",
    "bad_codec",
    "no_reference",
    "stale",
    "full",
    "ahead",
)
"""Every ``WireError.reason`` that :func:`decode` and the codec decoders
(:mod:`gossip_sgp.compression`: ``bad_codec`` for an unknown codec, ``no_reference`` for a
difference-coded message out of sequence; the mailbox ``stale`` for a message from an
earlier incarnation of a restarted sender; ``full`` and ``ahead`` when the mailbox has no
room for a round ahead, see ``Mailbox.admit``) can raise:
the rejected-messages labels."""

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
}
"""Tensor dtypes allowed on the wire, by their name in the header."""

MAX_HEADER_BYTES = 64 * 1024
"""Largest header frame; checked before msgpack sees a byte."""
MAX_TENSORS = 1024
MAX_DIMS = 8
MAX_META = 32
MAX_STR = 64
"""Header limits: tensors per message, dimensions per tensor, meta entries, string length."""
MAX_STEPS = 1 << 53
"""Largest ``Message.steps``: every step count up to it is exact in a double."""
_WEIGHT_SLACK = 1.0 + 1e-9
"""Rounding room above the world size: the weights of a job add up to ``n`` up to rounding."""
_INT64 = (-(1 << 63), (1 << 63) - 1)
_UINT63 = (0, (1 << 63) - 1)
_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
_KINDS = frozenset(int(kind) for kind in MessageKind)
_KEYS = frozenset(
    {"v", "kind", "sender", "receiver", "round", "seq", "weight", "fingerprint", "sent_at"}
    | {"codec", "gauge", "meta", "tensors"}
)

_FLAGS = ("skip", "never", "join", "refused", "answer", "key")
"""Optional header fields that are booleans: 1 on the wire when set, left out when not."""
_NUMBERS = ("incarnation", "to_incarnation", "raw_bytes", "ref")
"""Optional header fields that are integers in 0..2**63-1, left out at their default."""
_META_KEYS = frozenset({*_FLAGS, *_NUMBERS, "audit_from", "audit_to", "adpsgd", "steps"})
"""Every key the ``meta`` map may hold; anything else is ``malformed``."""

FrameBuffer = bytes | bytearray | memoryview
"""One received frame, e.g. ``zmq.Frame.buffer`` (any buffer-protocol object works)."""


def encode(message: Message) -> list[bytes | memoryview]:
    """The frames of ``message``: the msgpack header, then one zero-copy view per tensor.

    The payload frames alias the tensors' memory (a ``memoryview`` over a numpy view that keeps
    the tensor alive), so the tensors must not be written to while the frames are in use; the
    :class:`~gossip_sgp.message.Message` ownership rule guarantees that. Non-contiguous tensors
    are copied to contiguous ones; CUDA tensors are copied to the CPU here (a blocking
    device-to-host copy; pinned staging buffers are future work). dtypes without a numpy
    equivalent (bfloat16) travel as their raw bytes.
    """
    weight = float(message.weight)
    _check_weight(message.kind, weight, len(message.tensors))
    if not math.isfinite(message.sent_at) or not math.isfinite(message.gauge):
        raise WireError("malformed", f"sent_at {message.sent_at!r}, gauge {message.gauge!r}")
    if len(message.tensors) > MAX_TENSORS:
        raise WireError("malformed", f"{len(message.tensors)} tensors > {MAX_TENSORS}")
    specs: list[list[Any]] = []
    payload: list[bytes | memoryview] = []
    for tensor in message.tensors:
        name = _DTYPE_NAMES.get(tensor.dtype)
        if name is None:
            raise WireError("bad_dtype", f"{tensor.dtype} cannot go on the wire")
        if tensor.dim() > MAX_DIMS:
            raise WireError("malformed", f"tensor of {tensor.dim()} dims > {MAX_DIMS}")
        specs.append([name, list(tensor.shape)])
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        payload.append(flat.view(torch.uint8).numpy().data)  # the view keeps the tensor alive
    return [_header(message, weight, specs), *payload]


def _check_weight(kind: int, weight: float, n_tensors: int, world_size: int | None = None) -> None:
    """MASS carries a finite weight > 0 (at most the world size, the job's whole weight, when
    known); the other kinds carry weight 0 and no tensors."""
    if kind != MessageKind.MASS:
        if weight != 0.0 or n_tensors:
            raise WireError("bad_weight", f"a {MessageKind(kind).name} has weight 0, no tensors")
    elif not math.isfinite(weight) or weight <= 0.0:
        raise WireError("bad_weight", f"weight {weight!r} is not a finite float > 0")
    elif world_size is not None and weight > world_size * _WEIGHT_SLACK:
        raise WireError("bad_weight", f"weight {weight!r} exceeds the job's {world_size}")


def _header(message: Message, weight: float, specs: list[list[Any]]) -> bytes:
    """The packed header; ``specs`` holds ``[dtype name, shape]`` per tensor."""
    header = {
        "v": PROTOCOL_VERSION,
        "kind": int(message.kind),
        "sender": message.sender,
        "receiver": message.receiver,
        "round": message.round,
        "seq": message.seq,
        "weight": weight,
        "fingerprint": message.fingerprint,
        "sent_at": float(message.sent_at),
        "codec": message.codec,
        "gauge": float(message.gauge),
        "meta": meta(message),
        "tensors": specs,
    }
    packed: bytes = msgpack.packb(header, use_bin_type=True)
    if len(packed) > MAX_HEADER_BYTES:
        raise WireError("oversized", f"header of {len(packed)} bytes > {MAX_HEADER_BYTES}")
    return packed


def meta(message: Message) -> dict[str, int]:
    """The header's ``meta`` map of ``message``: its optional fields (``incarnation`` and
    the ones after it) that differ from their defaults, as integers."""
    out = {}
    for name in _FLAGS:
        flag = getattr(message, name)
        if type(flag) is not bool:
            raise WireError("malformed", f"header field {name} = {flag!r} is not a bool")
        if flag:
            out[name] = 1
    defaults = {"incarnation": 0}
    for name in _NUMBERS:
        value = getattr(message, name)
        if value is not None and value != defaults.get(name):
            out[name] = _checked(name, value, *_UINT63)
    if message.audit is not None:
        first, last = message.audit
        out["audit_from"] = _checked("audit_from", first, *_UINT63)
        out["audit_to"] = _checked("audit_to", last, *_UINT63)
    if message.adpsgd:
        out["adpsgd"] = _checked("adpsgd", message.adpsgd, 1, 2)
    if message.steps:
        out["steps"] = _checked("steps", message.steps, 0, MAX_STEPS)
    return out


def _checked(name: str, value: Any, lo: int, hi: int) -> int:
    """``value`` if it is an int (not a bool) in ``[lo, hi]``; else ``malformed``."""
    if type(value) is not int or not lo <= value <= hi:
        raise WireError("malformed", f"{name} {value!r} is not an integer in [{lo}, {hi}]")
    return value


def _fields(meta: Any) -> dict[str, Any]:
    """The ``Message`` keyword arguments of a received ``meta`` map, every value checked."""
    if type(meta) is not dict or not meta.keys() <= _META_KEYS:
        keys = sorted(meta, key=str) if type(meta) is dict else type(meta).__name__
        raise WireError("malformed", f"meta {keys} (known: {sorted(_META_KEYS)})")
    fields: dict[str, Any] = {}
    for name in _FLAGS:
        if name in meta:
            fields[name] = bool(_checked(name, meta[name], 0, 1))
    for name in _NUMBERS:
        if name in meta:
            fields[name] = _checked(name, meta[name], *_UINT63)
    if ("audit_from" in meta) != ("audit_to" in meta):
        raise WireError("malformed", "audit_from and audit_to come together")
    if "audit_from" in meta:
        audit = _checked("audit_from", meta["audit_from"], *_UINT63)
        fields["audit"] = (audit, _checked("audit_to", meta["audit_to"], *_UINT63))
    if "adpsgd" in meta:
        fields["adpsgd"] = _checked("adpsgd", meta["adpsgd"], 1, 2)
    if "steps" in meta:
        fields["steps"] = _checked("steps", meta["steps"], 0, MAX_STEPS)
    return fields


def decode(
    frames: Sequence[FrameBuffer],
    *,
    rank: int,
    world_size: int,
    fingerprint: int | None,
    max_bytes: int,
) -> Message:
    """Validate ``frames`` received by ``rank`` and rebuild the message; raise ``WireError``.

    ``fingerprint=None`` accepts any model fingerprint (the caller checks it later).

    Payload tensors alias the frame buffers when those are writable and aligned (zero-copy
    for ``zmq.Frame``), otherwise they are copies. Float payloads holding NaN or infinity are
    rejected (``non_finite``): one such share would poison the receiver's model for good.
    """
    if not 1 <= len(frames) <= MAX_TENSORS + 1:
        raise WireError("malformed", f"{len(frames)} frames")
    views = [_bytes_view(frame) for frame in frames]
    if views[0].nbytes > MAX_HEADER_BYTES:
        raise WireError("oversized", f"header frame of {views[0].nbytes} bytes")
    try:
        header = msgpack.unpackb(
            views[0],
            raw=False,
            strict_map_key=True,
            max_str_len=MAX_STR,
            max_bin_len=0,
            max_ext_len=0,
            max_array_len=MAX_TENSORS,
            max_map_len=MAX_META,
        )
    except Exception as exc:  # msgpack raises several unrelated types on bad input
        raise WireError("malformed", f"header is not valid msgpack ({exc})") from None
    if type(header) is not dict or type(header.get("v")) is not int:
        raise WireError("malformed", "header is not a map with an integer 'v'")
    if header["v"] != PROTOCOL_VERSION:
        raise WireError("version", f"protocol {header['v']}, expected {PROTOCOL_VERSION}")
    if header.keys() != _KEYS:
        raise WireError("malformed", f"header keys {sorted(header, key=str)}")
    kind = _int(header, "kind", *_INT64)
    if kind not in _KINDS:
        raise WireError("malformed", f"unknown message kind {kind}")
    round_, seq = _int(header, "round", *_UINT63), _int(header, "seq", *_UINT63)
    sender = _int(header, "sender", *_INT64)
    if not 0 <= sender < world_size or sender == rank:
        raise WireError("unknown_sender", f"sender {sender} (world size {world_size})")
    if _int(header, "receiver", *_INT64) != rank:
        raise WireError("wrong_receiver", f"receiver {header['receiver']}, this is {rank}")
    model = _int(header, "fingerprint", *_UINT63)
    if fingerprint is not None and model != fingerprint:
        raise WireError("wrong_model", f"fingerprint {model:#x}, expected {fingerprint:#x}")
    weight = header["weight"]
    if type(weight) is not float:
        raise WireError("bad_weight", f"weight {weight!r} is not a float")
    tensor_specs = header["tensors"]
    _check_weight(kind, weight, len(tensor_specs) if type(tensor_specs) is list else 0, world_size)
    sent_at = header["sent_at"]
    if type(sent_at) is not float or not math.isfinite(sent_at):
        raise WireError("malformed", f"sent_at {sent_at!r}")
    gauge = header["gauge"]
    if type(gauge) is not float or not math.isfinite(gauge):
        raise WireError("malformed", f"gauge {gauge!r}")
    codec = header["codec"]
    if type(codec) is not str or not codec:
        raise WireError("malformed", f"codec {codec!r}")
    fields = _fields(header["meta"])
    specs = _tensor_specs(header["tensors"], len(views) - 1, max_bytes)
    pairs = list(zip(views[1:], specs, strict=True))
    for i, (view, (dtype, shape, nbytes)) in enumerate(pairs):
        if view.nbytes != nbytes:
            raise WireError("size_mismatch", f"tensor {i}: {view.nbytes} bytes, {shape} {dtype}")
    # Only now, with every field and size checked, are the payload buffers read.
    try:
        tensors = tuple(_tensor(view, dtype, shape) for view, (dtype, shape, _) in pairs)
    except Exception as exc:  # nothing a peer sends may raise anything but a WireError
        raise WireError(
            "malformed", f"tensors do not build ({type(exc).__name__}: {exc})"
        ) from None
    for i, tensor in enumerate(tensors):
        if not all_finite(tensor):
            raise WireError("non_finite", f"tensor {i} holds NaN or infinity")
    return Message(
        sender=sender,
        receiver=rank,
        round=round_,
        seq=seq,
        weight=weight,
        tensors=tensors,
        fingerprint=model,
        sent_at=sent_at,
        kind=MessageKind(kind),
        codec=codec,
        gauge=gauge,
        **fields,
    )


def _bytes_view(frame: FrameBuffer) -> memoryview:
    """A flat byte view of ``frame``, without reading its contents."""
    try:
        view = memoryview(frame)
        return view if view.format == "B" and view.ndim == 1 else view.cast("B")
    except (TypeError, ValueError) as exc:
        raise WireError("malformed", f"frame is not a contiguous buffer ({exc})") from None


def _int(header: dict[str, Any], key: str, lo: int, hi: int) -> int:
    return _checked(key, header[key], lo, hi)


def _tensor_specs(
    specs: Any, n_frames: int, max_bytes: int
) -> list[tuple[torch.dtype, tuple[int, ...], int]]:
    """Check the header's tensor list against the frame count and size limit."""
    if type(specs) is not list or len(specs) != n_frames:
        raise WireError("malformed", f"tensor list does not match {n_frames} payload frames")
    checked = []
    total = 0
    for spec in specs:
        dtype, shape, nbytes = tensor_spec(spec, max_bytes)
        total += nbytes
        if total > max_bytes:
            raise WireError("oversized", f"payload over {max_bytes} bytes")
        checked.append((dtype, shape, nbytes))
    return checked


def tensor_spec(spec: Any, max_bytes: int) -> tuple[torch.dtype, tuple[int, ...], int]:
    """``(dtype, shape, bytes)`` of one header tensor spec ``[dtype name, shape]``; raises
    ``WireError`` unless a tensor of that spec can be built within ``max_bytes``."""
    if type(spec) is not list or len(spec) != 2 or type(spec[0]) is not str:
        raise WireError("malformed", f"tensor spec {spec!r}")
    name, shape = spec
    if name not in DTYPES:
        raise WireError("bad_dtype", f"dtype {name!r}")
    if type(shape) is not list or len(shape) > MAX_DIMS:
        raise WireError("malformed", f"shape {shape!r}")
    if not all(type(d) is int and 0 <= d <= _UINT63[1] for d in shape):
        raise WireError("malformed", f"shape {shape!r}")
    dtype = DTYPES[name]
    # Strides as well as the size must stay within the limit: torch refuses to build even
    # an empty tensor of shape (0, 2**31, 2**31, 2**31), as its strides overflow.
    if math.prod(max(d, 1) for d in shape) * dtype.itemsize > max_bytes:
        raise WireError("oversized", f"shape {shape} spans over {max_bytes} bytes")
    return dtype, tuple(shape), math.prod(shape) * dtype.itemsize


def _tensor(view: memoryview, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """The tensor over ``view``: zero-copy when writable and aligned, else a copy."""
    if view.nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    if view.readonly:
        return torch.frombuffer(bytearray(view), dtype=dtype).view(shape)
    tensor = torch.frombuffer(view, dtype=dtype)
    if tensor.data_ptr() % dtype.itemsize:
        tensor = tensor.clone()
    return tensor.view(shape)


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` holds no NaN or infinity (integer tensors always do)."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    # A sum is finite only if every term is, and it runs at memory speed (about 2 ms for
    # 64 MiB here, against 20-70 ms for isfinite().all()). A non-finite sum may still be an
    # overflow of finite values (float16 overflows at 65504), so that case checks exactly.
    if math.isfinite(tensor.sum().item()):
        return True
    return bool(torch.isfinite(tensor).all())
