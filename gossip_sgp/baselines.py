"""Decentralized baselines that SGP is compared with: D-PSGD and AD-PSGD.

Both run on the same push-sum machinery as :class:`~gossip_sgp.SGP` (same node, transport,
wire format and mass accounting), so a benchmark compares algorithms, not implementations.

* **D-PSGD** (Lian et al., NeurIPS 2017): every step, synchronous pairwise averaging with a
  neighbour. :func:`dpsgd` is SGP in synchronous mode on the ``bipartite`` topology: each round
  pairs every even rank with exactly one odd rank, each sends the other half of its
  ``(x, w)`` and keeps half, so both end with ``(x_a + x_b) / 2`` and weights that stay exactly
  1 (``0.5 + 0.5``). That is symmetric pairwise averaging, i.e. D-PSGD.
* **AD-PSGD** (Lian et al., ICML 2018): asynchronous pairwise averaging on a bipartite graph.
  Even ranks are *active*: whenever no exchange of theirs is pending, they send half of their
  mass to the round's odd partner (a request) and go on training. Odd ranks are *passive*:
  at their next step boundary they answer every request with a share of their own mass taken
  *before* folding the request in, so one exchange leaves both at the pairwise average, as the
  atomic averaging of the paper does. The active rank folds the answer when it arrives and only
  then sends its next request. Unlike the paper's implementation, the passive side answers at a
  step boundary rather than from its communication thread, because parameters never change
  under a running forward/backward here; a slow passive worker therefore delays its answers.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

import torch

from gossip_sgp.message import Message
from gossip_sgp.node import GossipNode
from gossip_sgp.sgp import SGP, GossipPolicy

__all__ = ["ALGORITHMS", "PairwiseExchange", "adpsgd", "dpsgd"]

ALGORITHMS = ("dpsgd", "adpsgd")
"""The decentralized baselines of this module, by name."""

_REQUEST = 1
"""``Message.adpsgd`` of an exchange's request; ``_ANSWER`` of its answer."""
_ANSWER = 2


def dpsgd(
    params: Iterable[torch.Tensor],
    optimizer: torch.optim.Optimizer,
    node: GossipNode,
    *,
    timeout: float | None = None,
) -> SGP:
    """D-PSGD: synchronous symmetric pairwise averaging on the bipartite exponential graph."""
    return SGP(params, optimizer, node, topology="bipartite", staleness=0, timeout=timeout)


def adpsgd(
    params: Iterable[torch.Tensor],
    optimizer: torch.optim.Optimizer,
    node: GossipNode,
    *,
    timeout: float | None = None,
) -> SGP:
    """AD-PSGD: asynchronous pairwise averaging, active even ranks and passive odd ranks.

    An :class:`SGP` on the ``bipartite`` topology whose rounds follow
    :class:`PairwiseExchange` (``sgp.policy``; its ``exchanges`` counts the averagings
    done). The first rounds are the synchronous start-up barrier of :class:`SGP`, and
    :meth:`~SGP.consensus` works as there. The world size must be even (or 1).
    """
    policy = PairwiseExchange(active=node.rank % 2 == 0)
    return SGP(
        params,
        optimizer,
        node,
        topology="bipartite",
        staleness=None,
        timeout=timeout,
        policy=policy,
    )


class PairwiseExchange(GossipPolicy):
    """AD-PSGD's rounds over push-sum messages (see the module docstring)."""

    staleness = None

    def __init__(self, *, active: bool) -> None:
        self.active = active
        """Even ranks start exchanges; odd ranks answer them."""
        self.pending = False
        """Active rank: a request is out and its answer has not been folded in yet."""
        self.exchanges = 0
        """Exchanges completed: answers folded in (active) or requests answered (passive)."""
        self._lock = threading.Lock()
        self._requests: list[int] = []  # senders of requests received, not yet answered
        self._answers = 0  # answers received, not yet folded

    def received(self, sgp: SGP, message: Message) -> None:
        """Gossip thread: note a request or an answer (its mass is in the mailbox)."""
        if message.adpsgd:
            with self._lock:
                if message.adpsgd == _REQUEST:
                    self._requests.append(message.sender)
                elif message.adpsgd == _ANSWER:
                    self._answers += 1

    def round(self, sgp: SGP, k: int, gauge: float) -> None:
        with self._lock:  # noted before taking: their mass is surely in what we take
            requests, self._requests = self._requests, []
            answers, self._answers = self._answers, 0
        share = sgp.protocol.mailbox.take(k)
        sgp.node.acknowledge(sgp.protocol.mailbox.pop_receipts())
        if requests:  # answer with our own mass as it was before the requests came in
            self._answer(sgp, k, requests)
        if share is not None:
            sgp.protocol.fold(share, k)
        sgp._folded_through = k
        if self.active:
            if answers:
                self.exchanges += answers
                self.pending = False
            if not self.pending:
                sgp._check_running()
                # half to the round's partner: the bipartite mixing
                messages = sgp.protocol.emit(k, adpsgd=_REQUEST)
                sgp.node.send(messages)
                self.pending = bool(messages)
        else:
            self.exchanges += len(requests)

    def _answer(self, sgp: SGP, k: int, senders: list[int]) -> None:
        """Give each requester ``1 / (m + 1)`` of this rank's mass, keep the same share."""
        sgp._check_running()
        fraction = 1.0 / (len(senders) + 1)
        out: dict[int, float] = {}
        for s in senders:  # an active rank has one request out at a time; be safe anyway
            out[s] = out.get(s, 0.0) + fraction
        sgp.node.send(sgp.protocol.give(out, k, adpsgd=_ANSWER))
