"""Outer optimizers for local steps: what a worker does with the averaged progress of H steps.

With ``SGP(..., local_steps=H, outer=...)`` every worker takes ``H`` steps of its own optimizer
without communicating (the *inner* steps), then the workers average their models by push-sum
(an *outer step*) and each applies the outer optimizer to a reference point ``x0``, the model
all of them started the ``H`` steps from, with the *pseudo-gradient*

    delta = x0 - mean_i(x_i)

as its gradient; every worker then starts its next ``H`` steps from the new ``x0``. Every
worker holds the same ``x0`` and computes the same step: the mean is exact after log2(n)
push-sum rounds on the exponential graph when n is a power of two (see ``SGP``).

With ``outer_overlap=True`` the average runs during the next ``H`` inner steps and the outer
step is applied when it is in (``x <- x0_new + (x - x_end)``, keeping the inner steps taken
meanwhile), at most one outer step late; see ``SGP``.

An outer optimizer is any ``torch.optim.Optimizer`` over the reference tensors; ``outer``
takes a factory ``params -> Optimizer`` or one of these names:

* ``average`` (the default): ``x0 <- mean_i(x_i)``, i.e. SGD with learning rate 1 on
  ``delta``: local SGD (periodic averaging).
* ``slowmo``: SlowMo's slow momentum (Wang, Tantia, Ballas, Rabbat, ICLR 2020), with its
  defaults slow learning rate ``alpha = 1`` and slow momentum ``beta = 0.5``:
  ``u <- beta u + delta / gamma``, ``x0 <- x0 - alpha gamma u`` (``gamma`` the inner learning
  rate), which for a constant ``gamma`` is SGD with momentum ``beta`` and learning rate
  ``alpha`` on ``delta`` (``m = gamma u``).
* ``diloco``: DiLoCo's outer Nesterov momentum (Douillard et al., 2023): SGD with learning
  rate 0.7, momentum 0.9, Nesterov, on ``delta``; made for an inner AdamW and large ``H``
  (hundreds of steps on language models).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

__all__ = ["OUTER", "OuterFactory", "average", "diloco", "resolve", "slowmo"]

OuterFactory = Callable[[Sequence[torch.Tensor]], torch.optim.Optimizer]
"""Builds the outer optimizer over the reference tensors (one flat tensor per group)."""


def average() -> OuterFactory:
    """``x0 <- mean_i(x_i)``: periodic averaging (local SGD)."""
    return lambda params: torch.optim.SGD(params, lr=1.0)


def slowmo(lr: float = 1.0, momentum: float = 0.5) -> OuterFactory:
    """SlowMo's slow momentum: slow learning rate ``lr`` (alpha), slow momentum ``momentum``
    (beta); the defaults are the paper's and fairscale's."""
    _check(lr, momentum)
    return lambda params: torch.optim.SGD(params, lr=lr, momentum=momentum)


def diloco(lr: float = 0.7, momentum: float = 0.9) -> OuterFactory:
    """DiLoCo's outer Nesterov momentum; the defaults are the paper's."""
    _check(lr, momentum)
    if momentum == 0:
        raise ValueError("diloco's outer momentum is Nesterov's: it must be in (0, 1)")
    return lambda params: torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=True)


OUTER: dict[str, Callable[[], OuterFactory]] = {
    "average": average,
    "slowmo": slowmo,
    "diloco": diloco,
}
"""The outer optimizers by name, with their papers' default hyper-parameters."""


def resolve(outer: str | OuterFactory | None) -> OuterFactory:
    """The factory ``outer`` names (None: ``average``)."""
    if outer is None:
        return average()
    if isinstance(outer, str):
        try:
            return OUTER[outer]()
        except KeyError:
            names = ", ".join(OUTER)
            raise ValueError(f"unknown outer optimizer {outer!r}; known: {names}") from None
    if not callable(outer):
        raise TypeError(f"outer must be a name or a factory params -> Optimizer, got {outer!r}")
    return outer


def _check(lr: float, momentum: float) -> None:
    if not lr > 0:
        raise ValueError(f"outer learning rate must be > 0, got {lr}")
    if not 0 <= momentum < 1:
        raise ValueError(f"outer momentum must be in [0, 1), got {momentum}")
