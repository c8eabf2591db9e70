"""A tiny TCP probe for measuring emulated links (``benchmarks/wan_accuracy.py``, the tests
and ``python -m gossip_sgp.wan check`` run it inside the hosts' namespaces).

    python -m gossip_sgp.wan.probe serve 10.1.1.2 7000
    python -m gossip_sgp.wan.probe pingpong 10.1.1.2 7000 --count 20
    python -m gossip_sgp.wan.probe send 10.1.1.2 7000 --bytes 4000000

``serve`` prints ``listening`` once it accepts connections, then serves each in a thread:
the client's first byte picks the mode, ``p`` (echo one-byte messages), ``s`` (read to
the end of the stream, then answer the byte count as 8 bytes) or ``h`` (the same, then also
the SHA-256 of the bytes); in these two it first answers ``!``. ``pingpong`` and ``send``
print one JSON object, times in seconds:

* pingpong: ``connect`` (until ``connect()`` returned), ``first`` (from before
  ``connect()`` until the first echo came back: connection set-up included) and ``rtts``
  (``--count`` more one-byte round trips on the same connection); with
  ``--connections N``, ``firsts`` has that of N connections one after the other (``rtts``
  and ``connect`` are the last one's);
* send: ``seconds`` from the first byte sent (after a first exchange, so connection
  set-up is not counted) until the server's count came back (the transfer plus one round
  trip) and ``bytes``; with ``--verify`` it sends random bytes
  and fails unless the server's SHA-256 of what it received matches (order included).

Standard library only: this file runs as a script. ``start_server`` and ``run_client``
start it inside an emulator's hosts.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import selectors
import socket
import struct
import subprocess
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gossip_sgp.wan import WanEmulator

CHUNK = 1 << 20


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        got = conn.recv(n - len(data))
        if not got:
            raise ConnectionError("connection closed early")
        data += got
    return data


def _handle(conn: socket.socket) -> None:
    with conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        mode = conn.recv(1)
        if mode == b"p":
            while byte := conn.recv(1):
                conn.sendall(byte)
        elif mode in (b"s", b"h"):
            conn.sendall(b"!")  # the client starts its clock on this
            buffer = bytearray(CHUNK)
            digest = hashlib.sha256()
            total = 0
            while n := conn.recv_into(buffer):
                total += n
                if mode == b"h":
                    digest.update(memoryview(buffer)[:n])
            conn.sendall(struct.pack("!Q", total) + (digest.digest() if mode == b"h" else b""))


def serve(host: str, port: int) -> None:
    with socket.create_server((host, port), backlog=64) as server:
        print("listening", flush=True)
        while True:
            conn, _ = server.accept()
            threading.Thread(target=_handle, args=(conn,), daemon=True).start()


def _connect(host: str, port: int, timeout: float) -> socket.socket:
    conn = socket.create_connection((host, port), timeout=timeout)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return conn


def pingpong(
    host: str, port: int, count: int, timeout: float, connections: int = 1
) -> dict[str, object]:
    if connections < 1:
        raise ValueError("connections must be >= 1")
    firsts: list[float] = []
    rtts: list[float] = []
    connected = 0.0
    for _ in range(connections):
        start = time.perf_counter()
        with _connect(host, port, timeout) as conn:
            connected = time.perf_counter() - start
            conn.sendall(b"px")
            _recv_exact(conn, 1)
            firsts.append(time.perf_counter() - start)
            rtts = []
            for _ in range(count):
                t = time.perf_counter()
                conn.sendall(b"x")
                _recv_exact(conn, 1)
                rtts.append(time.perf_counter() - t)
    return {"connect": connected, "first": firsts[0], "firsts": firsts, "rtts": rtts}


def send(host: str, port: int, nbytes: int, timeout: float, verify: bool) -> dict[str, object]:
    payload = memoryview(os.urandom(nbytes) if verify else bytes(min(nbytes, CHUNK)))
    with _connect(host, port, timeout) as conn:
        conn.sendall(b"h" if verify else b"s")
        _recv_exact(conn, 1)  # connection set-up done: time the transfer alone
        start = time.perf_counter()
        sent = 0
        while sent < nbytes:
            n = min(nbytes - sent, CHUNK)
            conn.sendall(payload[sent : sent + n] if verify else payload[:n])
            sent += n
        conn.shutdown(socket.SHUT_WR)
        answer = _recv_exact(conn, 8 + (32 if verify else 0))
        seconds = time.perf_counter() - start
    (count,) = struct.unpack_from("!Q", answer)
    if count != nbytes:
        raise ConnectionError(f"server counted {count} bytes, sent {nbytes}")
    if verify and answer[8:] != hashlib.sha256(payload).digest():
        raise ConnectionError("the server received other bytes than sent (order or content)")
    return {"seconds": seconds, "bytes": nbytes}


# ---------------------------------------------------------------------------- driver


def start_server(wan: WanEmulator, host: int, port: int = 7000) -> subprocess.Popen[str]:
    """``serve`` on host ``host`` (stopped when the emulator closes), once it listens."""
    argv = [sys.executable, "-m", "gossip_sgp.wan.probe", "serve", wan.address(host), str(port)]
    proc: subprocess.Popen[str] = wan.popen(host, argv, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        line = proc.stdout.readline() if sel.select(30) else ""
    proc.stdout.close()  # it prints nothing more
    if line.strip() != "listening":
        proc.kill()
        raise RuntimeError(f"probe server on host {host} did not start (exit {proc.poll()})")
    return proc


def run_client(
    wan: WanEmulator, host: int, mode: str, target: int, *args: str, port: int = 7000
) -> dict[str, Any]:
    """Run ``pingpong`` or ``send`` on host ``host`` against ``target``'s server."""
    argv = [
        sys.executable,
        "-m",
        "gossip_sgp.wan.probe",
        mode,
        wan.address(target),
        str(port),
        *args,
    ]
    done = subprocess.run(
        wan.command(host, argv), capture_output=True, text=True, timeout=300, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"probe {mode} failed: {done.stderr.strip()[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    for name in ("serve", "pingpong", "send"):
        p = sub.add_parser(name)
        p.add_argument("host")
        p.add_argument("port", type=int)
        if name != "serve":
            p.add_argument("--timeout", type=float, default=60.0, help="socket timeout, s")
    sub.choices["pingpong"].add_argument("--count", type=int, default=10)
    sub.choices["pingpong"].add_argument("--connections", type=int, default=1)
    sub.choices["send"].add_argument("--bytes", type=int, required=True)
    sub.choices["send"].add_argument("--verify", action="store_true", help="check the bytes")
    args = parser.parse_args(argv)
    if args.mode == "serve":
        serve(args.host, args.port)
        return 0
    if args.mode == "pingpong":
        result = pingpong(args.host, args.port, args.count, args.timeout, args.connections)
    else:
        result = send(args.host, args.port, args.bytes, args.timeout, args.verify)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
