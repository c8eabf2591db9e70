"""Train a small CNN on scikit-learn's bundled digits with SGP (or a baseline), every option.

The trainer behind ``gossip-sgp demo`` and ``gossip-sgp bench``, and the workload of the
tests and benchmarks: every algorithm, mode, codec, topology, straggler, checkpoint and
rejoin option, a JSON summary gathered by rank 0. A tool, not part of the library's API; the
script to copy for your own training loop is ``examples/train_digits.py`` (public API
only). The SGP-specific lines are marked ``# SGP``.

    gossip-sgp launch --nproc 4 -m gossip_sgp.digits --epochs 20
    gossip-sgp launch --nproc 4 -m gossip_sgp.digits --algorithm allreduce
    gossip-sgp launch --nproc 4 -m gossip_sgp.digits --staleness 1     # overlap
    gossip-sgp launch --nproc 4 -m gossip_sgp.digits --staleness none  # asynchronous
    gossip-sgp launch --nproc 4 --transport torch -m gossip_sgp.digits  # over gloo
    torchrun --standalone --nproc-per-node 4 -m gossip_sgp.digits --transport torch
    gossip-sgp launch --nproc 4 -m gossip_sgp.digits --compression int8  # 8-bit gossip
    gossip-sgp launch --nproc 4 -m gossip_sgp.digits --algorithm adpsgd --model mlp

Baselines for ``gossip-sgp bench``: ``allreduce`` (gradients all-reduced in ~25 MB buckets,
as DistributedDataParallel does), ``dpsgd`` and ``adpsgd`` (see ``gossip_sgp.baselines``) and
``local`` (no communication at all while training: the compute-only reference time).

Every worker trains on its own shard of the training set; rank 0 gathers the results through
torch's TCPStore (MASTER_ADDR/MASTER_PORT, set by the launcher; under torchrun, torchrun's
own store) and prints them; with
``--json`` its last line is one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import hashlib
import importlib.util
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from gossip_sgp import SGP, GossipConfig, GossipNode, RejoinRefused, StreamingSGP, baselines
from gossip_sgp.compression import parse_codec
from gossip_sgp.liveness import lost_weight
from gossip_sgp.outer import OUTER
from gossip_sgp.sgp import LAG_LIMIT


def digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits: (1797 x 64 pixel values 0-16, 1797 labels).

    Read straight from the CSV file scikit-learn ships (what ``load_digits`` reads):
    importing ``sklearn.datasets`` costs about 1.6 CPU-seconds, paid by every worker.
    """
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the digits example needs scikit-learn: pip install scikit-learn")
    path = Path(spec.submodule_search_locations[0], "datasets", "data", "digits.csv.gz")
    if not path.is_file():  # a future layout: take the documented way
        from sklearn.datasets import load_digits

        data = load_digits()
        return data.data, data.target
    table = np.loadtxt(path, delimiter=",")
    return table[:, :-1], table[:, -1].astype(np.int64)


def load_digits_split(
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The 1,797 8x8 digits, scaled to [0, 1], split 80/20 the same way on every worker."""
    images, labels = digits()
    x = torch.tensor(images, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.tensor(labels, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    n_test = len(y) // 5
    return x[n_test:], y[n_test:], x[:n_test], y[:n_test]


class SmallCNN(nn.Module):
    """Two 3x3 convolutions and two linear layers: about 43k parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        out: torch.Tensor = self.fc2(F.relu(self.fc1(x.flatten(1))))
        return out


class WideMLP(nn.Module):
    """The 8x8 image flattened, two hidden layers of ``width`` units: ``width**2 + 76*width + 10``
    parameters (5.5M at the default 2304). Big enough that communication matters, and
    cheap to compute on one CPU thread."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64, width),
            nn.ReLU(),
            nn.Linear(width, width),
            nn.ReLU(),
            nn.Linear(width, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.layers(x)
        return out


class EmulatedCompute:
    """``--emulate-compute MS``: a step's forward and backward pass replaced by a sleep
    (the CPU stays free, as while an accelerator computes) and a gradient drawn once per
    worker, small and fixed. What it leaves to measure is the optimizer step and the
    communication: time per iteration against the compute-only ``local`` run."""

    def __init__(self, model: nn.Module, args: argparse.Namespace, rank: int) -> None:
        self.seconds = args.emulate_compute / 1000
        gen = torch.Generator().manual_seed(args.seed * 1000 + rank)
        for p in model.parameters():
            p.grad = 1e-3 * torch.randn(p.shape, generator=gen, dtype=p.dtype)
        self.loss = torch.zeros(())

    def step(self) -> torch.Tensor:
        time.sleep(self.seconds)
        return self.loss


GOSSIP_ALGORITHMS = ("sgp", *baselines.ALGORITHMS)
"""The algorithms that gossip through a GossipNode (the others use gloo or nothing)."""

ALLREDUCE_BUCKET_BYTES = 25 * 2**20
"""Gradient bucket size of the AllReduce baseline: DistributedDataParallel's default."""


def build_model(args: argparse.Namespace) -> nn.Module:
    return SmallCNN() if args.model == "cnn" else WideMLP(args.width)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--algorithm",
        choices=(*GOSSIP_ALGORITHMS, "allreduce", "local"),
        default="sgp",
        help="sgp: push-sum gossip; allreduce: synchronous data parallel (gloo, bucketed); "
        "dpsgd: synchronous pairwise averaging; adpsgd: asynchronous pairwise averaging; "
        "local: no communication while training (compute-only reference)",
    )
    p.add_argument(
        "--model",
        choices=("cnn", "mlp"),
        default="cnn",
        help="cnn: small CNN (43k parameters); mlp: wide MLP (see --width)",
    )
    p.add_argument(
        "--width", type=int, default=2304, help="--model mlp: hidden units per layer (5.5M params)"
    )
    p.add_argument(
        "--eval-every",
        type=int,
        default=0,
        metavar="N",
        help="every N epochs rank 0 tests its own model (no communication) and records "
        "(seconds since start, accuracy) in the summary's 'evaluations'; 0: off",
    )
    p.add_argument(
        "--staleness",
        default="0",
        help="SGP only: 0 synchronous, N overlap by N rounds, 'none' asynchronous",
    )
    p.add_argument(
        "--lag-limit",
        default=str(LAG_LIMIT),
        metavar="N",
        help="asynchronous SGP: training steps a received model may be behind or ahead of a "
        f"worker's before they no longer mix, or 'none' (default {LAG_LIMIT})",
    )
    p.add_argument("--topology", default="exponential", help="SGP peer schedule")
    p.add_argument(
        "--transport",
        choices=("zmq", "torch"),
        help="SGP only: zmq, or torch (torch.distributed, gloo on CPU); default: the "
        "launcher's choice (GOSSIP_SGP_TRANSPORT), else zmq",
    )
    p.add_argument("--epochs", type=int, default=40, help="passes over each worker's shard")
    p.add_argument("--batch-size", type=int, default=32, help="per-worker batch size")
    p.add_argument("--lr", type=float, default=0.1, help="peak learning rate")
    p.add_argument("--seed", type=int, default=0, help="seed for model init and data order")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--json", action="store_true", help="rank 0 ends with one JSON line")
    p.add_argument("--quiet", action="store_true", help="no per-epoch progress lines")
    p.add_argument("--summary-file", help="rank 0 also writes the JSON summary to this file")
    p.add_argument(
        "--checkpoint",
        metavar="DIR",
        help="write DIR/rankR.pt at the end of every epoch (atomically; SGP: numerator, "
        "weight, round, sequence numbers and optimizer; plus schedule and data order)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="with --checkpoint: continue from DIR/rankR.pt where it exists",
    )
    p.add_argument(
        "--rejoin",
        action="store_true",
        help="asynchronous SGP: join a job that is already running (restart a worker that "
        "died with the same rank): start from half of a live neighbour's model and weight, "
        "at its step",
    )
    p.add_argument(
        "--straggler",
        metavar="RANK:FACTOR",
        help="make RANK's steps FACTOR times slower (it sleeps FACTOR-1 times each step's "
        "compute time), to try stragglers out",
    )
    p.add_argument(
        "--local-steps",
        type=int,
        metavar="H",
        help="SGP: gossip only every H steps, averaging the models and applying --outer "
        "(local steps with an outer optimizer; synchronous)",
    )
    p.add_argument(
        "--outer",
        choices=sorted(OUTER),
        help="with --local-steps: the outer optimizer (default average: local SGD; slowmo: "
        "slow momentum 0.5, lr 1; diloco: Nesterov momentum 0.9, lr 0.7)",
    )
    p.add_argument(
        "--outer-overlap",
        action="store_true",
        help="with --local-steps: average while the next H inner steps run, applying each "
        "outer step when its average is in (at most one outer step late)",
    )
    p.add_argument(
        "--fragments",
        type=int,
        metavar="F",
        help="with --local-steps: average the model in F fragments on staggered steps "
        "(StreamingSGP: 1/F of the model every H/F steps instead of all of it every H)",
    )
    p.add_argument(
        "--emulate-compute",
        type=float,
        metavar="MS",
        help="emulated accelerator: replace each step's forward and backward pass by a "
        "sleep of MS milliseconds (the CPU stays free) and a fixed random gradient; the "
        "optimizer step and all communication are real. Accuracy means nothing then; "
        "time per iteration does (size the model with --model mlp --width)",
    )
    p.add_argument(
        "--min-step-ms",
        type=float,
        default=0.0,
        metavar="MS",
        help="every worker sleeps until each step's compute has taken at least MS "
        "milliseconds: the CPU stays free meanwhile, as when an accelerator computes, so "
        "more workers than cores behave as if each had its own (default 0: no padding)",
    )
    p.add_argument(
        "--compression",
        default="none",
        help="SGP only: message codec: none, fp16, bf16, int8[:BLOCK], topk:FRACTION",
    )
    args = p.parse_args(argv)
    try:
        parse_codec(args.compression)
    except ValueError as exc:
        p.error(f"--compression: {exc}")
    if args.staleness.lower() in ("none", "async"):
        args.staleness = None
    else:
        try:
            args.staleness = int(args.staleness)
        except ValueError:
            p.error(f"--staleness must be an integer >= 0 or 'none', got {args.staleness!r}")
        if args.staleness < 0:
            p.error("--staleness must be >= 0 or 'none'")
    transport = args.transport or os.environ.get("GOSSIP_SGP_TRANSPORT", "").strip()
    if args.lag_limit.lower() == "none":
        args.lag_limit = None
    elif args.lag_limit.isdigit() and int(args.lag_limit) >= 1:
        args.lag_limit = int(args.lag_limit)
    else:
        p.error(f"--lag-limit must be an integer >= 1 or 'none', got {args.lag_limit!r}")
    if transport == "torch" and args.staleness is None and args.algorithm == "sgp":
        p.error("--staleness none (asynchronous) needs the zmq transport; torch runs 0 or N")
    if transport == "torch" and args.algorithm == "adpsgd":
        p.error("--algorithm adpsgd is asynchronous: it needs the zmq transport")
    args.straggler = parse_straggler(p, args.straggler)
    if args.rejoin and (args.algorithm != "sgp" or args.staleness is not None):
        p.error("--rejoin needs asynchronous SGP (--staleness none)")
    if args.resume and not args.checkpoint:
        p.error("--resume needs --checkpoint DIR")
    if args.eval_every < 0:
        p.error("--eval-every must be >= 0")
    if args.local_steps is not None:
        if args.local_steps < 1:
            p.error(f"--local-steps must be >= 1, got {args.local_steps}")
        if args.algorithm != "sgp" or args.staleness != 0:
            p.error("--local-steps needs --algorithm sgp and --staleness 0 (the default)")
        if args.fragments is not None and not 1 <= args.fragments <= args.local_steps:
            p.error(f"--fragments must be in 1..H (--local-steps), got {args.fragments}")
        if args.fragments is not None and transport == "torch":
            p.error("--fragments needs the zmq transport")
    elif args.outer is not None or args.outer_overlap or args.fragments is not None:
        p.error("--outer, --outer-overlap and --fragments go with --local-steps H")
    if args.emulate_compute is not None and not 0 <= args.emulate_compute <= 60_000:
        p.error(f"--emulate-compute must be in 0..60000, got {args.emulate_compute}")
    if not 0 <= args.min_step_ms <= 60_000:
        p.error(f"--min-step-ms must be in 0..60000, got {args.min_step_ms}")
    for name in ("epochs", "batch_size", "threads", "width"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def save_atomically(state: dict[str, Any], path: Path) -> None:
    """``torch.save`` to a temporary file, then rename: a crash never leaves half a file.

    The previous checkpoint is kept as ``rankR.prev.pt``: workers stopped while saving may
    be one epoch apart, and resuming needs the same epoch on every worker."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    if path.exists():  # a hard link, so that rankR.pt exists at every moment, also if a
        link = path.with_name(path.name + ".prev.tmp")  # signal lands between two renames
        link.unlink(missing_ok=True)
        os.link(path, link)
        os.replace(link, _previous(path))
    os.replace(tmp, path)


def _previous(path: Path) -> Path:
    return path.with_name(path.name.removesuffix(".pt") + ".prev.pt")


def load_common_checkpoint(
    path: Path, rank: int, world_size: int, store: Any
) -> dict[str, Any] | None:
    """This worker's checkpoint of the latest epoch that every worker has (None: start over).

    The workers agree through the store: each publishes the epochs it has saved."""
    found: dict[int, dict[str, Any]] = {}
    for candidate in (path, _previous(path)):
        if candidate.exists():
            state = torch.load(candidate, weights_only=True)  # data only, never code
            found[int(state["epoch"])] = state
    if store is None or world_size == 1:
        return found[max(found)] if found else None
    store.set(f"resume/{rank}", json.dumps(sorted(found)))
    common = set(found)
    for r in range(world_size):
        common &= set(json.loads(store.get(f"resume/{r}")))
    return found[max(common)] if common else None


def parse_straggler(p: argparse.ArgumentParser, text: str | None) -> tuple[int, float] | None:
    """``--straggler RANK:FACTOR`` as ``(rank, factor)``; None when not given."""
    if text is None:
        return None
    rank, sep, factor = text.partition(":")
    try:
        parsed = (int(rank), float(factor))
    except ValueError:
        parsed = None
    if not sep or parsed is None or parsed[0] < 0 or not 1.0 <= parsed[1] <= 1000.0:
        p.error(
            f"--straggler must be RANK:FACTOR with RANK >= 0 and FACTOR in 1..1000, got {text!r}"
        )
    return parsed


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        correct = int((model(x).argmax(dim=1) == y).sum().item())
    model.train()
    return correct / len(y)


def flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def open_store(rank: int, world_size: int) -> Any:
    """A key-value store shared by the workers, used to gather results (and by AllReduce)."""
    if world_size == 1:
        return None
    host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not host or not port:
        sys.exit("MASTER_ADDR and MASTER_PORT must be set (gossip-sgp launch/run set them)")
    # torchrun's agent already hosts a store on MASTER_PORT: join it as a client.
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(  # type: ignore[attr-defined]
        host,
        int(port),
        world_size,
        is_master=rank == 0 and not agent_store,
        timeout=timedelta(seconds=300),
    )
    return dist.PrefixStore("train_digits", store)  # type: ignore[attr-defined]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    gossip = args.algorithm in GOSSIP_ALGORITHMS
    if gossip:
        config = GossipConfig.from_env()  # SGP
        if args.transport is not None:
            config = dataclasses.replace(config, transport=args.transport)
        rank, world_size = config.rank, config.world_size
    else:
        rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    store = open_store(rank, world_size)

    x_train, y_train, x_test, y_test = load_digits_split()
    y_all = y_train
    x_train, y_train = x_train[rank::world_size], y_train[rank::world_size]  # this worker's shard
    torch.manual_seed(args.seed)  # the same initial model on every worker
    model = build_model(args)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=1e-4
    )
    # Every worker must take the same number of steps (synchronous gossip pairs them up), so
    # size the epoch by the smallest shard.
    steps_per_epoch = math.ceil((len(y_all) // world_size) / args.batch_size)
    total_steps = args.epochs * steps_per_epoch
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=args.lr, total_steps=total_steps, pct_start=0.15
    )
    if (args.algorithm == "allreduce" or (gossip and config.transport == "torch")) and (
        world_size > 1
    ):
        # AllReduce, and SGP's torch.distributed transport, run on a gloo process group.
        dist.init_process_group(
            "gloo",
            store=dist.PrefixStore("pg", store),  # type: ignore[attr-defined]
            rank=rank,
            world_size=world_size,
        )
    node = None
    if gossip:
        node = GossipNode(config).start()  # SGP: gossip thread + ZeroMQ sockets
    sgp: SGP | StreamingSGP
    if args.fragments is not None and node is not None:
        sgp = StreamingSGP(  # SGP: local steps, the model averaged a fragment at a time
            model.parameters(),
            optimizer,
            node,
            fragments=args.fragments,
            local_steps=args.local_steps,
            outer=args.outer,
            outer_overlap=args.outer_overlap,
            topology=args.topology,
            compression=args.compression,
        )
    elif args.algorithm == "sgp" and node is not None:
        sgp = SGP(
            model.parameters(),
            optimizer,
            node,
            topology=args.topology,  # SGP
            staleness=args.staleness,
            compression=args.compression,  # SGP: what the codec drops stays here
            local_steps=args.local_steps,  # SGP: None gossips every step
            outer=args.outer,
            outer_overlap=args.outer_overlap,  # SGP: average during the next H steps
            lag_limit=args.lag_limit,  # SGP, asynchronous: models far apart do not mix
        )
    elif node is not None:  # the decentralized baselines run on the same node
        make = baselines.dpsgd if args.algorithm == "dpsgd" else baselines.adpsgd
        sgp = make(model.parameters(), optimizer, node)
    # Everything made so far (torch's ~290k objects, the data, the model) lives until the
    # end: keep the garbage collector from walking it again in every full collection and
    # once more at exit (1 s per worker on 2 cores, 10% of a short run).
    emulated = None if args.emulate_compute is None else EmulatedCompute(model, args, rank)
    gc.freeze()
    try:
        order_gen = torch.Generator().manual_seed(args.seed * 1000 + rank)
        started, steps, first_epoch = time.perf_counter(), 0, 0
        checkpoint = None if args.checkpoint is None else Path(args.checkpoint) / f"rank{rank}.pt"
        saved = None
        if checkpoint is not None and args.resume:
            saved = load_common_checkpoint(checkpoint, rank, world_size, store)
        if saved is not None:
            if gossip:
                sgp.load_state_dict(saved["sgp"])  # SGP: x, w, round, sequence numbers
            else:
                model.load_state_dict(saved["model"])
                optimizer.load_state_dict(saved["optimizer"])
            schedule.load_state_dict(saved["schedule"])
            order_gen.set_state(saved["order_gen"])
            first_epoch = int(saved["epoch"])
            if rank == 0 and not args.quiet:
                print(f"resumed from the checkpoints of epoch {first_epoch}", flush=True)
        step_times: list[float] = []
        evaluations: list[tuple[float, int, float]] = []
        skip = 0  # steps of the first epoch that the job did before this worker rejoined
        if args.rejoin:
            try:
                assert isinstance(sgp, SGP)  # (--rejoin: asynchronous)
                done = sgp.rejoin()  # SGP: half of a live neighbour's mass, and its step
            except RejoinRefused as exc:  # the others are already agreeing on the result
                sys.exit(str(exc))
            if done >= total_steps:
                sys.exit(f"rank {rank}: the job has finished training; too late to rejoin")
            first_epoch, skip = divmod(done, steps_per_epoch)
            with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()"
                warnings.simplefilter("ignore", UserWarning)
                for _ in range(done):
                    schedule.step()
        for epoch in range(first_epoch, args.epochs):
            order = torch.randperm(len(y_train), generator=order_gen)
            epoch_loss = 0.0
            for i in range(skip if epoch == first_epoch else 0, steps_per_epoch):
                idx = order[i * args.batch_size : (i + 1) * args.batch_size]
                # Warm-up steps are not timed: a worker's first (connections, the first
                # all-reduce; with local steps the start's averaging) and the gossip
                # algorithms' start-up barrier (synchronous rounds in every mode).
                warm_up = steps == 0 or (gossip and sgp.start_up_rounds > 0)
                computing = time.perf_counter()
                if emulated is not None:  # an accelerator's forward and backward pass
                    loss = emulated.step()
                else:
                    optimizer.zero_grad()
                    loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
                    loss.backward()  # type: ignore[no-untyped-call]
                if args.min_step_ms:
                    time.sleep(
                        max(0.0, args.min_step_ms / 1000 - (time.perf_counter() - computing))
                    )
                if args.straggler is not None and args.straggler[0] == rank:
                    time.sleep((args.straggler[1] - 1) * (time.perf_counter() - computing))
                if gossip:
                    sgp.step()  # SGP: local step + one push-sum round
                else:
                    if args.algorithm == "allreduce":
                        allreduce_gradients(model, world_size)
                    optimizer.step()
                if not warm_up:
                    step_times.append(time.perf_counter() - computing)
                schedule.step()
                epoch_loss += loss.item()
                if gossip:
                    sgp.report(loss=loss.item())  # SGP: exported as gossip_sgp_loss
                steps += 1
            if rank == 0 and args.eval_every and (epoch + 1) % args.eval_every == 0:
                seconds = time.perf_counter() - started
                evaluations.append((seconds, epoch + 1, accuracy(model, x_test, y_test)))
            if checkpoint is not None:
                state = {
                    "epoch": epoch + 1,
                    "schedule": schedule.state_dict(),
                    "order_gen": order_gen.get_state(),
                }
                if gossip:
                    state["sgp"] = sgp.state_dict()  # SGP: call it on every worker together
                else:
                    state["model"] = model.state_dict()
                    state["optimizer"] = optimizer.state_dict()
                save_atomically(state, checkpoint)
            if rank == 0 and not args.quiet:
                done = (epoch + 1) / args.epochs
                bar = "#" * int(20 * done) + "." * (20 - int(20 * done))
                rate = steps / (time.perf_counter() - started)
                print(
                    f"epoch {epoch + 1:>3}/{args.epochs} [{bar}] loss "
                    f"{epoch_loss / steps_per_epoch:.4f}  {rate:.1f} steps/s",
                    flush=True,
                )
        if gossip:
            # SGP, outer_overlap: the last outer step still on its way is part of training
            # (its waiting counted in the last step, where sgp-local pays its own)
            waiting = time.perf_counter()
            sgp.outer_wait()
            if step_times:
                step_times[-1] += time.perf_counter() - waiting
        train_seconds = time.perf_counter() - started
        result: dict[str, Any] = {
            "steps": steps,
            "train_seconds": train_seconds,
            "step_seconds": step_times,
            "evaluations": evaluations,
        }
        if args.algorithm == "allreduce":
            result["bytes_sent"] = allreduce_bytes(model, world_size, steps)
        if gossip:
            result["weight"] = sgp.weight
            result["skipped_rounds"] = sgp.skipped_rounds
            result["kept_rounds"] = sgp.kept_rounds  # rounds kept: an out-peer was down
            result["lagged"] = sgp.snapshot().lagged  # shares far behind/ahead
            if isinstance(sgp, SGP) and isinstance(sgp.policy, baselines.PairwiseExchange):
                result["exchanges"] = sgp.policy.exchanges  # AD-PSGD: pairwise averagings completed
            assert node is not None
            # Bytes handed to the wire while training: headers, payloads and acknowledgements.
            result["bytes_sent"] = sum(node.stats.bytes_sent.values())
            # The numerators alone, as encoded by the codec and before (copies included).
            result["payload_bytes_sent"] = node.payload_bytes_sent
            result["payload_raw_bytes_sent"] = node.payload_raw_bytes_sent
            # This worker's own model, before consensus() averages it with the others'.
            result["accuracy_before_consensus"] = accuracy(model, x_test, y_test)
            sgp.consensus()  # SGP: gossip until the workers agree
            result["suspicions"] = sum(node.peers_lost.values())
            # Push-sum messages sent (training and consensus), and copies of them sent again.
            # (the fragments of a StreamingSGP number the shares of a link in one series)
            protocol = (sgp.parts[0] if isinstance(sgp, StreamingSGP) else sgp).protocol
            result["shares_sent"] = sum(protocol.sequence_numbers().values())
            result["copies_sent"] = node.retransmitted
            result["answered"] = sgp.answered  # in consensus(): shares of peers still training
            result["outer_steps"] = sgp.outer_steps  # local-steps mode
            result["mass"] = sgp.mass_report()  # weight held, lost, and moved per peer
        seconds = time.perf_counter() - started
        result["accuracy"] = accuracy(model, x_test, y_test)
        result["params_sha256"] = hashlib.sha256(flat_params(model).numpy().tobytes()).hexdigest()
        report(args, rank, world_size, store, model, result, seconds)
    except BaseException:
        if node is not None:
            node.close(linger=0.0)  # interrupted or failed: the peers are stopping too
        raise
    finally:
        if node is not None:
            node.close()  # waits briefly until the peers have folded our last messages
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def allreduce_gradients(model: nn.Module, world_size: int) -> None:
    """The baseline: average the gradients of all workers, bucketed as DDP does.

    Gradients are packed, last layer first, into buckets of about 25 MB; every bucket's
    all-reduce is started asynchronously, then all are waited for. (DDP also overlaps
    them with the backward pass; here they start after it.)"""
    if world_size == 1:
        return
    grads = [p.grad for p in reversed(list(model.parameters())) if p.grad is not None]
    buckets: list[list[torch.Tensor]] = []
    filled = ALLREDUCE_BUCKET_BYTES
    for g in grads:
        size = g.numel() * g.element_size()
        if filled + size > ALLREDUCE_BUCKET_BYTES and filled > 0:
            buckets.append([])
            filled = 0
        buckets[-1].append(g)
        filled += size
    flats = [torch.cat([g.reshape(-1) for g in bucket]) for bucket in buckets]
    works = [dist.all_reduce(flat, async_op=True) for flat in flats]
    for work, flat, bucket in zip(works, flats, buckets, strict=True):
        assert work is not None
        work.wait()
        flat /= world_size
        offset = 0
        for g in bucket:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


def allreduce_bytes(model: nn.Module, world_size: int, steps: int) -> float:
    """Bytes a worker sends for ``steps`` ring all-reduces of the gradients: 2 (n-1)/n of
    them per step (an estimate: gloo does not count its bytes)."""
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    return 2.0 * (world_size - 1) / world_size * size * steps


_STORE_CHUNK = 4 * 2**20
"""TCPStore values are limited (8 MiB in torch 2.13's libuv store): larger ones go in parts."""


def _store_set_bytes(store: Any, key: str, data: bytes) -> None:
    parts = [data[i : i + _STORE_CHUNK] for i in range(0, len(data), _STORE_CHUNK)] or [b""]
    for i, part in enumerate(parts):
        store.set(f"{key}/{i}", part)
    store.set(key, str(len(parts)))


def _store_get_bytes(store: Any, key: str) -> bytes:
    count = int(store.get(key))
    return b"".join(store.get(f"{key}/{i}") for i in range(count))


def gather_results(store: Any, result: dict[str, Any], world_size: int) -> dict[int, Any]:
    """Rank 0: every worker's result, by rank, leaving out workers that died.

    A rank counts as dead once a worker that has finished suspects it (SGP's failure
    detection), or when its result is not there within the store's 300 s."""
    gathered, deadline = {0: result}, time.monotonic() + 300
    while len(gathered) < world_size and time.monotonic() < deadline:
        for r in range(1, world_size):
            if r not in gathered and store.check([f"result/{r}"]):
                gathered[r] = json.loads(store.get(f"result/{r}"))
        suspected = {p for g in gathered.values() for p in g.get("mass", {}).get("suspected", [])}
        if set(range(world_size)) <= set(gathered) | suspected:
            break
        time.sleep(0.05)
    return gathered


def report(
    args: argparse.Namespace,
    rank: int,
    world_size: int,
    store: Any,
    model: nn.Module,
    result: dict[str, Any],
    seconds: float,
) -> None:
    """Gather every worker's accuracy and parameters at rank 0 and print the summary."""
    params = flat_params(model).double().numpy()
    if store is not None:
        store.set(f"result/{rank}", json.dumps(result))
        _store_set_bytes(store, f"params/{rank}", params.tobytes())
    if rank != 0:
        if store is not None:
            store.wait(["done"])  # rank 0 hosts the store: it must outlive every reader
            store.add("left", 1)
        return
    gathered = gather_results(store, result, world_size)
    dead = [r for r in range(world_size) if r not in gathered]
    results = [gathered[r] for r in sorted(gathered)]
    all_params = [params] + [
        np.frombuffer(_store_get_bytes(store, f"params/{r}"), dtype=np.float64)
        for r in sorted(gathered)
        if r
    ]
    if store is not None:
        store.set("done", "1")
        deadline = time.monotonic() + 60
        while store.add("left", 0) < len(results) - 1 and time.monotonic() < deadline:
            time.sleep(0.01)
    stacked = np.stack(all_params)
    mean = stacked.mean(axis=0)
    consensus_error = float(np.linalg.norm(stacked - mean, axis=1).max() / np.linalg.norm(mean))
    accuracies = [r["accuracy"] for r in results]
    evaluations = [r.pop("evaluations") for r in results]
    step_seconds = sorted(t for r in results for t in r.pop("step_seconds"))
    summary = {
        "algorithm": args.algorithm,
        "staleness": args.staleness if args.algorithm == "sgp" else None,
        "compression": args.compression if args.algorithm == "sgp" else None,
        "workers": world_size,
        "epochs": args.epochs,
        "model": args.model,
        "parameters": sum(p.numel() for p in model.parameters()),
        "batch_size": args.batch_size,
        "straggler": list(args.straggler) if args.straggler else None,
        "min_step_ms": args.min_step_ms,
        "local_steps": args.local_steps,
        "outer": (args.outer or "average") if args.local_steps else None,
        "outer_overlap": args.outer_overlap,
        "fragments": args.fragments,
        "emulate_compute_ms": args.emulate_compute,
        # every step of every worker: compute, communication and waiting
        "iteration_seconds": {
            "median": float(np.median(step_seconds)) if step_seconds else math.nan,
            # with local steps the outer steps' waits are in a few steps: see the mean
            "mean": float(np.mean(step_seconds)) if step_seconds else math.nan,
            "min": step_seconds[0] if step_seconds else math.nan,
            "max": step_seconds[-1] if step_seconds else math.nan,
        },
        # each worker's own rate, summed: what a slow worker does not hold back
        "samples_per_second": sum(
            r["steps"] * args.batch_size / r["train_seconds"] for r in results
        ),
        "evaluations": evaluations[0],  # rank 0's (the others do not test)
        "accuracy": sum(accuracies) / len(accuracies),
        "accuracies": accuracies,
        "consensus_error": consensus_error,
        "steps_per_second": sum(r["steps"] / r["train_seconds"] for r in results) / len(results),
        "seconds": seconds,
        "bytes_sent_per_worker": sum(r.get("bytes_sent", 0) for r in results) / len(results),
        "per_worker": results,
        "dead_ranks": dead,
    }
    if args.algorithm == "sgp":  # SGP: where the push-sum weight went
        reports = {r: gathered[r]["mass"] for r in gathered}
        summary["weight_sum"] = math.fsum(m["weight"] for m in reports.values())
        summary["lost_weight"] = lost_weight(reports, dead)
        if dead:
            print(f"ranks {dead} died; they took weight {summary['lost_weight']:.4f} with them")
    print("test accuracy per worker: " + " ".join(f"{a:.4f}" for a in accuracies))
    print(
        f"mean accuracy {summary['accuracy']:.4f}, consensus error {consensus_error:.2e}, "
        f"{summary['steps_per_second']:.1f} steps/s per worker, {seconds:.1f} s"
    )
    if args.json:
        print(json.dumps(summary), flush=True)
    if args.summary_file:
        with open(args.summary_file, "w", encoding="utf-8") as f:
            json.dump(summary, f)


if __name__ == "__main__":
    sys.exit(main())
