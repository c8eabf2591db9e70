"""Loopback throughput of ZmqTransport against a raw TCP socket, in one run.

    python benchmarks/zmq_throughput.py --size-mib 64 --repeats 10
    python benchmarks/zmq_throughput.py --json > zmq.json

Each case moves ``--size-mib`` MiB from a sender process to a receiver process over
127.0.0.1 and times, in the sender, from the start of the send until a tiny acknowledgement
comes back from the receiver, so each figure is end to end:

* raw: ``socket.sendall`` of one buffer; the receiver ``recv_into``s one preallocated
  buffer, then acknowledges. The floor any transport can hope for: no allocation, no
  framing, no validation.
* zmq: ``ZmqTransport.send`` of a float32 ``Message`` (encode included); the receiving
  ``ZmqTransport.recv`` validates and decodes it (non-finite check included) before the
  receiver acknowledges with a tensor-less message. The transport as a user gets it.
* zmq, tune_malloc=False: the same without the transport's malloc tuning. This is also what
  a process gets when the tuning cannot take effect (see ``transports/zmq.py``).
* zmq, GLIBC_TUNABLES=glibc.malloc.hugetlb=1: untuned, with glibc asked (in the environment,
  at process start) to put freshly mapped blocks on transparent huge pages instead.

Every end is its own process (with its own event loop, uvloop where installed), as in a real
job. The cases' messages take turns (all pairs of processes stay up, only one sends at a
time), so background load on a shared machine hits them alike. The first ``--warmup``
messages of each case are not reported: ZeroMQ's first few messages after an idle spell
take several times longer than the steady state, and the first large message grows the
receiver's heap.
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


# ---------------------------------------------------------------------------- raw TCP


def _raw_receiver(ports: list[int], ready: Connection, nbytes: int, rounds: int) -> None:
    with socket.create_server(("127.0.0.1", ports[1])) as server:
        ready.send(True)
        conn, _ = server.accept()
        with conn:
            buffer = memoryview(bytearray(nbytes))
            for _ in range(rounds):
                got = 0
                while got < nbytes:
                    n = conn.recv_into(buffer[got:])
                    if n == 0:
                        raise ConnectionError("sender went away")
                    got += n
                conn.sendall(b"k")


def _raw_sender(ports: list[int], ctl: Connection, nbytes: int, rounds: int) -> None:
    payload = bytes(nbytes)
    with socket.create_connection(("127.0.0.1", ports[1])) as conn:
        for _ in range(rounds):
            ctl.recv()
            start = time.perf_counter()
            conn.sendall(payload)
            if conn.recv(1) != b"k":
                raise ConnectionError("receiver went away")
            ctl.send(time.perf_counter() - start)


# ---------------------------------------------------------------------------- ZmqTransport


def _zmq_receiver(
    ports: list[int], ready: Connection, nbytes: int, rounds: int, *, tune_malloc: bool = True
) -> None:
    addresses = [f"tcp://127.0.0.1:{p}" for p in ports]
    transport = ZmqTransport(
        1, addresses, fingerprint=FINGERPRINT, max_message_bytes=nbytes, tune_malloc=tune_malloc
    )

    async def main() -> None:
        await transport.start()
        ready.send(True)
        try:
            for seq in range(rounds):
                await transport.recv()
                ack = Message(
                    sender=1,
                    receiver=0,
                    round=seq,
                    seq=seq,
                    weight=1.0,
                    tensors=(),
                    fingerprint=FINGERPRINT,
                )
                await transport.send(0, ack)
        finally:
            await transport.close()

    _run(main)


def _zmq_sender(
    ports: list[int], ctl: Connection, nbytes: int, rounds: int, *, tune_malloc: bool = True
) -> None:
    addresses = [f"tcp://127.0.0.1:{p}" for p in ports]
    transport = ZmqTransport(
        0, addresses, fingerprint=FINGERPRINT, max_message_bytes=nbytes, tune_malloc=tune_malloc
    )
    tensor = torch.rand(nbytes // 4)

    async def main() -> None:
        await transport.start()
        try:
            for seq in range(rounds):
                message = Message(
                    sender=0,
                    receiver=1,
                    round=seq,
                    seq=seq,
                    weight=0.5,
                    tensors=(tensor,),
                    fingerprint=FINGERPRINT,
                )
                ctl.recv()  # blocking, but nothing else runs in this loop meanwhile
                start = time.perf_counter()
                await transport.send(1, message)
                await asyncio.wait_for(transport.recv(), 60)
                ctl.send(time.perf_counter() - start)
        finally:
            await transport.close()

    _run(main)


# ---------------------------------------------------------------------------- driver


Body = Callable[..., None]
"""A process body: ``(ports, pipe, nbytes, rounds)``; ``ports[1]`` is the receiver's."""

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
    """A receiver and a sender process; the sender times one message per ``round()``."""

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


def measure(nbytes: int, rounds: int) -> dict[str, list[float]]:
    """Seconds per message for each case, the cases' messages taking turns."""
    times: dict[str, list[float]] = {name: [] for name in CASES}
    pairs: dict[str, Pair] = {}
    try:
        for name, (receiver, sender, env) in CASES.items():
            pairs[name] = Pair(receiver, sender, env, nbytes, rounds)
        for _ in range(rounds):
            for name, pair in pairs.items():
                times[name].append(pair.round())
    finally:
        for pair in pairs.values():
            pair.close()
    return times


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"min": ordered[0], "median": statistics.median(ordered), "max": ordered[-1]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=64, help="message size in MiB")
    parser.add_argument("--repeats", type=int, default=5, help="timed messages per case")
    parser.add_argument(
        "--warmup", type=int, default=5, help="untimed messages per case (see the docstring)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    nbytes = args.size_mib << 20
    times = {
        name: t[args.warmup :] for name, t in measure(nbytes, args.warmup + args.repeats).items()
    }
    cases = {name: summary([nbytes / s / 1e9 for s in t]) for name, t in times.items()}
    # Each message's throughput over that of the raw message of its round (sent moments
    # before it): neighbours in time see the same background load, so on a shared machine
    # these ratios are steadier than the rates themselves.
    ratios = {
        name: summary([raw / s for raw, s in zip(times["raw"], t, strict=True)])
        for name, t in times.items()
        if name != "raw"
    }
    result: dict[str, Any] = {
        "size_mib": args.size_mib,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "unit": "GB/s (1e9 bytes per second)",
        "cases": cases,
        "ratio_to_raw": ratios,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(
        f"{args.size_mib} MiB messages, {args.repeats} timed per case, loopback; "
        f"{result['unit']} and ratio to the raw message of the same round, min / median / max"
    )
    width = max(map(len, cases))
    for name, r in cases.items():
        line = f"  {name:{width}s}  {r['min']:5.2f} / {r['median']:5.2f} / {r['max']:5.2f}"
        if name in ratios:
            q = ratios[name]
            line += f"   {q['min']:4.0%} / {q['median']:4.0%} / {q['max']:4.0%} of raw"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
