"""Push-sum state: pure tensor math, no I/O, no threads.

Each node holds a numerator ``x`` (one flat tensor per parameter group) and a scalar weight
``w``; the de-biased estimate is ``z = x / w``. One gossip round at a node:

* :meth:`PushSumState.split` scales ``x, w`` by the node's own mixing weight ``p_ii`` and
  returns one share ``(p_ji * x, p_ji * w)`` per out-peer ``j``;
* :meth:`PushSumState.fold` adds received shares into ``x, w``;
* :meth:`PushSumState.debias` writes ``x / w`` into the model's parameters.

Besides its mass, a node keeps ``steps``: how many training steps its model carries, the
push-sum average of the workers' step counts (each share folded in moves it by its weight).
The asynchronous mode compares it with a share's (``Message.steps``) to tell a model that
fell far behind from a current one (:meth:`fold_weight`, :meth:`adopt`).

The simulator, the tests and the training workers all run this very code. The weight is a
Python float (double precision) whatever the numerator dtype, so the sum of weights over the
job stays n to within double rounding.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from gossip_sgp.wire import all_finite

__all__ = ["PushSumState", "Share"]

Share = tuple[tuple[torch.Tensor, ...], float]
"""A piece of push-sum mass: numerator tensors and the weight that goes with them."""


class PushSumState:
    """Numerator tensors and push-sum weight of one node.

    ``tensors`` are flat (1-D) tensors of any floating dtype on any device. They are used in
    place: the state owns them from now on.
    """

    __slots__ = ("numerator", "steps", "weight")

    def __init__(self, tensors: Sequence[torch.Tensor], weight: float = 1.0) -> None:
        for t in tensors:
            if t.dim() != 1 or not t.is_floating_point():
                raise ValueError("push-sum tensors must be flat floating-point tensors")
        if not weight > 0.0:
            raise ValueError(f"push-sum weight must be positive, got {weight}")
        self.numerator: tuple[torch.Tensor, ...] = tuple(tensors)
        self.weight: float = float(weight)
        self.steps: float = 0.0
        """Training steps the model ``x / w`` carries: the owner adds one per optimizer
        step; a fold averages it with the share's, weighted as the models are."""

    def split(self, self_weight: float, out: Mapping[int, float]) -> dict[int, Share]:
        """Give away ``out[j]`` of the mass to each peer ``j``; keep ``self_weight`` of it.

        ``self_weight + sum(out.values())`` must be 1, so no mass is created or destroyed.
        Returns one fresh share per peer; ``x`` and ``w`` are scaled in place.
        """
        shares: dict[int, Share] = {
            peer: (tuple(x * p for x in self.numerator), self.weight * p) for peer, p in out.items()
        }
        if self_weight != 1.0:
            for x in self.numerator:
                x.mul_(self_weight)
            self.weight *= self_weight
        return shares

    def fold_finite(
        self, tensors: Sequence[torch.Tensor], weight: float, steps: float | None = None
    ) -> bool:
        """Fold ``(tensors, weight)`` in as :meth:`fold` does, unless that makes ``x``
        non-finite: then take it out again and return False.

        Every received share is finite, but a sum of finite values can still overflow (two
        float32 values near 3e38). The check after the fold is one summing read of ``x``
        (``all_finite``), a fraction of the fold's own cost. Taking the share out again
        restores ``x`` up to rounding where the sum did not overflow; where it did (only
        shares with values near the dtype's largest, a forger's, get there) ``x`` cannot be
        recovered and is set to 0, so that it stays finite.
        """
        before = self.steps
        self.fold(tensors, weight, steps)
        if all(all_finite(x) for x in self.numerator):
            return True
        self.steps = before
        for x, r in zip(self.numerator, tensors, strict=True):
            x.sub_(r.to(device=x.device, dtype=x.dtype, non_blocking=True))
            torch.nan_to_num_(x, nan=0.0, posinf=0.0, neginf=0.0)
        self.weight -= weight
        return False

    def fold(
        self, tensors: Sequence[torch.Tensor], weight: float, steps: float | None = None
    ) -> None:
        """Add received mass ``(tensors, weight)`` into the state; ``steps``: the training
        steps its model carries (None: as many as this node's)."""
        if len(tensors) != len(self.numerator):
            raise ValueError(f"expected {len(self.numerator)} tensors, got {len(tensors)}")
        for x, r in zip(self.numerator, tensors, strict=True):
            x.add_(r.to(device=x.device, dtype=x.dtype, non_blocking=True))
        total = self.weight + weight
        if steps is not None and weight > 0.0 and total > 0.0:
            self.steps += (steps - self.steps) * (weight / total)
        self.weight = total

    def fold_weight(self, weight: float) -> bool:
        """Take in ``weight`` without its model: the numerator grows with it, so ``x / w``
        (and ``steps``) stay as they are. For a share whose model fell far behind this
        one's: its weight (the job's sum of weights) is kept, its stale model is not.
        Returns False, changing nothing, where ``x`` would not be finite (or this node has
        no weight, so no model)."""
        if not self.weight > 0.0:
            return False  # no model to give the weight to
        scale = (self.weight + weight) / self.weight
        if not math.isfinite(scale):
            return False
        for x in self.numerator:
            if x.numel() and float(x.abs().max()) * scale > torch.finfo(x.dtype).max:
                return False
        for x in self.numerator:
            x.mul_(scale)
        self.weight += weight
        return True

    def adopt(self, tensors: Sequence[torch.Tensor], weight: float, steps: float) -> bool:
        """Replace this node's model by the one of mass ``(tensors, weight)``, keeping this
        node's weight: ``x <- (w / weight) * tensors``; ``steps`` becomes the share's. For
        a share whose model is far ahead of this one's (then fold the share in as well).
        Returns False, changing nothing, where the result would not be finite."""
        if len(tensors) != len(self.numerator):
            raise ValueError(f"expected {len(self.numerator)} tensors, got {len(tensors)}")
        if not weight > 0.0:
            raise ValueError(f"a share to adopt needs weight > 0, got {weight}")
        scale = self.weight / weight
        adopted = [
            r.to(device=x.device, dtype=x.dtype, non_blocking=True) * scale
            for x, r in zip(self.numerator, tensors, strict=True)
        ]
        if not all(all_finite(a) for a in adopted):
            return False
        for x, a in zip(self.numerator, adopted, strict=True):
            x.copy_(a)
        self.steps = float(steps)
        return True

    def debias(self, out: Sequence[torch.Tensor] | None = None) -> tuple[torch.Tensor, ...]:
        """``z = x / w``, written into ``out`` when given, else returned as new tensors."""
        inv = 1.0 / self.weight
        if out is None:
            return tuple(x * inv for x in self.numerator)
        for z, x in zip(out, self.numerator, strict=True):
            torch.mul(x, inv, out=z)
        return tuple(out)
