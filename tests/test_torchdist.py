"""The torch.distributed transport: header checks in one process, gloo runs across processes.

The multi-process tests start real worker processes (each one a rank of a gloo process
group, or of a ZeroMQ job) with a hard timeout; the ``jobs`` fixture kills their process
groups if a test fails or hangs. This file is also the worker's script (``__main__``).
The NCCL test needs two CUDA devices and is skipped without them: the CUDA paths of the
transport have not run on a GPU here.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import pytest
import torch
import torch.distributed as dist

from gossip_sgp import SGP, GossipConfig, GossipNode, wire
from gossip_sgp.errors import ConfigError, TransportError, WireError
from gossip_sgp.launch import find_free_ports
from gossip_sgp.message import Message, MessageKind
from tests.procs import Jobs
from tests.threads import run_threads
from transports import InProcNetwork
from transports.base import PlansRounds
from transports.torchdist import HEADER_BYTES, TorchDistTransport
from transports.zmq import ZmqTransport

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- in one process
def _message(**changes: object) -> Message:
    fields: dict[str, object] = {
        "sender": 1,
        "receiver": 0,
        "round": 3,
        "seq": 7,
        "weight": 0.5,
        "tensors": (torch.arange(6, dtype=torch.float64).view(2, 3), torch.ones(4)),
        "fingerprint": 12345,
        "sent_at": 1.5,
        "codec": "int8",
        "gauge": 0.25,
        "raw_bytes": 64,
        "incarnation": 3,
    }
    fields.update(changes)
    return Message(**fields)  # type: ignore[arg-type]


def _receiver() -> TorchDistTransport:
    return TorchDistTransport(0, 4, device="cpu", max_message_bytes=1 << 20)


def test_header_carries_every_message_field() -> None:
    sent = _message()
    header = TorchDistTransport(1, 4, device="cpu")._header(sent)
    assert header.shape == (HEADER_BYTES,)
    assert header.dtype == torch.uint8
    message, error, specs = _receiver()._parse_header(header, 1, 3)
    assert error is None
    assert message is not None
    assert specs == [(torch.float64, (2, 3)), (torch.float32, (4,))]
    for name in ("sender", "receiver", "round", "seq", "weight", "fingerprint", "sent_at"):
        assert getattr(message, name) == getattr(sent, name), name
    assert (message.kind, message.codec, message.gauge) == (MessageKind.MASS, "int8", 0.25)
    assert (message.raw_bytes, message.incarnation) == (64, 3)


@pytest.mark.parametrize(
    ("changes", "src", "round", "reason"),
    [
        ({}, 2, 3, "unknown_sender"),  # rank 2's link carries rank 1's header
        ({}, 1, 4, "malformed"),  # a header of another round
        ({"receiver": 2}, 1, 3, "wrong_receiver"),
        ({"codec": ""}, 1, 3, "malformed"),
    ],
)
def test_invalid_header_is_rejected_and_link_stays_in_step(
    changes: dict[str, object], src: int, round: int, reason: str
) -> None:
    header = TorchDistTransport(1, 4, device="cpu")._header(_message(**changes))
    message, error, specs = _receiver()._parse_header(header, src, round)
    assert message is None
    assert error is not None
    assert error.reason == reason
    assert len(specs) == 2  # the payload is still received, so the link stays in step


def test_unreadable_header_stops_the_transport() -> None:
    receiver = _receiver()
    garbage = torch.full((HEADER_BYTES,), 0xFF, dtype=torch.uint8)  # length 2**32 - 1
    with pytest.raises(TransportError, match="unreadable header from rank 1"):
        receiver._parse_header(garbage, 1, 3)
    huge = _message(tensors=(torch.ones(1 << 19),))  # 2 MiB > max_message_bytes
    header = TorchDistTransport(1, 4, device="cpu")._header(huge)
    with pytest.raises(TransportError, match="payload over"):
        receiver._parse_header(header, 1, 3)
    # An empty tensor whose strides overflow: torch's view() raised RuntimeError, not this.
    fields = msgpack.unpackb(bytes(wire.encode(_message(tensors=(torch.ones(1),)))[0]))
    fields["tensors"] = [["float32", [0, 1 << 31, 1 << 31, 1 << 31]]]
    packed = msgpack.packb(fields)
    raw = len(packed).to_bytes(4, "little") + packed
    header = torch.zeros(HEADER_BYTES, dtype=torch.uint8)
    header[: len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    with pytest.raises(TransportError, match="payload over"):
        receiver._parse_header(header, 1, 3)
    assert receiver.stats.rejected["malformed"] == 3


@pytest.mark.asyncio
async def test_send_needs_a_planned_round_and_drops_acknowledgements() -> None:
    transport = TorchDistTransport(1, 4, device="cpu")
    with pytest.raises(TransportError, match="no planned round-3 send to rank 0"):
        await transport.send(0, _message())
    ack = Message(sender=1, receiver=0, round=3, seq=7, weight=0.0, tensors=(), kind=1)  # type: ignore[arg-type]
    await transport.send(0, ack)  # acknowledgements never cross the wire
    assert not transport.stats.messages_sent
    transport.plan_round(5, [0], [2])
    with pytest.raises(TransportError, match="round 2 planned after round 5"):
        transport.plan_round(2, [0], [2])
    transport.plan_round(7, [0], [0])
    with pytest.raises(WireError, match="bad_weight"):  # refused at send, not in the exchange
        await transport.send(0, _message(sender=1, receiver=0, round=7, weight=float("nan")))


def test_only_the_torch_transport_plans_rounds() -> None:
    assert isinstance(TorchDistTransport(1, 4, device="cpu"), PlansRounds)
    assert not isinstance(InProcNetwork(2).transport(0), PlansRounds)
    zmq_transport = ZmqTransport(0, ["tcp://127.0.0.1:1", "tcp://127.0.0.1:2"], fingerprint=None)
    assert not isinstance(zmq_transport, PlansRounds)  # never started: no socket


def test_sgp_refuses_asynchronous_mode_over_torch_distributed() -> None:
    config = GossipConfig.local(4, 0, ports=range(41000, 41004), transport="torch")
    node = GossipNode(config)  # never started: no process group is needed to refuse
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"staleness=None .* torch\.distributed transport"):
        SGP(model.parameters(), optimizer, node, staleness=None)
    assert node.plans_rounds


def _torchrun_env(rank: int, world: int, port: int) -> dict[str, str]:
    return {
        "RANK": str(rank),
        "WORLD_SIZE": str(world),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "TORCHELASTIC_RUN_ID": "test",
        "GOSSIP_SGP_TIMEOUT": "20",
    }


@pytest.mark.timeout(60)
def test_from_env_exchanges_addresses_through_the_tcpstore() -> None:
    # torchrun's agent hosts the store; here the test does, and two threads are the ranks.
    store = dist.TCPStore("127.0.0.1", 0, 3, is_master=True, wait_for_workers=False)  # type: ignore[attr-defined]
    a, b = run_threads(2, lambda r: GossipConfig.from_env(_torchrun_env(r, 2, store.port)), join=30)
    assert (a.rank, b.rank) == (0, 1)
    assert a.peers == b.peers
    assert [p.host for p in a.peers] == ["127.0.0.1", "127.0.0.1"]
    assert a.peers[0].port != a.peers[1].port
    assert a.transport == "zmq"


@pytest.mark.timeout(60)
def test_from_env_without_the_other_ranks_says_what_is_missing() -> None:
    store = dist.TCPStore("127.0.0.1", 0, 2, is_master=True, wait_for_workers=False)  # type: ignore[attr-defined]
    env = {**_torchrun_env(0, 2, store.port), "GOSSIP_SGP_TIMEOUT": "1"}
    with pytest.raises(ConfigError, match="could not be exchanged through the TCPStore"):
        GossipConfig.from_env(env)


# ------------------------------------------------------------------ worker processes
def _run_workers(jobs: Jobs, envs: list[dict[str, str]], args: list[str], timeout: float) -> None:
    """Start one worker process per env; fail (killing them all) if one fails or runs over."""
    # as a module: run as a script, tests/ would shadow the packages
    prefix = [sys.executable, "-m", "tests.test_torchdist"]
    procs = [
        jobs.start(*args, prefix=prefix, env={"OMP_NUM_THREADS": "1", **env}, cwd=ROOT)
        for env in envs
    ]
    deadline = time.monotonic() + timeout
    for rank, proc in enumerate(procs):
        try:
            out, _ = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            jobs.cleanup()
            pytest.fail(f"worker {rank} ran over {timeout} s")
        if proc.returncode != 0:
            jobs.cleanup()
            pytest.fail(f"worker {rank} exited {proc.returncode}:\n{out[-3000:]}")


def _envs(n: int, transport: str) -> list[dict[str, str]]:
    *ports, master = find_free_ports("127.0.0.1", n + 1)
    peers = ",".join(f"127.0.0.1:{p}" for p in ports)
    return [
        {
            "GOSSIP_SGP_PEERS": peers,
            "GOSSIP_SGP_RANK": str(rank),
            "GOSSIP_SGP_TRANSPORT": transport,
            "GOSSIP_SGP_TIMEOUT": "30",
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(n),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(master),
        }
        for rank in range(n)
    ]


def _run(jobs: Jobs, tmp_path: Path, transport: str, *args: str) -> list[dict[str, object]]:
    out = tmp_path / transport
    out.mkdir()
    _run_workers(jobs, _envs(4, transport), ["--out", str(out), *args], timeout=120)
    return [json.loads((out / f"{rank}.json").read_text()) for rank in range(4)]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_synchronous_sgp_over_gloo_matches_zeromq(jobs: Jobs, tmp_path: Path) -> None:
    # Same seeds, model, data and rounds: synchronous SGP sums each round in sender order,
    # so the transport must not change a single parameter (1e-6 relative in float64).
    over_torch = _run(jobs, tmp_path, "torch", "--steps", "24")
    over_zmq = _run(jobs, tmp_path, "zmq", "--steps", "24")
    initial = torch.tensor(over_torch[0]["initial"], dtype=torch.float64)
    for rank, (a, b) in enumerate(zip(over_torch, over_zmq, strict=True)):
        assert a["dtype"] == b["dtype"] == "torch.float64"
        x = torch.tensor(a["params"], dtype=torch.float64)
        y = torch.tensor(b["params"], dtype=torch.float64)
        assert float((x - y).norm() / y.norm()) <= 1e-6, rank
        assert float((x - initial).norm() / initial.norm()) > 0.1  # training moved them
        # 24 rounds with one in-peer each, every message through the torch transport
        assert sum(a["received"].values()) == 24  # type: ignore[attr-defined]
        assert a["weight"] == pytest.approx(1.0)


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs two CUDA devices")
def test_synchronous_sgp_over_nccl_matches_zeromq(
    jobs: Jobs, tmp_path: Path
) -> None:  # pragma: no cover - needs GPUs
    n = 2
    out_torch, out_zmq = tmp_path / "nccl", tmp_path / "zmq"
    out_torch.mkdir()
    out_zmq.mkdir()
    _run_workers(jobs, _envs(n, "torch"), ["--out", str(out_torch), "--device", "cuda"], 120)
    _run_workers(jobs, _envs(n, "zmq"), ["--out", str(out_zmq)], timeout=120)
    for rank in range(n):
        a = json.loads((out_torch / f"{rank}.json").read_text())
        b = json.loads((out_zmq / f"{rank}.json").read_text())
        x = torch.tensor(a["params"], dtype=torch.float64)
        y = torch.tensor(b["params"], dtype=torch.float64)
        assert float((x - y).norm() / y.norm()) <= 1e-6


# ------------------------------------------------------------------------- worker
def _worker(argv: list[str]) -> None:
    """One rank: a small float64 MLP, SGP over the configured transport, results as JSON."""
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    config = GossipConfig.from_env()
    rank = config.rank
    device = torch.device(args.device, rank) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).to(
        device, torch.float64
    )
    initial = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).cpu()
    gen = torch.Generator().manual_seed(1000 + rank)
    x = torch.randn(64, 8, generator=gen, dtype=torch.float64)
    y = x.sum(dim=1, keepdim=True).sin() + 0.1 * rank
    x, y = x.to(device), y.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    with GossipNode(config) as node:
        sgp = SGP(model.parameters(), optimizer, node, staleness=0)
        for step in range(args.steps):
            idx = torch.arange(step * 8, step * 8 + 8) % 64
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(model(x[idx]), y[idx]).backward()  # type: ignore[no-untyped-call]
            sgp.step()
        params = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).cpu()
        result = {
            "params": params.tolist(),
            "dtype": str(params.dtype),
            "initial": initial.tolist(),
            "weight": sgp.weight,
            "received": {str(k): v for k, v in node.stats.messages_received.items()},
        }
    Path(args.out, f"{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    _worker(sys.argv[1:])
