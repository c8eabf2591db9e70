"""Train a small CNN on scikit-learn's digits with Stochastic Gradient Push: a script to copy.

Four workers on this machine, each training on a quarter of the data and averaging its
model with one peer per step; at the end they agree on one model:

    gossip-sgp launch --nproc 4 examples/train_digits.py
    gossip-sgp launch --nproc 4 examples/train_digits.py --staleness none   # asynchronous

On several machines, one worker each: ``gossip-sgp run --config peers.toml --rank R
examples/train_digits.py`` (docs/configuration.md). The lines marked ``# SGP`` are all that
gossip adds to a plain PyTorch training loop. The data comes with scikit-learn
(``pip install 'gossip-sgp[demo]'``). Every option - baselines, codecs, stragglers,
checkpoints - is in ``python -m gossip_sgp.digits --help``, the trainer behind ``gossip-sgp
demo``.
"""

from __future__ import annotations

import argparse

import torch
from sklearn.datasets import load_digits
from torch import nn

from gossip_sgp import SGP, GossipConfig, GossipNode  # SGP


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train a small CNN on digits with SGP.")
    p.add_argument("--epochs", type=int, default=20, help="passes over this worker's shard")
    p.add_argument("--batch-size", type=int, default=32, help="per-worker batch size")
    p.add_argument("--lr", type=float, default=0.05, help="learning rate")
    p.add_argument("--seed", type=int, default=0, help="model initialisation and data order")
    p.add_argument(
        "--staleness",
        type=lambda text: None if text.lower() == "none" else int(text),
        default=0,
        help="0: synchronous SGP (default); 1 or more: overlap gossip with that many steps; "
        "none: asynchronous, no worker ever waits",
    )
    return p.parse_args()


def shard(
    rank: int, world_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """This worker's part of the training set, and the whole test set.

    Every worker draws the same split and takes a shard of the same size, so that all
    take the same number of steps per epoch (the synchronous mode needs that).
    """
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    y = torch.tensor(digits.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(1234))
    test, train = order[:360], order[360:]
    size = len(train) // world_size
    mine = train[rank * size : (rank + 1) * size]
    return x[mine], y[mine], x[test], y[test]


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    correct = (model(x).argmax(dim=1) == y).float().mean().item()
    model.train()
    return correct


def main() -> None:
    args = parse_args()
    config = GossipConfig.from_env()  # SGP: rank and peers, set by gossip-sgp launch / run
    rank, world_size = config.rank, config.world_size
    torch.set_num_threads(1)  # workers share this machine's cores
    torch.manual_seed(args.seed)  # every worker starts from the same model
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True)
    x, y, x_test, y_test = shard(rank, world_size)
    order = torch.Generator().manual_seed(args.seed * 1000 + rank)  # each its own order
    steps_per_epoch = len(y) // args.batch_size

    with GossipNode(config) as node:  # SGP: a gossip thread and its sockets
        sgp = SGP(model.parameters(), optimizer, node, staleness=args.staleness)  # SGP
        for epoch in range(1, args.epochs + 1):
            batches = torch.randperm(len(y), generator=order).split(args.batch_size)
            for batch in batches[:steps_per_epoch]:
                optimizer.zero_grad()
                loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
                loss.backward()
                sgp.step()  # SGP: the local step, then one push-sum round
            if rank == 0 and (epoch % 5 == 0 or epoch == args.epochs):
                print(f"epoch {epoch:3d}/{args.epochs}  loss {loss.item():.4f}", flush=True)
        disagreement = sgp.consensus()  # SGP: gossip until the workers agree
    print(
        f"test accuracy {accuracy(model, x_test, y_test):.4f} "
        f"(workers' models differ by {disagreement:.1e})",
        flush=True,
    )


if __name__ == "__main__":
    main()
