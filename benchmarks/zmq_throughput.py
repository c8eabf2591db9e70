"""Loopback throughput of ZmqTransport against a raw TCP socket, in one run.

    python benchmarks/zmq_throughput.py --size-mib 64 --repeats 5
    python benchmarks/zmq_throughput.py --json > zmq.json

Each case moves ``--size-mib`` MiB from a sender process to a receiver process over
127.0.0.1 and times, in the sender, from the start of the send until a tiny acknowledgement
comes back from the receiver:

* raw: ``socket.sendall`` of one buffer; the receiver ``recv_into``s one preallocated
  buffer, then acknowledges. The floor any transport can hope for.
* pyzmq: plain PUSH/PULL, a 200-byte frame plus the payload frame, ``copy=False`` on both
  ends, nothing decoded: what libzmq itself costs.
* zmq: ``ZmqTransport.send`` of a float32 ``Message``; the receiving ``ZmqTransport.recv``
  validates and decodes it (non-finite check included) before the receiver acknowledges
  with a tensor-less message. Encode and decode are inside the timed span.

Every end is its own process (with its own event loop, uvloop where installed), as in a real
job. The cases' messages take turns (all pairs of processes stay up, only one sends at a
time), so background load on a shared machine hits them alike. The first ``--warmup``
messages of each case are not reported: on the VM these figures come from, ZeroMQ's first
few messages after an idle spell take several times longer than the steady state.

The whole runs twice: with the default allocator settings, and with
``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` in the environment of every process. That
matters because libzmq receives every message into freshly allocated memory: with 4 KiB
pages the kernel faults it in page by page, which can cost more than the copy from the
socket itself; with the tunable, glibc asks for transparent huge pages instead. The raw
case reuses one buffer, so it pays that cost once.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import socket
import statistics
import sys
import time
from collections.abc import Callable, Coroutine
from multiprocessing.connection import Connection
from typing import Any

import torch
import zmq

from gossip_sgp.message import Message
from transports.zmq import ZmqTransport

FINGERPRINT = 0x5EED
HUGETLB = "glibc.malloc.hugetlb=1"


def _run(main: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main())
    return uvloop.run(main())


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


# ---------------------------------------------------------------------------- raw TCP


def _raw_receiver(port: int, ready: Connection, nbytes: int, rounds: int) -> None:
    with socket.create_server(("127.0.0.1", port)) as server:
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


def _raw_sender(port: int, ctl: Connection, nbytes: int, rounds: int) -> None:
    payload = bytes(nbytes)
    with socket.create_connection(("127.0.0.1", port)) as conn:
        for _ in range(rounds):
            ctl.recv()
            start = time.perf_counter()
            conn.sendall(payload)
            if conn.recv(1) != b"k":
                raise ConnectionError("receiver went away")
            ctl.send(time.perf_counter() - start)


# ---------------------------------------------------------------------------- plain pyzmq


def _pyzmq_receiver(ports: list[int], ready: Connection, nbytes: int, rounds: int) -> None:
    context = zmq.Context()
    pull, push = context.socket(zmq.PULL), context.socket(zmq.PUSH)
    pull.bind(f"tcp://127.0.0.1:{ports[1]}")
    push.connect(f"tcp://127.0.0.1:{ports[0]}")
    ready.send(True)
    for _ in range(rounds):
        frames = pull.recv_multipart(copy=False)
        del frames
        push.send(b"k")
    context.destroy(linger=1000)


def _pyzmq_sender(ports: list[int], ctl: Connection, nbytes: int, rounds: int) -> None:
    context = zmq.Context()
    pull, push = context.socket(zmq.PULL), context.socket(zmq.PUSH)
    pull.bind(f"tcp://127.0.0.1:{ports[0]}")
    push.connect(f"tcp://127.0.0.1:{ports[1]}")
    frames: list[bytes | bytearray] = [bytes(200), bytearray(nbytes)]
    for _ in range(rounds):
        ctl.recv()
        start = time.perf_counter()
        push.send_multipart(frames, copy=False)
        pull.recv()
        ctl.send(time.perf_counter() - start)
    context.destroy(linger=0)


# ---------------------------------------------------------------------------- ZmqTransport


def _zmq_receiver(ports: list[int], ready: Connection, nbytes: int, rounds: int) -> None:
    addresses = [f"tcp://127.0.0.1:{p}" for p in ports]

    async def main() -> None:
        transport = ZmqTransport(1, addresses, fingerprint=FINGERPRINT, max_message_bytes=nbytes)
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


def _zmq_sender(ports: list[int], ctl: Connection, nbytes: int, rounds: int) -> None:
    addresses = [f"tcp://127.0.0.1:{p}" for p in ports]
    tensor = torch.rand(nbytes // 4)

    async def main() -> None:
        transport = ZmqTransport(0, addresses, fingerprint=FINGERPRINT, max_message_bytes=nbytes)
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


Case = Callable[..., None]
"""A process body: ``(port or ports, pipe, nbytes, rounds)``."""


class Pair:
    """A receiver and a sender process; the sender times one message per ``round()``."""

    def __init__(self, receiver: Case, sender: Case, *args: Any) -> None:
        ctx = mp.get_context("spawn")
        ports = _free_ports(2)
        port: Any = ports[1] if receiver is _raw_receiver else ports
        ready, ready_out = ctx.Pipe(duplex=False)
        self._ctl, ctl_child = ctx.Pipe()
        self.procs = [ctx.Process(target=receiver, args=(port, ready_out, *args), daemon=True)]
        self.procs[0].start()
        if not ready.poll(60):
            raise RuntimeError("receiver did not start")
        self.procs.append(ctx.Process(target=sender, args=(port, ctl_child, *args), daemon=True))
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


def measure(nbytes: int, rounds: int) -> dict[str, list[float]]:
    """Seconds per message for each case, the cases' messages taking turns."""
    times: dict[str, list[float]] = {name: [] for name in CASES}
    pairs: dict[str, Pair] = {}
    try:
        for name, (receiver, sender) in CASES.items():
            pairs[name] = Pair(receiver, sender, nbytes, rounds)
        for _ in range(rounds):
            for name, pair in pairs.items():
                times[name].append(pair.round())
    finally:
        for pair in pairs.values():
            pair.close()
    return times


CASES: dict[str, tuple[Case, Case]] = {
    "raw": (_raw_receiver, _raw_sender),
    "pyzmq": (_pyzmq_receiver, _pyzmq_sender),
    "zmq": (_zmq_receiver, _zmq_sender),
}


def summary(nbytes: int, times: list[float]) -> dict[str, float]:
    rates = sorted(nbytes / t / 1e9 for t in times)
    return {"min": rates[0], "median": statistics.median(rates), "max": rates[-1]}


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
    rounds = args.warmup + args.repeats
    result: dict[str, Any] = {
        "size_mib": args.size_mib,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "unit": "GB/s (1e9 bytes per second)",
    }
    for env in ("default", "hugetlb"):
        saved = os.environ.get("GLIBC_TUNABLES")
        if env == "hugetlb":  # the spawned processes read it at start-up
            os.environ["GLIBC_TUNABLES"] = HUGETLB if saved is None else f"{saved}:{HUGETLB}"
        try:
            times = measure(nbytes, rounds)
        finally:
            if saved is None:
                os.environ.pop("GLIBC_TUNABLES", None)
            else:
                os.environ["GLIBC_TUNABLES"] = saved
        result[env] = {name: summary(nbytes, t[args.warmup :]) for name, t in times.items()}
        result[env]["ratio"] = result[env]["zmq"]["median"] / result[env]["raw"]["median"]
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{args.size_mib} MiB messages, {args.repeats} timed, loopback, {result['unit']}")
    for env in ("default", "hugetlb"):
        print(f"{env} allocator:")
        for name in CASES:
            r = result[env][name]
            print(
                f"  {name:5s}  min {r['min']:5.2f}  median {r['median']:5.2f}  max {r['max']:5.2f}"
            )
        print(f"  zmq/raw (medians) {result[env]['ratio']:.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
