"""Compression codecs for push-sum messages, with error feedback that keeps the average exact.

A codec turns one numerator share (one flat tensor per parameter group) into a few smaller
tensors on the wire and back. Codec specs, as given to ``SGP(compression=...)`` and the CLI:

* ``none`` - the tensors travel as they are (the default);
* ``fp16`` / ``bf16`` - half precision (values beyond the format's range are clipped to it);
* ``int8[:B]`` - 8-bit blockwise quantization: blocks of ``B`` elements (default 256), each
  sent as int8 codes ``round(127 * x / absmax)`` plus its float32 ``absmax / 127``;
* ``topk:F`` or ``topk:K`` - top-k sparsification with a fixed k: the ``K`` (an integer >= 1)
  or ``ceil(F * n)`` (a fraction ``0 < F < 1``) largest-magnitude elements, as sorted int32
  indices (int64 past 2**31 elements) plus their values in the numerator's dtype.

Every spec takes an optional ``,min=N`` (default 64): tensors of fewer than ``N`` elements
travel uncompressed (size-adaptive; compressing a bias vector gains nothing). Sizes depend only
on the spec and the tensor's length, so both ends know every payload size in advance. The
option ``,ref`` (or ``,ref=N``) codes differences against a reference per link
(:class:`References`), which removes the consensus floor that error feedback alone leaves;
``,step=F`` damps the consensus step (a node gives away ``F`` of its usual share), which
difference-coded top-k needs to converge.

Mass conservation (error feedback): :func:`compress_share` returns the encoded share *and*
what the codec dropped, ``m - decode(encode(m))``; the sender keeps that residual in its own
numerator (see :meth:`gossip_sgp.protocol.PushSumProtocol.emit`), so the sum of numerators over
nodes and messages is unchanged, up to floating-point rounding of the subtraction. The
receiver runs the same :meth:`Codec.decode`, so it adds exactly what the sender gave away.
The push-sum weight is never compressed.

:meth:`Codec.decode` validates the codec name, ``Message.raw_bytes``, the number, dtypes and
lengths of the parts, block scales and index ranges against the receiver's own layout before
it reads a value, and raises :class:`~gossip_sgp.errors.WireError` otherwise.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from gossip_sgp.errors import WireError
from gossip_sgp.message import Message
from gossip_sgp.wire import all_finite

__all__ = ["CODECS", "Codec", "Layout", "References", "compress_share", "parse_codec"]

CODECS = ("none", "fp16", "bf16", "int8", "topk")
"""Codec names; see the module docstring for their parameters."""

DEFAULT_BLOCK = 256
DEFAULT_MIN = 64
MAX_BLOCK = 1 << 24

Layout = Sequence[tuple[int, torch.dtype, torch.device]]
"""What a receiver expects: ``(numel, dtype, device)`` of each numerator tensor."""

_TINY = 1e-30
_CHUNK = 1 << 18
_SAMPLED_TOPK = 1 << 20
_SAMPLE = 1 << 16
_HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Codec:
    """A parsed codec spec; build one with :func:`parse_codec`."""

    name: str
    """One of :data:`CODECS`."""
    block: int = DEFAULT_BLOCK
    """int8: elements per quantization block."""
    k: int = 0
    """topk: the fixed number of elements kept (0 when given as a fraction)."""
    fraction: float = 0.0
    """topk: the fraction of elements kept (0.0 when given as a count)."""
    min_numel: int = DEFAULT_MIN
    """Tensors with fewer elements travel uncompressed."""
    spec: str = "none"
    """The spec string, as written in each message's ``codec`` header field."""
    reference: bool = False
    """Difference compression: send ``C(m - h)`` against a reference ``h`` per link."""
    key_interval: int = 0
    """With ``reference``: restart the reference with a raw key frame every this many
    messages of a link (0: only the first message of a link is a key frame)."""
    step: float = 1.0
    """Consensus step: the fraction of the topology's mixing applied each round (CHOCO's
    gamma); below 1 a node keeps more of its mass, which damps aggressive codecs."""

    # ------------------------------------------------------------------ sizes
    def compresses(self, numel: int) -> bool:
        """Whether a tensor of ``numel`` elements is encoded (else it travels raw)."""
        return self.name != "none" and numel >= self.min_numel

    def topk_count(self, numel: int) -> int:
        """Elements a top-k share of a ``numel``-element tensor keeps."""
        k = self.k if self.k else math.ceil(self.fraction * numel)
        return max(1, min(numel, k))

    def part_specs(self, numel: int, dtype: torch.dtype) -> list[tuple[torch.dtype, int]]:
        """``(dtype, length)`` of each wire tensor encoding one ``numel``-element tensor."""
        if not self.compresses(numel):
            return [(dtype, numel)]
        if self.name in _HALF:
            return [(_HALF[self.name], numel)]
        if self.name == "int8":
            return [(torch.int8, numel), (torch.float32, -(-numel // self.block))]
        k = self.topk_count(numel)
        return [(_index_dtype(numel), k), (dtype, k)]

    # --------------------------------------------------------------- encoding
    def roundtrip(
        self, tensors: Sequence[torch.Tensor]
    ) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """``(wire tensors, what they decode to)`` for a share: the decoded values are
        bit-identical to what the receiver's :meth:`decode` returns."""
        parts: list[torch.Tensor] = []
        sent: list[torch.Tensor] = []
        for t in tensors:
            encoded = self.encode(t)
            parts.extend(encoded)
            sent.append(self._decode_one(encoded, t.numel(), t.dtype))
        return tuple(parts), tuple(sent)

    def encode(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """The wire tensors of one flat floating-point tensor (on its device)."""
        numel = tensor.numel()
        if not self.compresses(numel):
            return [tensor]
        if self.name in _HALF:
            dtype = _HALF[self.name]
            limit = torch.finfo(dtype).max
            half = torch.empty(numel, dtype=dtype, device=tensor.device)
            for start, stop in _spans(numel, 1):
                half[start:stop].copy_(tensor[start:stop].clamp(-limit, limit))
            return [half]
        if self.name == "int8":
            return _int8_encode(tensor, self.block)
        idx = _topk_indices(tensor.abs(), self.topk_count(numel))
        return [idx.to(_index_dtype(numel)), tensor[idx]]

    def decode(
        self,
        parts: Sequence[torch.Tensor],
        layout: Layout,
        raw_bytes: int | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """Validate ``parts`` against ``layout`` and rebuild the dense tensors.

        ``raw_bytes`` is the message's ``raw_bytes``: for a compressed message it must be
        the uncompressed payload size of ``layout``. Raises ``WireError`` (reasons
        ``malformed``, ``bad_dtype``, ``size_mismatch``, ``non_finite``) before reading any
        value of an invalid payload.
        """
        expected = [self.part_specs(numel, dtype) for numel, dtype, _ in layout]
        n_parts = sum(len(e) for e in expected)
        if len(parts) != n_parts:
            raise WireError("size_mismatch", f"{len(parts)} tensors, {self.spec} needs {n_parts}")
        if self.name != "none":
            _check_raw_bytes(raw_bytes, layout)
        for i, (part, (dtype, length)) in enumerate(
            zip(parts, (s for e in expected for s in e), strict=True)
        ):
            if part.dtype != dtype:
                raise WireError(
                    "bad_dtype", f"tensor {i} is {part.dtype}, {self.spec} sends {dtype}"
                )
            if part.dim() != 1 or part.numel() != length:
                raise WireError("size_mismatch", f"tensor {i} has shape {tuple(part.shape)}")
        out: list[torch.Tensor] = []
        i = 0
        for (numel, dtype, device), specs in zip(layout, expected, strict=True):
            own = [p.to(device, non_blocking=True) for p in parts[i : i + len(specs)]]
            i += len(specs)
            dense = self._decode_one(own, numel, dtype)
            if self.name != "none" and not all_finite(dense):
                # Finite parts can still decode to infinity: an int8 block scale near 3e38
                # times 127, or a float32 value beyond float16's range for a float16 model.
                raise WireError("non_finite", f"tensor {len(out)} decodes to NaN or infinity")
            out.append(dense)
        return tuple(out)

    def _decode_one(
        self, parts: list[torch.Tensor], numel: int, dtype: torch.dtype
    ) -> torch.Tensor:
        if not self.compresses(numel):
            return parts[0]
        if self.name in _HALF:
            return parts[0].to(dtype)
        if self.name == "int8":
            q, scale = parts
            if scale.numel() and not bool(torch.isfinite(scale).all() & (scale >= 0).all()):
                raise WireError("non_finite", "int8 block scales must be finite and >= 0")
            return _int8_decode(q, scale, self.block, dtype)
        idx, values = parts
        if idx.numel():
            inside = bool(idx[0] >= 0) and bool(idx[-1] < numel)
            if not inside or (idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all())):
                raise WireError("malformed", "top-k indices are not increasing within range")
            if not bool(torch.isfinite(values).all()):
                raise WireError("non_finite", "top-k values hold NaN or infinity")
        dense = torch.zeros(numel, dtype=dtype, device=values.device)
        dense[idx.long()] = values
        return dense


def _index_dtype(numel: int) -> torch.dtype:
    return torch.int32 if numel <= (1 << 31) - 1 else torch.int64


def _topk_indices(magnitude: torch.Tensor, k: int) -> torch.Tensor:
    """Sorted indices of the ``k`` largest entries of ``magnitude`` (ties: any of them).

    ``torch.topk`` over millions of elements is slow on CPUs, so for large tensors a
    threshold is estimated from an evenly strided sample (about 2k candidates expected),
    and the exact top-k runs on the candidates at or above it. Deterministic: no random
    sampling. When the estimate leaves fewer than k candidates, the full top-k runs.
    """
    numel = magnitude.numel()
    if numel >= _SAMPLED_TOPK and k * 8 <= numel:
        stride = max(1, numel // _SAMPLE)
        sample = magnitude[::stride]
        keep = min(sample.numel(), max(1, math.ceil(2 * k / numel * sample.numel())))
        threshold = torch.topk(sample, keep, sorted=False).values.min()
        candidates = (magnitude >= threshold).nonzero().squeeze(1)
        if candidates.numel() >= k:
            best = torch.topk(magnitude[candidates], k, sorted=False).indices
            return candidates[best].sort().values
    return torch.topk(magnitude, k, sorted=False).indices.sort().values


def _spans(numel: int, block: int) -> list[tuple[int, int]]:
    """``(start, stop)`` pieces of about ``_CHUNK`` elements, each a whole number of blocks
    (the last one may end in a partial block). Working piece by piece keeps temporaries in
    the cache: measured 4-7x faster than whole-tensor operations for 10M floats."""
    step = max(1, _CHUNK // block) * block
    return [(start, min(numel, start + step)) for start in range(0, numel, step)]


def _blocks(t: torch.Tensor, block: int) -> torch.Tensor:
    """``t`` as rows of ``block`` elements; a short tensor (the last block) is one row."""
    return t.view(-1, block) if t.numel() % block == 0 else t.view(1, -1)


def _int8_encode(x: torch.Tensor, block: int) -> list[torch.Tensor]:
    numel = x.numel()
    q = torch.empty(numel, dtype=torch.int8, device=x.device)
    scales = torch.empty(-(-numel // block), dtype=torch.float32, device=x.device)
    work = torch.empty(min(numel, _CHUNK + block), dtype=torch.float32, device=x.device)
    for start, stop in _spans(numel, block):
        pieces = [(start, stop)]
        if (stop - start) % block:  # the partial last block is a row of its own
            full = start + (stop - start) // block * block
            pieces = [(start, full), (full, stop)] if full > start else [(full, stop)]
        for lo, hi in pieces:
            xb = _blocks(x[lo:hi], block)
            low, high = torch.aminmax(xb, dim=1, keepdim=True)
            absmax = torch.maximum(high, low.neg()).float()
            # Multiply by 127 / absmax and round to nearest. A block too small for a finite
            # 127 / absmax is sent as zeros: error feedback keeps it at the sender.
            inv = torch.where(absmax > _TINY, 127.0 / absmax, 0.0)
            scaled = _blocks(work[: hi - lo], block)
            torch.mul(xb, inv, out=scaled)
            q[lo:hi].view(scaled.shape).copy_(scaled.round_())
            torch.div(absmax.view(-1), 127.0, out=scales[lo // block : -(-hi // block)])
    return [q, scales]


def _int8_decode(
    q: torch.Tensor, scales: torch.Tensor, block: int, dtype: torch.dtype
) -> torch.Tensor:
    numel = q.numel()
    out = torch.empty(numel, dtype=dtype, device=q.device)
    scale = scales.to(dtype)
    for start, stop in _spans(numel, block):
        piece = out[start:stop]
        piece.copy_(q[start:stop])
        full = (stop - start) // block * block
        if full:
            piece[:full].view(-1, block).mul_(scale[start // block : (start + full) // block, None])
        if full < stop - start:
            piece[full:].mul_(scale[-1])
    return out


@dataclass
class _Link:
    """One link's reference: its tensors, the key frame's seq, the next seq expected."""

    tensors: tuple[torch.Tensor, ...]
    start: int
    next: int
    messages: int = 1
    """Sender side: messages coded on this reference (the key frame included)."""


_MAX_PASSED = 4096
"""Sequence numbers a receiver's reference keeps of a link's siblings ahead of the one it
waits for (see ``References.passed``)."""


class References:
    """Reference copies for difference compression (the ``ref`` option), one per link.

    The sender of a link ``i -> j`` and its receiver hold the same reference ``h`` (same
    values, bit for bit). For a share ``m`` the sender sends ``q = C(m - h)``; both ends set
    ``h <- h + decode(q)``, and ``h`` is the mass that moves: the receiver folds it in, the
    sender keeps ``m - h``. Mass is exact as long as both copies agree, so the receiver
    applies a link's messages strictly in sequence order; one it cannot place (a lost or
    overtaken predecessor, an unknown reference) is rejected as ``no_reference`` and its
    mass is lost, until the sender's next key frame (``h`` restarts from zero: the first
    message of a link, and every ``ref=N``-th with that option).
    This is CHOCO-Gossip's idea (Koloskova et al., 2019) in push-sum form; as the nodes
    agree, ``m - h`` shrinks and so does what the codec drops.
    """

    def __init__(self) -> None:
        self.out: dict[int, _Link] = {}
        """Links to out-peers (sender side)."""
        self.inbound: dict[int, _Link] = {}
        """Links from in-peers (receiver side)."""
        self._passed: dict[int, set[int]] = {}
        """Receiver side, per in-peer: sequence numbers that went to another reference of
        the same link, not yet reached (see :meth:`passed`); kept apart from the link's
        reference, so that numbers noted before a key frame is placed still count."""

    def forget_outbound(self, peer: int) -> None:
        """Drop the reference of the link to ``peer``: its next message is a key frame."""
        self.out.pop(peer, None)

    def forget_inbound(self, peer: int) -> None:
        """Drop the reference of the link from ``peer``: only a key frame is placed next."""
        self.inbound.pop(peer, None)
        self._passed.pop(peer, None)

    def encode(
        self,
        codec: Codec,
        peer: int,
        seq: int,
        share: Sequence[torch.Tensor],
    ) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...], tuple[int, bool]]:
        """``(wire tensors, residual, (ref, key))`` of message ``seq`` to ``peer``: the
        message's ``Message.ref`` and ``Message.key``."""
        link = self.out.get(peer)
        key = link is None or bool(codec.key_interval and link.messages >= codec.key_interval)
        if link is None or key:
            # Key frame: the reference restarts from zero, so this is plain compression.
            parts, sent = codec.roundtrip(share)
            link = self.out[peer] = _Link(sent, seq, seq + 1)
        else:
            diff = [m - h for m, h in zip(share, link.tensors, strict=True)]
            parts, sent = codec.roundtrip(diff)
            link.tensors = tuple(h + d for h, d in zip(link.tensors, sent, strict=True))
            link.next = seq + 1
            link.messages += 1
        residual = tuple(m - h for m, h in zip(share, link.tensors, strict=True))
        return parts, residual, (link.start, key)

    def applied(self, message: Message) -> bool:
        """Whether ``message`` is older than its link's next one (a duplicate or replay)."""
        link = self.inbound.get(message.sender)
        return link is not None and message.seq < link.next

    def decode(
        self, codec: Codec, message: Message, layout: Layout, *, commit: bool
    ) -> tuple[torch.Tensor, ...]:
        """The mass of a received difference-coded ``message``; ``commit`` updates ``h``.

        Raises ``WireError``: ``no_reference`` for a message that does not follow its
        link's last one (check :meth:`applied` first), or a decoder's reason.
        """
        start, key, seq = message.ref, message.key, message.seq
        if start is None or not 0 <= start <= seq:
            raise WireError("malformed", f"reference field ref={start!r} of message {seq}")
        link = self.inbound.get(message.sender)
        if key:
            if start != seq:
                raise WireError("malformed", f"key frame {seq} names reference {start}")
            tensors = codec.decode(message.tensors, layout, message.raw_bytes)
        else:
            if link is None or link.start != start or seq != link.next:
                expected = None if link is None else (link.start, link.next)
                raise WireError(
                    "no_reference",
                    f"message {seq} on reference {start} of rank {message.sender}; "
                    f"this link holds (reference, next) {expected}",
                )
            delta = codec.decode(message.tensors, layout, message.raw_bytes)
            tensors = tuple(h + d for h, d in zip(link.tensors, delta, strict=True))
            if not all(all_finite(t) for t in tensors):  # before it becomes the reference
                raise WireError("non_finite", "reference plus difference overflows")
        if commit:
            placed = self.inbound[message.sender] = _Link(tensors, start, seq + 1)
            passed = self._passed.get(message.sender)
            if passed:  # (numbers before a key frame no longer matter)
                self._passed[message.sender] = {p for p in passed if p > seq}
                self._advance(message.sender, placed)
        return tensors

    def _advance(self, sender: int, link: _Link) -> None:
        """Move the link's ``next`` over the numbers that went to other references."""
        passed = self._passed.get(sender)
        while passed and link.next in passed:
            passed.remove(link.next)
            link.next += 1

    def passed(self, sender: int, seq: int) -> None:
        """Message ``seq`` of ``sender`` went to another reference of the same link: the
        fragments of a ``StreamingSGP`` number the shares of a link in one series, each
        with a reference of its own, so this reference's next message comes after the
        numbers its siblings took. Noted ahead of ``next`` until ``next`` gets there (a
        share sent again may come late), also before this reference's key frame is placed."""
        link = self.inbound.get(sender)
        if link is not None and seq < link.next:
            return
        passed = self._passed.setdefault(sender, set())
        passed.add(seq)
        if link is not None:
            self._advance(sender, link)
        if len(passed) > _MAX_PASSED:  # a predecessor that never comes
            self.forget_inbound(sender)  # only a key frame is placed next


def _check_raw_bytes(got: int | None, layout: Layout) -> None:
    raw = sum(numel * dtype.itemsize for numel, dtype, _ in layout)
    if got != raw:
        raise WireError("malformed", f"raw_bytes {got!r}, expected {raw}")


def compress_share(
    codec: Codec, tensors: Sequence[torch.Tensor]
) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """Encode a share; return ``(wire tensors, residual)`` with residual ``m - C(m)``.

    The caller sends the wire tensors and adds the residual to its own numerator (error
    feedback), so no mass is lost to the codec.
    """
    parts, sent = codec.roundtrip(tensors)
    return parts, tuple(t - s for t, s in zip(tensors, sent, strict=True))


def parse_codec(spec: str) -> Codec:
    """Parse a codec spec (``none``, ``fp16``, ``bf16``, ``int8[:B]``, ``topk:F|K``, each
    with the options ``,min=N`` and ``,ref[=N]``); raises ``ValueError`` with the reason."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"compression must be a non-empty string, got {spec!r}")
    text = spec.strip().lower()
    head, *options = text.split(",")
    min_numel, reference, key_interval, step = DEFAULT_MIN, False, 0, 1.0
    for option in options:
        key, sep, value = (part.strip() for part in option.partition("="))
        if key == "min" and sep:
            min_numel = _int(value, "min", spec, lo=0)
        elif key == "step" and sep:
            try:
                step = float(value)
            except ValueError:
                step = math.nan
            if not 0.0 < step <= 1.0:
                raise ValueError(f"step must be a number in (0, 1], got {value!r} in {spec!r}")
        elif key == "ref":
            reference = True
            key_interval = _int(value, "ref", spec, lo=1) if sep else 0
        else:
            raise ValueError(
                f"unknown compression option {option!r} in {spec!r} "
                "(use min=N, ref, ref=N or step=F)"
            )
    name, sep, arg = head.partition(":")
    name, arg = name.strip(), arg.strip()
    if name not in CODECS:
        raise ValueError(f"unknown codec {name!r} in {spec!r}; choose one of {', '.join(CODECS)}")
    if name == "none":
        if sep or options:
            raise ValueError(f"codec 'none' takes no parameters, got {spec!r}")
        return Codec("none", spec="none")
    suffix = "" if min_numel == DEFAULT_MIN else f",min={min_numel}"
    if reference:
        suffix += f",ref={key_interval}" if key_interval else ",ref"
    if step != 1.0:
        suffix += f",step={step!r}"

    def made(codec: Codec) -> Codec:
        return dataclasses.replace(
            codec,
            min_numel=min_numel,
            reference=reference,
            key_interval=key_interval,
            step=step,
        )

    if name in _HALF:
        if sep:
            raise ValueError(f"codec {name!r} takes no parameter, got {spec!r}")
        return made(Codec(name, spec=name + suffix))
    if name == "int8":
        block = _int(arg, "int8 block size", spec, lo=1, hi=MAX_BLOCK) if sep else DEFAULT_BLOCK
        return made(Codec("int8", block=block, spec=f"int8:{block}{suffix}"))
    if not sep or not arg:
        raise ValueError(f"{name} needs k: '{name}:0.01' (a fraction) or '{name}:1000' (a count)")
    if arg.isdigit():
        k = _int(arg, f"{name} count", spec, lo=1)
        return made(Codec(name, k=k, spec=f"{name}:{k}{suffix}"))
    try:
        fraction = float(arg)
    except ValueError:
        raise ValueError(f"{name} parameter {arg!r} in {spec!r} is not a number") from None
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"{name} fraction must be in (0, 1), got {arg!r} in {spec!r}")
    return made(Codec(name, fraction=fraction, spec=f"{name}:{fraction!r}{suffix}"))


def _int(text: str, what: str, spec: str, *, lo: int, hi: int = 1 << 62) -> int:
    text = text.strip()
    if not text.isdigit() or not lo <= int(text) <= hi:
        raise ValueError(f"{what} must be an integer in [{lo}, {hi}], got {text!r} in {spec!r}")
    return int(text)
