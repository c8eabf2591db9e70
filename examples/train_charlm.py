"""Train a small character-level transformer with local steps and an outer optimizer.

Every worker trains with AdamW on its own windows of a text and, every ``--local-steps`` steps,
averages its model with the others by push-sum and applies DiLoCo's outer step (or SlowMo's,
or a plain average): one model average per H steps instead of one message per step:

    gossip-sgp launch --nproc 4 examples/train_charlm.py                       # DiLoCo, H=50
    gossip-sgp launch --nproc 4 examples/train_charlm.py --local-steps 1       # gossip every step
    gossip-sgp launch --nproc 4 examples/train_charlm.py --fragments 5         # 1/5 every 10
    gossip-sgp launch --nproc 4 examples/train_charlm.py --algorithm allreduce # the baseline

The text is, by default, the standard library's ``.py`` files (the first ``--text-mb`` MB,
sorted by path), which every machine with Python has; ``--text FILE`` trains on a file instead.
The last 5% is held out: the script prints the final model's validation loss (nats per byte)
and what each worker sent. ``# SGP`` marks what gossip adds to a PyTorch loop. Nearest
AllReduce (docs/training.md): ``--outer slowmo --local-steps 16 --compression int8,ref``.
"""

from __future__ import annotations

import argparse
import sysconfig
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from gossip_sgp import SGP, GossipConfig, GossipNode, StreamingSGP  # SGP


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train a character-level transformer with SGP.")
    p.add_argument("--algorithm", choices=("sgp", "allreduce"), default="sgp")
    p.add_argument("--local-steps", type=int, default=50, help="H, steps per average (1: every)")
    p.add_argument("--outer", choices=("diloco", "slowmo", "average"), default="diloco")
    p.add_argument("--outer-overlap", action="store_true", help="average during the next H steps")
    p.add_argument("--fragments", type=int, default=1, help="average F fragments in turn")
    p.add_argument("--compression", default="none", help="SGP's codec, e.g. int8,ref")
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps per worker")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per worker and step")
    p.add_argument("--context", type=int, default=64, help="bytes of context")
    p.add_argument("--width", type=int, default=64, help="model width")
    p.add_argument("--layers", type=int, default=2, help="transformer layers")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate")
    p.add_argument("--text", type=Path, help="a text file (default: the stdlib's source)")
    p.add_argument("--text-mb", type=float, default=2.0, help="megabytes of the stdlib's source")
    p.add_argument(
        "--shards", choices=("interleaved", "contiguous"), default="interleaved",
        help="windows starting at rank + k n (IID), or in the worker's own n-th of the text",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="model initialisation and batches")
    p.add_argument(
        "--eval-every", type=int, default=0, help="rank 0 prints its held-out loss and MB sent "
        "every N steps (0: at the end only)",
    )  # fmt: skip
    args = p.parse_args()
    for name in ("local_steps", "fragments", "steps", "batch_size", "context", "width", "layers"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if (args.outer_overlap or args.fragments > 1) and args.local_steps < max(2, args.fragments):
        p.error("--outer-overlap and --fragments F need --local-steps H > 1 (and F <= H)")
    if not (args.lr > 0 and args.text_mb > 0 and args.eval_every >= 0):
        p.error("--lr and --text-mb must be > 0, --eval-every >= 0")
    return args


def read_text(path: Path | None, megabytes: float) -> torch.Tensor:
    """The text as bytes (uint8): ``path``, or the standard library's ``.py`` files."""
    if path is not None:
        data = path.read_bytes()
    else:
        limit, parts, size = int(megabytes * 1e6), [], 0
        for file in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
            if size >= limit:
                break
            parts.append(file.read_bytes())
            size += len(parts[-1])
        data = b"".join(parts)[:limit]
    if len(data) < 10_000:
        raise SystemExit(f"the text has {len(data)} bytes; it needs at least 10,000")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


class CharLM(nn.Module):
    """A causal transformer over bytes."""

    def __init__(self, context: int, width: int, layers: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(256, width)
        self.position = nn.Parameter(torch.randn(context, width) * 0.02)
        block = nn.TransformerEncoderLayer(
            width, max(1, width // 16), 4 * width, dropout=0.0, batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 256)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(t)
        h = self.blocks(self.embed(x) + self.position[:t], mask=mask, is_causal=True)
        logits: torch.Tensor = self.head(self.norm(h))
        return logits


def window_starts(
    args: argparse.Namespace, length: int, rank: int, n: int, draws: torch.Generator
) -> torch.Tensor:
    """Starts rank + k n (DistributedSampler's split, unshuffled), or in the rank's n-th."""
    first, stride, span = rank, n, (length - args.context - 1 - rank) // n
    if args.shards == "contiguous":
        first, stride, span = rank * (length // n), 1, length // n - args.context - 1
    return first + stride * torch.randint(0, span, (args.batch_size,), generator=draws)


def windows(text: torch.Tensor, starts: torch.Tensor, context: int) -> torch.Tensor:
    return torch.stack([text[s : s + context + 1] for s in starts.tolist()]).long()


def loss_of(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    logits = model(batch[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, 256), batch[:, 1:].reshape(-1))


@torch.no_grad()
def validation_loss(model: nn.Module, text: torch.Tensor, context: int) -> float:
    """Mean loss over 128 fixed windows of the held-out text (the same on every worker)."""
    starts = torch.linspace(0, len(text) - context - 2, 128).long().view(4, 32)
    losses = [loss_of(model, windows(text, s, context)).item() for s in starts]
    return sum(losses) / len(losses)


def main() -> None:
    args = parse_args()
    config = GossipConfig.from_env()  # SGP: rank and peers, set by gossip-sgp launch / run
    rank, n = config.rank, config.world_size
    torch.set_num_threads(1)  # workers share this machine's cores
    text = read_text(args.text, args.text_mb)
    held_out = int(len(text) * 0.95)
    train, valid = text[:held_out], text[held_out:]
    torch.manual_seed(args.seed)  # every worker starts from the same model
    model = CharLM(args.context, args.width, args.layers)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    draws = torch.Generator().manual_seed(args.seed * 1000 + rank)
    node, sgp = None, None
    if args.algorithm == "sgp":
        node = GossipNode(config).start()  # SGP: a gossip thread and its sockets
        local = {} if args.local_steps == 1 else {"local_steps": args.local_steps}
        outer = {"outer": args.outer, "outer_overlap": args.outer_overlap} if local else {}
        codec = args.compression  # SGP: what the codec drops stays with the sender
        if args.fragments > 1:  # SGP: 1/F of the model every H/F steps, not all every H
            local["fragments"] = args.fragments
        wrap = StreamingSGP if args.fragments > 1 else SGP
        sgp = wrap(model.parameters(), optimizer, node, compression=codec, **local, **outer)
    else:  # the baseline: gradients averaged every step (launch sets MASTER_ADDR/PORT)
        dist.init_process_group("gloo", rank=rank, world_size=n)
    for step in range(1, args.steps + 1):
        starts = window_starts(args, len(train), rank, n, draws)
        optimizer.zero_grad()
        loss = loss_of(model, windows(train, starts, args.context))
        loss.backward()  # type: ignore[no-untyped-call]
        if sgp is not None:
            sgp.step()  # SGP: the local step (and every H steps an outer step)
        else:
            for p in model.parameters():
                dist.all_reduce(p.grad)
                p.grad.div_(n)  # type: ignore[union-attr]
            optimizer.step()
        if rank == 0 and step % max(1, args.steps // 5) == 0:
            print(f"step {step:5d}/{args.steps}  loss {loss.item():.3f}", flush=True)
        if rank == 0 and args.eval_every and step % args.eval_every == 0:
            mb = sent_mb(node) if node is not None else allreduce_mb(model, n, step)
            val = validation_loss(model, valid, args.context)
            print(f"at step {step}: {mb:.3f} MB sent, held-out loss {val:.4f}", flush=True)
    if sgp is not None and node is not None:
        sgp.consensus()  # SGP: gossip until the workers agree
        sent = sent_mb(node)
        node.close()
    else:
        sent = allreduce_mb(model, n, args.steps)
        dist.destroy_process_group()
    val = validation_loss(model, valid, args.context)  # untrained: ln 256 = 5.55 nats/byte
    print(f"rank {rank}: validation loss {val:.4f} nats/byte, sent {sent:.1f} MB", flush=True)


def sent_mb(node: GossipNode) -> float:
    """Megabytes this worker's node handed to the wire (headers and acknowledgements too)."""
    return sum(node.stats.bytes_sent.values()) / 1e6


def allreduce_mb(model: nn.Module, n: int, steps: int) -> float:
    """A ring all-reduce sends 2 (n - 1) / n of the gradients' bytes per step."""
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    return 2 * (n - 1) / n * size * steps / 1e6


if __name__ == "__main__":
    main()
