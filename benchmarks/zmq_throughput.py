"""ZmqTransport against a raw TCP socket over loopback: latency and throughput, in one run.

    python benchmarks/zmq_throughput.py                      # 1 KiB, 1 MiB and 64 MiB
    python benchmarks/zmq_throughput.py --sizes 4KiB,16MiB --repeats 20
    python benchmarks/zmq_throughput.py --size-mib 64 --repeats 10   # 64 MiB only
    python benchmarks/zmq_throughput.py --json > zmq.json

Each case moves messages from a sender process to a receiver process over 127.0.0.1 and
times, in the sender, from the start of the first send until a tiny acknowledgement comes
back from the receiver, so each figure is end to end. For every message size two figures:

* latency: one message, then the acknowledgement (a round trip carrying the message one
  way);
* throughput: a burst of back-to-back messages (``--burst-mib`` MiB of them, at most
  ``--max-burst``; one for messages that large), acknowledged after the last, in bytes per
  second. With one message per burst it is the latency measurement's.

The cases:

* raw: ``socket.sendall`` of one buffer per message (``TCP_NODELAY`` on both ends); the
  receiver ``recv_into``s a preallocated buffer, then acknowledges. The floor any transport
  can hope for: no allocation, no framing, no validation.
* zmq: ``ZmqTransport.send`` of a float32 ``Message`` (encode included); the receiving
  ``ZmqTransport.recv`` validates and decodes it (non-finite check included) before the
  receiver acknowledges with a tensor-less message. The transport as a user gets it.
* zmq, tune_malloc=False: the same without the transport's malloc tuning. This is also what
  a process gets when the tuning cannot take effect (see ``transports/zmq.py``).
* zmq, GLIBC_TUNABLES=glibc.malloc.hugetlb=1: untuned, with glibc asked (in the environment,
  at process start) to put freshly mapped blocks on transparent huge pages instead.

``--cases raw,zmq`` picks some. Every end is its own process (with its own event loop, uvloop
where installed), as in a real job, and stays up for the whole run. The cases take turns
measurement by measurement, so background load on a shared machine hits them alike, and
every figure is also given as a ratio to the raw measurement of the same turn. The first
``--warmup`` measurements of each kind are not reported: ZeroMQ's first few messages after
an idle spell take several times longer than the steady state, and the first large message
grows the receiver's heap.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import multiprocessing as mp
import os
import socket
import statistics
import sys
import time
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from multiprocessing.connection import Connection
from typing import Any

import torch

from gossip_sgp.launch import find_free_ports
from gossip_sgp.message import Message
from transports.zmq import ZmqTransport

FINGERPRINT = 0x5EED


def _run(main: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main())
    return uvloop.run(main())


def _free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1."""
    return find_free_ports("127.0.0.1", n)


Phase = tuple[int, int, int]
"""``(message bytes, messages per measurement, measurements)``: what both ends expect."""


# ---------------------------------------------------------------------------- raw TCP


def _raw_receiver(ports: list[int], ready: Connection, plan: list[Phase]) -> None:
    with socket.create_server(("127.0.0.1", ports[1])) as server:
        ready.send(True)
        conn, _ = server.accept()
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            buffer = memoryview(bytearray(max(n for n, _, _ in plan)))
            for nbytes, burst, rounds in plan:
                for _ in range(rounds):
                    for _ in range(burst):
                        got = 0
                        while got < nbytes:
                            n = conn.recv_into(buffer[got:nbytes])
                            if n == 0:
                                raise ConnectionError("sender went away")
                            got += n
                    conn.sendall(b"k")


def _raw_sender(ports: list[int], ctl: Connection, plan: list[Phase]) -> None:
    payload = memoryview(bytes(max(n for n, _, _ in plan)))
    with socket.create_connection(("127.0.0.1", ports[1])) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for nbytes, burst, rounds in plan:
            message = payload[:nbytes]
            for _ in range(rounds):
                ctl.recv()
                start = time.perf_counter()
                for _ in range(burst):
                    conn.sendall(message)
                if conn.recv(1) != b"k":
                    raise ConnectionError("receiver went away")
                ctl.send(time.perf_counter() - start)


# ---------------------------------------------------------------------------- ZmqTransport


def _transport(rank: int, ports: list[int], plan: list[Phase], tune_malloc: bool) -> ZmqTransport:
    return ZmqTransport(
        rank,
        [f"tcp://127.0.0.1:{p}" for p in ports],
        fingerprint=FINGERPRINT,
        max_message_bytes=max(n for n, _, _ in plan),
        tune_malloc=tune_malloc,
    )


def _message(sender: int, seq: int, tensors: tuple[torch.Tensor, ...]) -> Message:
    return Message(
        sender=sender,
        receiver=1 - sender,
        round=seq,
        seq=seq,
        weight=0.5,
        tensors=tensors,
        fingerprint=FINGERPRINT,
    )


def _zmq_receiver(
    ports: list[int], ready: Connection, plan: list[Phase], *, tune_malloc: bool = True
) -> None:
    transport = _transport(1, ports, plan, tune_malloc)

    async def main() -> None:
        await transport.start()
        ready.send(True)
        seq = 0
        try:
            for _, burst, rounds in plan:
                for _ in range(rounds):
                    for _ in range(burst):
                        await transport.recv()
                    await transport.send(0, _message(1, seq, ()))
                    seq += 1
        finally:
            await transport.close()

    _run(main)


def _zmq_sender(
    ports: list[int], ctl: Connection, plan: list[Phase], *, tune_malloc: bool = True
) -> None:
    transport = _transport(0, ports, plan, tune_malloc)

    async def main() -> None:
        await transport.start()
        seq = 0
        try:
            for nbytes, burst, rounds in plan:
                tensors = (torch.rand(nbytes // 4),)
                for _ in range(rounds):
                    ctl.recv()  # blocking, but nothing else runs in this loop meanwhile
                    start = time.perf_counter()
                    for _ in range(burst):
                        await transport.send(1, _message(0, seq, tensors))
                        seq += 1
                    await asyncio.wait_for(transport.recv(), 60)
                    ctl.send(time.perf_counter() - start)
        finally:
            await transport.close()

    _run(main)


# ---------------------------------------------------------------------------- driver


Body = Callable[..., None]
"""A process body: ``(ports, pipe, plan)``; ``ports[1]`` is the receiver's."""

HUGETLB = "glibc.malloc.hugetlb=1"
CASES: dict[str, tuple[Body, Body, dict[str, str]]] = {
    "raw": (_raw_receiver, _raw_sender, {}),
    "zmq": (_zmq_receiver, _zmq_sender, {}),
    "zmq tune_malloc=False": (
        functools.partial(_zmq_receiver, tune_malloc=False),
        functools.partial(_zmq_sender, tune_malloc=False),
        {},
    ),
    f"zmq GLIBC_TUNABLES={HUGETLB}": (
        functools.partial(_zmq_receiver, tune_malloc=False),
        functools.partial(_zmq_sender, tune_malloc=False),
        {"GLIBC_TUNABLES": HUGETLB},
    ),
}
"""Name: (receiver, sender, environment of both processes)."""


@contextmanager
def _environment(env: dict[str, str]) -> Iterator[None]:
    """``env`` added to ``os.environ`` while processes start (they copy it then)."""
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class Pair:
    """A receiver and a sender process; the sender times one measurement per ``round()``."""

    def __init__(self, receiver: Body, sender: Body, env: dict[str, str], *args: Any) -> None:
        ctx = mp.get_context("spawn")
        ports = _free_ports(2)
        ready, ready_out = ctx.Pipe(duplex=False)
        self._ctl, ctl_child = ctx.Pipe()
        self.procs = [
            ctx.Process(target=receiver, args=(ports, ready_out, *args), daemon=True),
            ctx.Process(target=sender, args=(ports, ctl_child, *args), daemon=True),
        ]
        with _environment(env):
            self.procs[0].start()
            if not ready.poll(60):
                raise RuntimeError("receiver did not start")
            self.procs[1].start()

    def round(self) -> float:
        self._ctl.send(True)
        if not self._ctl.poll(120):
            raise RuntimeError("sender did not answer")
        seconds: float = self._ctl.recv()
        return seconds

    def close(self) -> None:
        for proc in self.procs:
            proc.join(30)
            if proc.is_alive():
                proc.terminate()
                proc.join(5)


def measure(plan: list[Phase], cases: list[str]) -> list[dict[str, list[float]]]:
    """Seconds per measurement, per phase of ``plan`` and case; the cases take turns."""
    times: list[dict[str, list[float]]] = [{name: [] for name in cases} for _ in plan]
    pairs: dict[str, Pair] = {}
    try:
        for name in cases:
            receiver, sender, env = CASES[name]
            pairs[name] = Pair(receiver, sender, env, plan)
        for phase, (_, _, rounds) in enumerate(plan):
            for _ in range(rounds):
                for name, pair in pairs.items():
                    times[phase][name].append(pair.round())
    finally:
        for pair in pairs.values():
            pair.close()
    return times


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"min": ordered[0], "median": statistics.median(ordered), "max": ordered[-1]}


def parse_size(text: str) -> int:
    """Bytes from ``1KiB``, ``64MiB``, ``1GiB`` or a plain number; a multiple of 4."""
    units = {"": 1, "b": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30}
    number = text.strip().rstrip("BbIiKkMmGg")
    unit = text.strip()[len(number) :].lower()
    if not number.isdigit() or unit not in units:
        raise argparse.ArgumentTypeError(f"bad size {text!r}: use e.g. 1KiB, 1MiB, 64MiB")
    nbytes = int(number) * units[unit]
    if nbytes < 4 or nbytes % 4:
        raise argparse.ArgumentTypeError(f"size {text!r} must be a positive multiple of 4 bytes")
    return nbytes


def _name(nbytes: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if nbytes >= 1 << shift and nbytes % (1 << shift) == 0:
            return f"{nbytes >> shift} {unit}"
    return f"{nbytes} B"


def report(
    nbytes: int, burst: int, latency: dict[str, list[float]], bursts: dict[str, list[float]]
) -> dict[str, Any]:
    """Figures of one message size. Ratios compare each measurement with the raw one of its
    turn (moments before it): neighbours in time see the same background load, so on a
    shared machine they are steadier than the figures themselves."""
    return {
        "bytes": nbytes,
        "burst": burst,
        "latency_s": {name: summary(t) for name, t in latency.items()},
        "latency_over_raw": {
            name: summary([s / raw for raw, s in zip(latency["raw"], t, strict=True)])
            for name, t in latency.items()
            if name != "raw"
        },
        "throughput_bytes_per_s": {
            name: summary([burst * nbytes / s for s in t]) for name, t in bursts.items()
        },
        "throughput_share_of_raw": {
            name: summary([raw / s for raw, s in zip(bursts["raw"], t, strict=True)])
            for name, t in bursts.items()
            if name != "raw"
        },
    }


def _line(name: str, width: int, r: dict[str, float], scale: float, fmt: str) -> str:
    return f"    {name:{width}s}  " + " / ".join(
        f"{r[k] * scale:{fmt}}" for k in ("min", "median", "max")
    )


def print_size(size: dict[str, Any]) -> None:
    width = max(map(len, size["latency_s"]))
    small = size["bytes"] < 1 << 20
    unit, scale = ("us", 1e6) if small else ("ms", 1e3)
    print(f"{_name(size['bytes'])} messages")
    print(f"  latency: message there, acknowledgement back, {unit}; time over raw's")
    for name, r in size["latency_s"].items():
        line = _line(name, width, r, scale, "9.1f")
        if name in size["latency_over_raw"]:
            q = size["latency_over_raw"][name]
            line += f"   {q['min']:5.2f} / {q['median']:5.2f} / {q['max']:5.2f} x raw"
        print(line)
    burst = size["burst"]
    what = f"bursts of {burst} messages" if burst > 1 else "the latency runs"
    print(f"  throughput ({what}), MB/s; share of raw's")
    for name, r in size["throughput_bytes_per_s"].items():
        line = _line(name, width, r, 1e-6, "9.1f")
        if name in size["throughput_share_of_raw"]:
            q = size["throughput_share_of_raw"][name]
            line += f"   {q['min']:4.0%} / {q['median']:4.0%} / {q['max']:4.0%} of raw"
        print(line)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--sizes",
        type=lambda text: [parse_size(t) for t in text.split(",")],
        default=[1 << 10, 1 << 20, 64 << 20],
        help="message sizes, comma-separated (default: 1KiB,1MiB,64MiB)",
    )
    parser.add_argument("--size-mib", type=int, help="one message size in MiB (overrides --sizes)")
    parser.add_argument("--repeats", type=int, default=5, help="timed measurements per case")
    parser.add_argument(
        "--warmup", type=int, default=5, help="untimed measurements per case (see the docstring)"
    )
    parser.add_argument("--burst-mib", type=int, default=64, help="MiB per throughput burst")
    parser.add_argument("--max-burst", type=int, default=1000, help="messages per burst, at most")
    parser.add_argument(
        "--cases",
        default=",".join(CASES),
        help=f"comma-separated, raw included (default: all: {', '.join(CASES)})",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    sizes: list[int] = [args.size_mib << 20] if args.size_mib else args.sizes
    cases = [c.strip() for c in args.cases.split(",")]
    unknown = [c for c in cases if c not in CASES]
    if unknown or "raw" not in cases:
        parser.error(f"--cases: pick from {list(CASES)}, raw included (got {args.cases!r})")
    if args.repeats < 1 or args.warmup < 0 or args.burst_mib < 1 or args.max_burst < 1:
        parser.error("--repeats, --burst-mib and --max-burst must be >= 1, --warmup >= 0")
    rounds = args.warmup + args.repeats
    bursts = [max(1, min(args.max_burst, (args.burst_mib << 20) // n)) for n in sizes]
    plan: list[Phase] = []
    for nbytes, burst in zip(sizes, bursts, strict=True):
        plan.append((nbytes, 1, rounds))  # latency
        if burst > 1:
            plan.append((nbytes, burst, rounds))  # throughput
    phases = iter(measure(plan, cases))
    results = []
    for nbytes, burst in zip(sizes, bursts, strict=True):
        latency = {name: t[args.warmup :] for name, t in next(phases).items()}
        runs = (
            {name: t[args.warmup :] for name, t in next(phases).items()} if burst > 1 else latency
        )
        results.append(report(nbytes, burst, latency, runs))
    result: dict[str, Any] = {
        "repeats": args.repeats,
        "warmup": args.warmup,
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "sizes": results,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(
        f"loopback, {args.repeats} timed measurements per case and figure (after "
        f"{args.warmup} untimed); min / median / max, and the ratio to the raw measurement "
        "of the same turn"
    )
    for size in result["sizes"]:
        print_size(size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
