"""torch.distributed transport: push-sum messages as point-to-point sends on gloo or NCCL.

For a cluster whose workers already share a torch.distributed process group (torchrun, one
GPU per rank): messages travel as ``isend``/``irecv`` pairs on the default process group,
NCCL for CUDA tensors (never staged through host memory) or gloo for CPU tensors.

Rounds, not a stream. torch.distributed has no "receive whatever comes next": NCCL needs
both ends to post matching operations of equal sizes, together in one group
(``batch_isend_irecv``), and a gloo receive that is never matched blocks a thread until the
process group's timeout, after which gloo closes the connection for good. So this transport
exchanges messages round by round, as the topology schedules them. Before it sends the
messages of round ``k``, :class:`~gossip_sgp.SGP` tells the node which ranks it receives
from and sends to in that round (:meth:`TorchDistTransport.plan_round`); both ends of every
link plan the same rounds, so every send has its receive. One round is two batches:

1. headers: one fixed-size ``uint8`` tensor per message (:data:`HEADER_BYTES`): a 4-byte
   length, then the message's msgpack header exactly as :mod:`gossip_sgp.wire` writes it
   (weight, round, sender, sequence number, fingerprint, kind, codec, gauge, meta, dtypes
   and shapes);
2. payloads: every tensor of every message, the receive buffers sized from the headers.

The received header is validated by :func:`gossip_sgp.wire.decode` (every field as for the
ZeroMQ transport) and its tensor list is checked before a byte of payload is allocated;
payloads holding NaN or infinity are rejected. A header whose tensor list cannot be read
leaves the link's byte stream without a known length: the transport then stops with a
``TransportError`` rather than guess.

What follows from the design:

* Synchronous and overlap modes only. An asynchronous worker decides at run time whether it
  gossips in a round, so its peers cannot post matching receives: ``SGP(staleness=None)``
  refuses this transport.
* Acknowledgements do not cross the wire (they would be unscheduled messages). The
  transport acknowledges a message to its own node once the exchange that carried it has
  completed, i.e. once the peer has received it: ``GossipNode.outstanding`` and ``rtt`` then
  count delivery, not fold-in; acknowledgements the node sends are dropped.
* Completion: NCCL work is polled with ``is_completed()`` from the event loop; gloo's
  ``is_completed()`` stays False until ``wait()`` is called, so gloo work is waited for in a
  short-lived daemon thread and the event loop never blocks.
* GPU: header copies run on the transport's own CUDA stream; NCCL runs the transfers on its
  own streams after the work queued so far on the device's current stream of the gossip
  thread, which waits for the device's default stream, where the training thread is
  assumed to produce the messages. (Written for NCCL but not run on a GPU by the tests of
  this repository: they run gloo on CPU and skip the CUDA tests without a GPU.)
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import struct
import threading
import time
from collections import deque
from collections.abc import Sequence
from datetime import timedelta
from typing import Any, NoReturn

import msgpack
import torch
import torch.distributed as dist

from gossip_sgp import wire
from gossip_sgp.errors import TransportClosed, TransportError, WireError
from gossip_sgp.message import Message, MessageKind
from transports.base import TransportStats

__all__ = ["HEADER_BYTES", "TorchDistTransport"]

log = logging.getLogger(__name__)

HEADER_BYTES = 4096
"""Size of the fixed header tensor: a 4-byte length and the msgpack header (about 200 bytes
for one tensor; room for about 200 tensors per message)."""

_LENGTH = struct.Struct("<I")
_POLL_S = (0.0002, 0.005)
"""NCCL completion polling: first and longest interval (the interval doubles)."""
_CLOSE_WAIT_S = 0.8
"""Seconds close() gives exchanges in flight to complete (peers finishing their last round)."""
_WARN_EVERY_S = 10.0


@dataclasses.dataclass
class _Round:
    """One planned round: whom this rank receives from and sends to, and what it sends."""

    round: int
    receive_from: tuple[int, ...]
    send_to: tuple[int, ...]
    outgoing: dict[int, tuple[Message, torch.Tensor]] = dataclasses.field(default_factory=dict)
    """Per out-peer: the message and its header tensor."""

    @property
    def ready(self) -> bool:
        return all(peer in self.outgoing for peer in self.send_to)


class TorchDistTransport:
    """One rank's endpoint on the default torch.distributed process group.

    Args:
        rank: this worker's rank; must equal the process group's rank.
        world_size: number of workers; must equal the process group's size.
        backend: ``"gloo"`` or ``"nccl"`` for a process group this transport creates
            (default: NCCL when CUDA is available, else gloo); an existing default group
            is used as it is.
        max_message_bytes: largest payload accepted (and sent).
        timeout: seconds for creating the process group (``env://``: ``MASTER_ADDR``,
            ``MASTER_PORT``), and the group's own operation timeout when this transport
            creates it.
        device: where received tensors are placed; default on NCCL the CUDA device current
            in the thread that creates the transport, on gloo the CPU.

    The default process group is created at :meth:`start` when none exists (and destroyed
    at :meth:`close`); a group the application created is left alone.
    """

    def __init__(
        self,
        rank: int,
        world_size: int,
        *,
        backend: str | None = None,
        max_message_bytes: int = 1 << 30,
        timeout: float = 120.0,
        device: torch.device | str | None = None,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world size {world_size}")
        if backend is not None and backend not in ("gloo", "nccl"):
            raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
        if max_message_bytes < 1:
            raise ValueError("max_message_bytes must be >= 1")
        if not (math.isfinite(timeout) and timeout > 0):
            raise ValueError(f"timeout must be a finite number of seconds > 0, got {timeout}")
        self.rank = rank
        self.world_size = world_size
        self.max_message_bytes = max_message_bytes
        self.stats = TransportStats()
        self.backend = backend
        self._timeout = timeout
        self._device = None if device is None else torch.device(device)
        # The CUDA device is per thread: read it here, in the thread that builds the node
        # (after from_env selected LOCAL_RANK's GPU), not in the gossip thread.
        self._cuda_index = torch.cuda.current_device() if torch.cuda.is_available() else None
        self._owns_group = False
        self._plans: deque[_Round] = deque()
        self._wake: asyncio.Event | None = None
        self._inbox: asyncio.Queue[Message] | None = None
        self._driver: asyncio.Task[None] | None = None
        self._failure: BaseException | None = None
        self._closed = False
        self._busy = False  # an exchange has posted operations that have not completed
        self._stream: Any = None  # torch.cuda.Stream on NCCL
        self._warned_at: dict[str, float] = {}

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Join (or create) the default process group; start the round exchanges."""
        self._check_open()
        if self._driver is not None:
            return
        await _in_thread(self._init_group)
        if self.backend == "nccl":
            if self._device is None:
                if self._cuda_index is None:
                    raise TransportError(f"rank {self.rank}: an NCCL process group needs CUDA")
                self._device = torch.device("cuda", self._cuda_index)
            # The current device is per thread: the gossip thread's must be this rank's GPU
            # (NCCL's batch_isend_irecv requires it).
            torch.cuda.set_device(self._device)
            self._stream = torch.cuda.Stream(device=self._device)  # type: ignore[no-untyped-call]
        elif self._device is None:
            self._device = torch.device("cpu")
        self._wake = asyncio.Event()
        self._inbox = asyncio.Queue()
        self._driver = asyncio.get_running_loop().create_task(self._drive())

    def _init_group(self) -> None:
        if not dist.is_available():
            raise TransportError("this build of torch has no torch.distributed")
        if not dist.is_initialized():
            backend = self.backend or ("nccl" if torch.cuda.is_available() else "gloo")
            try:
                dist.init_process_group(
                    backend,
                    init_method="env://",
                    rank=self.rank,
                    world_size=self.world_size,
                    timeout=timedelta(seconds=self._timeout),
                )
            except (RuntimeError, ValueError) as exc:
                raise TransportError(
                    f"rank {self.rank} cannot create the {backend} process group from "
                    f"MASTER_ADDR/MASTER_PORT: {exc}"
                ) from exc
            self._owns_group = True
        if dist.get_rank() != self.rank or dist.get_world_size() != self.world_size:
            raise TransportError(
                f"the process group is rank {dist.get_rank()} of {dist.get_world_size()}, "
                f"the gossip config rank {self.rank} of {self.world_size}"
            )
        backend = str(dist.get_backend())
        if backend not in ("gloo", "nccl"):
            raise TransportError(f"process group backend {backend!r}: need gloo or nccl")
        self.backend = backend

    async def close(self) -> None:
        """Stop the exchanges; pending ``recv`` calls raise ``TransportClosed``; idempotent.

        Exchanges in flight get a moment to complete (peers finishing the same round).
        torch.distributed cannot cancel a posted operation, so one that a stalled peer
        never matches stays posted until the process exits.
        """
        if self._closed:
            return
        self._closed = True
        if self._wake is not None:
            self._wake.set()  # the driver finishes the rounds that are ready, then stops
        if self._driver is not None:
            done, _ = await asyncio.wait({self._driver}, timeout=_CLOSE_WAIT_S)
            if not done:
                self._driver.cancel()
                await asyncio.wait({self._driver}, timeout=_CLOSE_WAIT_S)
        if self._inbox is not None:
            self._inbox.put_nowait(_CLOSED)
        if self._owns_group and dist.is_initialized() and not self._busy:
            await _in_thread(dist.destroy_process_group)
            self._owns_group = False

    def _check_open(self) -> None:
        if self._closed:
            raise TransportClosed(f"transport of rank {self.rank} is closed")
        if self._failure is not None:
            raise TransportError(f"rank {self.rank}: the exchange failed: {self._failure}")

    # ------------------------------------------------------------ node interface
    def plan_round(self, round: int, receive_from: Sequence[int], send_to: Sequence[int]) -> None:
        """Round ``round`` receives from ``receive_from`` and sends to ``send_to`` (loop thread).

        Rounds must be planned in increasing order, each before its messages are sent.
        """
        self._check_open()
        if self._plans and round <= self._plans[-1].round:
            raise TransportError(
                f"rank {self.rank}: round {round} planned after round {self._plans[-1].round}"
            )
        for peer in (*receive_from, *send_to):
            if not 0 <= peer < self.world_size or peer == self.rank:
                raise TransportError(f"rank {self.rank} cannot exchange with peer {peer}")
        self._plans.append(_Round(round, tuple(receive_from), tuple(send_to)))
        if self._wake is not None:
            self._wake.set()

    async def send(self, peer: int, message: Message) -> None:
        """Queue ``message`` for the exchange of its round; returns before the peer has it.

        Acknowledgements are dropped (see the module docstring); a push-sum message must
        belong to a planned round that sends to ``peer``.
        """
        self._check_open()
        if message.sender != self.rank or message.receiver != peer:
            raise TransportError(
                f"message {message.sender}->{message.receiver} sent by rank {self.rank} to {peer}"
            )
        if message.kind in (MessageKind.ACK, MessageKind.HEARTBEAT):
            return  # acknowledged on completion; liveness is not detected on this transport
        if message.nbytes > self.max_message_bytes:
            raise WireError("oversized", f"{message.nbytes} bytes > {self.max_message_bytes}")
        plan = next((p for p in self._plans if p.round == message.round), None)
        if plan is None or peer not in plan.send_to or peer in plan.outgoing:
            raise TransportError(
                f"rank {self.rank}: no planned round-{message.round} send to rank {peer} "
                "(the torch.distributed transport sends only what SGP planned)"
            )
        for t in message.tensors:
            if t.device != self._device:
                raise TransportError(
                    f"rank {self.rank}: a {self.backend} process group sends tensors on "
                    f"{self._device}, got one on {t.device}"
                )
        if message.sent_at == 0.0:
            message = dataclasses.replace(message, sent_at=time.time())
        plan.outgoing[peer] = (message, self._header(message))  # a bad message fails here
        assert self._wake is not None
        self._wake.set()

    async def recv(self) -> Message:
        """The next valid message (received ones, and acknowledgements of delivered sends)."""
        if self._inbox is None:
            self._check_open()
            raise TransportError(f"transport of rank {self.rank} is not started")
        if self._closed and self._inbox.empty():
            raise TransportClosed(f"transport of rank {self.rank} is closed")
        item = await self._inbox.get()
        if item is _CLOSED:
            self._inbox.put_nowait(_CLOSED)  # wake every other receiver too
            if self._failure is not None and not self._closed:
                raise TransportError(f"rank {self.rank}: the exchange failed: {self._failure}")
            raise TransportClosed(f"transport of rank {self.rank} is closed")
        return item

    # ---------------------------------------------------------------- exchanges
    async def _drive(self) -> None:
        """Exchange planned rounds in order, each once its messages have been sent."""
        assert self._wake is not None
        assert self._inbox is not None
        try:
            while not self._closed or (self._plans and self._plans[0].ready):
                if not (self._plans and self._plans[0].ready):
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                plan = self._plans[0]
                self._busy = True
                await self._exchange(plan)
                self._busy = False
                self._plans.popleft()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._failure = exc
            log.error("rank %d: torch.distributed exchange failed: %s", self.rank, exc)
            self._inbox.put_nowait(_CLOSED)

    async def _exchange(self, plan: _Round) -> None:
        assert self._inbox is not None
        outgoing = [plan.outgoing[peer][0] for peer in plan.send_to]
        headers = [plan.outgoing[peer][1] for peer in plan.send_to]
        received = [self._empty(HEADER_BYTES, torch.uint8) for _ in plan.receive_from]
        await self._batch(
            list(zip(headers, plan.send_to, strict=True)),
            list(zip(received, plan.receive_from, strict=True)),
        )
        parsed = [
            self._parse_header(buf, src, plan.round)
            for buf, src in zip(received, plan.receive_from, strict=True)
        ]
        buffers = [
            [self._empty(math.prod(shape), dtype) for dtype, shape in specs]
            for _, _, specs in parsed
        ]
        sends = [
            (t.detach().contiguous().reshape(-1), m.receiver)
            for m in outgoing
            for t in m.tensors
            if t.numel()
        ]
        recvs = [
            (buf, src)
            for bufs, src in zip(buffers, plan.receive_from, strict=True)
            for buf in bufs
            if buf.numel()
        ]
        await self._batch(sends, recvs)
        for m, header in zip(outgoing, headers, strict=True):
            self.stats.messages_sent[m.receiver] += 1
            self.stats.bytes_sent[m.receiver] += m.nbytes + header.numel()
            self._inbox.put_nowait(_delivered(m))
        for (message, error, specs), bufs, src in zip(
            parsed, buffers, plan.receive_from, strict=True
        ):
            tensors = tuple(b.view(shape) for b, (_, shape) in zip(bufs, specs, strict=True))
            if error is None:
                bad = next((i for i, t in enumerate(tensors) if not wire.all_finite(t)), None)
                if bad is not None:
                    error = WireError("non_finite", f"tensor {bad} holds NaN or infinity")
            if error is not None or message is None:
                self._reject(error or WireError("malformed", "no message"), src)
                continue
            self.stats.messages_received[src] += 1
            self.stats.bytes_received[src] += HEADER_BYTES + sum(
                t.numel() * t.element_size() for t in tensors
            )
            self._inbox.put_nowait(dataclasses.replace(message, tensors=tensors))

    def _empty(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(numel, dtype=dtype, device=self._device)

    def _header(self, message: Message) -> torch.Tensor:
        """The fixed-size header tensor of ``message``, on the transport's device."""
        # wire.encode checks the message and writes the header; on the CPU its payload views
        # are free, for CUDA tensors empty host stand-ins of the same shapes (never touched)
        # keep it from copying the payload.
        stand_ins = tuple(
            t if t.device.type == "cpu" else torch.empty(t.shape, dtype=t.dtype)
            for t in message.tensors
        )
        packed = bytes(wire.encode(dataclasses.replace(message, tensors=stand_ins))[0])
        if _LENGTH.size + len(packed) > HEADER_BYTES:
            raise WireError("oversized", f"header of {len(packed)} bytes > {HEADER_BYTES - 4}")
        host = torch.zeros(HEADER_BYTES, dtype=torch.uint8)
        raw = _LENGTH.pack(len(packed)) + packed
        host[: len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        if self._device is None or self._device.type == "cpu":
            return host
        with torch.cuda.stream(self._stream):
            return host.pin_memory().to(self._device, non_blocking=True)

    def _parse_header(
        self, buf: torch.Tensor, src: int, round: int
    ) -> tuple[Message | None, WireError | None, list[tuple[torch.dtype, tuple[int, ...]]]]:
        """Validate a received header; return (message without tensors, error, tensor specs).

        The tensor specs are needed to keep the link in step even when the message is
        rejected; a header without readable specs raises ``TransportError``.
        """
        if buf.device.type != "cpu":
            with torch.cuda.stream(self._stream):
                buf = buf.to("cpu")
        raw = buf.numpy().tobytes()
        (length,) = _LENGTH.unpack_from(raw)
        if not 0 < length <= HEADER_BYTES - _LENGTH.size:
            self._fail_link(src, f"header length {length}")
        packed = raw[_LENGTH.size : _LENGTH.size + length]
        try:
            header = msgpack.unpackb(
                packed,
                raw=False,
                strict_map_key=True,
                max_str_len=wire.MAX_STR,
                max_bin_len=0,
                max_ext_len=0,
                max_array_len=wire.MAX_TENSORS,
                max_map_len=wire.MAX_META,
            )
        except Exception as exc:  # msgpack raises several unrelated types on bad input
            self._fail_link(src, f"header is not valid msgpack ({exc})")
        specs = self._specs(header, src)
        # Every other field is checked by wire.decode, on the header without its tensor
        # list (the payload is checked against the specs here, and for finiteness after).
        bare = msgpack.packb({**header, "tensors": []}, use_bin_type=True)
        try:
            message = wire.decode(
                [bare],
                rank=self.rank,
                world_size=self.world_size,
                fingerprint=None,
                max_bytes=self.max_message_bytes,
            )
        except WireError as exc:
            return None, exc, specs
        if message.sender != src:
            error = WireError("unknown_sender", f"sender {message.sender} on rank {src}'s link")
            return None, error, specs
        if message.round != round or message.kind != MessageKind.MASS:
            return None, WireError("malformed", f"round {message.round} in round {round}"), specs
        return message, None, specs

    def _specs(self, header: Any, src: int) -> list[tuple[torch.dtype, tuple[int, ...]]]:
        specs = header.get("tensors") if type(header) is dict else None
        if type(specs) is not list:
            self._fail_link(src, "header has no tensor list")
        checked = []
        total = 0
        for spec in specs:
            try:
                dtype, shape, nbytes = wire.tensor_spec(spec, self.max_message_bytes)
            except WireError as exc:
                over = exc.reason == "oversized"
                why = f"payload over {self.max_message_bytes} bytes" if over else str(exc)
                self._fail_link(src, f"tensor spec {spec!r}: {why}")
            total += nbytes
            if total > self.max_message_bytes:
                self._fail_link(src, f"payload over {self.max_message_bytes} bytes")
            checked.append((dtype, shape))
        return checked

    def _fail_link(self, src: int, detail: str) -> NoReturn:
        self.stats.rejected["malformed"] += 1
        raise TransportError(
            f"rank {self.rank}: unreadable header from rank {src} ({detail}); the link cannot "
            "stay in step, stopping"
        )

    async def _batch(
        self, sends: list[tuple[torch.Tensor, int]], recvs: list[tuple[torch.Tensor, int]]
    ) -> None:
        """Post sends and receives together and wait until all have completed."""
        ops = [dist.P2POp(dist.isend, t, peer) for t, peer in sends]
        ops += [dist.P2POp(dist.irecv, t, peer) for t, peer in recvs]
        if not ops:
            return
        if self.backend == "nccl":
            with torch.cuda.stream(self._stream):
                self._stream.wait_stream(torch.cuda.default_stream(self._device))
                works = dist.batch_isend_irecv(ops)
            await _poll(works)
            with torch.cuda.stream(self._stream):
                for work in works:
                    work.wait()  # orders the gossip stream after the transfers
            self._stream.synchronize()  # the round's tensors are ready on every stream
        else:
            works = dist.batch_isend_irecv(ops)
            await _in_thread(lambda: [work.wait() for work in works])

    def _reject(self, exc: WireError, src: int) -> None:
        self.stats.rejected[exc.reason] += 1
        now = time.monotonic()
        if now - self._warned_at.get(exc.reason, -math.inf) >= _WARN_EVERY_S:
            self._warned_at[exc.reason] = now
            log.warning(
                "rank %d rejected a message from rank %d (%s, %d so far): %s",
                self.rank,
                src,
                exc.reason,
                self.stats.rejected[exc.reason],
                exc.detail,
            )


_CLOSED: Any = object()
"""Put in the inbox when no more messages will come."""


def _delivered(message: Message) -> Message:
    """The acknowledgement of ``message``, as its receiver would send it."""
    return Message(
        sender=message.receiver,
        receiver=message.sender,
        round=message.round,
        seq=message.seq,
        weight=0.0,
        tensors=(),
        fingerprint=message.fingerprint,
        kind=MessageKind.ACK,
    )


async def _in_thread(fn: Any) -> Any:
    """Run blocking ``fn()`` in a daemon thread; the event loop keeps running meanwhile.

    Not the loop's default executor: its threads are joined at interpreter exit, and a gloo
    wait that a vanished peer never completes would then hang the exit.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def run() -> None:
        try:
            result, error = fn(), None
        except BaseException as exc:
            result, error = None, exc
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=run, name="gossip-sgp-torchdist-wait", daemon=True).start()
    return await future


async def _poll(works: Sequence[Any]) -> None:
    """Wait for NCCL work by polling ``is_completed()`` (NCCL's ``wait()`` does not block)."""
    interval = _POLL_S[0]
    while not all(work.is_completed() for work in works):
        await asyncio.sleep(interval)
        interval = min(2 * interval, _POLL_S[1])
