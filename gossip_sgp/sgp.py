"""``SGP``: Stochastic Gradient Push around any ``torch.optim.Optimizer``.

    node = GossipNode(GossipConfig.from_env()).start()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    sgp = SGP(model.parameters(), optimizer, node)
    for x, y in loader:
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        sgp.step()
    sgp.consensus()

What one ``step()`` does (Assran et al., ICML 2019, Alg. 1), with ``x`` the numerator,
``w`` the push-sum weight and the model holding ``z = x / w``:

1. the wrapped optimizer steps the model's parameters (gradient taken at ``z``), and ``x``
   becomes ``w * z``, so ``x / w`` changes by exactly that step. With ``w = 1``
   this is the paper's ``x <- x - lr * g``; scaling by ``w`` (as the authors' code does)
   keeps the effective learning rate at ``lr`` when a node's weight drifts, which happens
   in the asynchronous mode and on non-power-of-two world sizes;
2. ``x, w`` are split by the round's mixing weights; the out-peers' shares go to the gossip
   thread;
3. received mass is folded in: in the synchronous mode (``staleness=0``) after waiting for
   every message of this round, with ``staleness=tau`` after waiting for the messages of
   round ``k - tau`` (communication overlaps ``tau`` steps of compute), and with
   ``staleness=None`` (asynchronous) whatever has arrived, never waiting;
4. the model's parameters become ``x / w``.

In every mode the first few rounds (the topology's period plus log2(n) on the exponential
graph) are synchronous: a start-up barrier, so no worker trains alone while its peers are
still starting.

Parameters are flattened into one contiguous buffer per (device, dtype) so each message is
a few large tensors. Create ``SGP`` after moving the model to its device.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import threading
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Any

import torch

import topologies
from gossip_sgp.compression import parse_codec
from gossip_sgp.errors import GossipError, GossipTimeout, RejoinRefused, WireError
from gossip_sgp.mailbox import Receipt, Stored
from gossip_sgp.message import Message, MessageKind, fingerprint
from gossip_sgp.node import GossipNode
from gossip_sgp.outer import OuterFactory, resolve
from gossip_sgp.protocol import PushSumProtocol
from gossip_sgp.pushsum import PushSumState
from gossip_sgp.stats import TrainingStats
from topologies import Topology

__all__ = ["SGP", "CreditWindow", "GossipPolicy", "Lockstep"]

log = logging.getLogger(__name__)

_INITIAL_CREDIT = 2
"""Asynchronous mode: rounds a worker may gossip ahead of what it has received.

Measured on 4 CPU workers: more credit lets more gossip flow while messages are on the way,
but puts more of the mass in flight, where the workers' gradient steps cannot act on it
(``x += w * delta`` scales with the weight a worker holds). Two rounds' worth with the link
window below trains as well as one round's worth without it (docs/design.md)."""

_LINK_WINDOW = 1
"""Asynchronous mode: shares a worker has on the way to one peer, at most (not acknowledged
as folded yet). A share for a full link stays with the sender, which keeps its mass that
round: a dead, stuck or rejecting peer takes at most this many shares per link into it, and
no longer collects every worker's send credit (docs/design.md)."""

LAG_LIMIT = 50
"""Asynchronous mode, default ``lag_limit``: training steps a model may be behind or ahead
of another before they no longer mix (see ``SGP``). Workers that gossip stay close: every
share a worker folds pulls its step count towards its peers'. Measured on 4 CPU workers
(digits, docs/design.md): a worker stopped for up to 3 s came back hundreds of steps behind,
and mixing its model into the others near the end of their schedule cost up to 26 points of
accuracy (3 of 20 runs below 0.95 without the limit, lowest 0.7187; none with it, lowest
0.9694)."""

_LOSSLESS = parse_codec("none")
"""The codec of ``consensus()``'s rounds where the training codec cannot make the models
agree: error feedback keeps the mass, not the precision, so int8 leaves them about 6e-3
apart and top-k far more (docs/compression.md); difference-coded dense codecs converge."""

_ANSWER_FRACTION = 1.0 / 1024
"""Asynchronous mode: the fraction of its mass a worker in ``consensus()`` sends back to a
peer still training, for each share of that peer it folds (``SGP._answer_stragglers``)."""

_WAIT_SLICE = 0.25
"""Seconds between two looks at which peers are suspected down while waiting."""

_JOIN_SLICE = 2.0
"""Seconds ``rejoin`` waits for one neighbour's answer before it asks the next one (a
neighbour answers at its next step)."""

_DRAIN_POLL = 0.005
"""Seconds between two looks at the acknowledgements still owed (see ``_drain``)."""

_ACK_SETTLE = 1.0
"""Seconds ``mass_report`` waits for the acknowledgements of the last messages sent."""

_GAUGE_MAX = 1e300
"""Stands in for "unknown yet" (infinity) in a message's gauge, which must be finite."""


def _flatten(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """Move parameters into one flat buffer per (device, dtype); return the buffers."""
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for p in params:
        groups.setdefault((p.device, p.dtype), []).append(p)
    flats = []
    for (device, dtype), members in groups.items():
        flat = torch.empty(sum(p.numel() for p in members), device=device, dtype=dtype)
        offset = 0
        for p in members:
            n = p.numel()
            view = flat[offset : offset + n].view_as(p)
            view.copy_(p.data)
            p.data = view
            offset += n
        flats.append(flat)
    return flats


class GossipPolicy:
    """How an :class:`SGP` worker gossips in each training round after the start-up barrier.

    SGP's modes are policies: :class:`Lockstep` (``staleness=0``, synchronous; ``tau``,
    overlap) and :class:`CreditWindow` (``staleness=None``, asynchronous); AD-PSGD
    (:class:`gossip_sgp.baselines.PairwiseExchange`) is another. ``SGP(..., policy=...)``
    takes one in place of the mode its ``staleness`` names; ``staleness`` must match the
    policy's (it decides how received mass is stored and folded elsewhere: coalesced as it
    arrives when None, per round otherwise).

    :meth:`round` runs in the training thread, after the local step, with the round's
    number; it sends this worker's shares (``sgp._send``, or ``sgp.protocol`` and
    ``sgp.node`` directly) and folds what it waits for or what has arrived
    (``sgp._catch_up``, ``sgp._absorb``, recording the last round folded in
    ``sgp._folded_through``). :meth:`received` runs in the gossip thread for every fresh
    share once its mass is in the mailbox. A policy object belongs to one worker.
    """

    staleness: int | None = 0
    """None: an asynchronous policy (nobody waits); else the rounds of compute a worker's
    communication may lag behind."""

    def round(self, sgp: SGP, k: int, gauge: float) -> None:
        """Gossip in training round ``k``; ``gauge`` goes on this worker's shares."""
        raise NotImplementedError

    def received(self, sgp: SGP, message: Message) -> None:
        """Gossip thread: ``message``'s mass is in the mailbox now. Nothing by default."""


class Lockstep(GossipPolicy):
    """Send round ``k``, then wait for and fold every round up to ``k - staleness``:
    ``staleness=0`` is the paper's synchronous SGP, ``tau > 0`` overlaps communication with
    ``tau`` steps of compute."""

    def __init__(self, staleness: int = 0) -> None:
        if staleness < 0:
            raise ValueError(f"staleness must be >= 0, got {staleness}")
        self.staleness = self._lag = staleness

    def round(self, sgp: SGP, k: int, gauge: float) -> None:
        sgp._send(k, gauge)
        sgp._catch_up(k - self._lag)


class CreditWindow(GossipPolicy):
    """Asynchronous SGP: fold what has arrived, then send the round's shares if this worker
    holds the send credit and every out-peer's link has room; else keep the mass this round.

    Every folded message earns a send credit (see ``SGP._absorb``) and every message sent
    costs one (see ``SGP._send``), so no worker gives away mass faster than it receives mass
    (each starts with enough credit for two rounds). Without that, a fast worker would halve
    its weight every step while a slow one hoards the mass: the fast worker's steps would
    count for almost nothing, and its numerator would underflow. And no link carries more
    than ``_LINK_WINDOW`` shares not yet folded: a peer that stopped folding (dead, stalled,
    rejecting) gets no more. A worker without credit, or whose out-peer's link is full,
    keeps its mass this round (``SGP.skipped_rounds``) and just trains.
    """

    staleness = None

    def round(self, sgp: SGP, k: int, gauge: float) -> None:
        sgp._absorb(k)
        sgp._folded_through = k
        out_peers = sgp.topology.out_peers(sgp.node.rank, k)
        if sgp._credit >= len(out_peers) and all(
            sgp.node.outstanding(peer) < _LINK_WINDOW for peer in out_peers
        ):
            sgp._send(k, 0.0)
        else:
            sgp.skipped_rounds += 1


_BARRIER = Lockstep(0)
"""The start-up barrier's and the consensus rounds' policy, in every mode."""


class _SendOnly(GossipPolicy):
    """An overlapped outer step's rounds: send the round's shares; ``SGP._progress`` folds
    them once they have arrived, between inner steps."""

    def round(self, sgp: SGP, k: int, gauge: float) -> None:
        sgp._send(k, gauge)


_SEND_ONLY = _SendOnly()


class SGP:
    """Wraps ``optimizer`` so that every ``step()`` also gossips with the node's peers.

    Args:
        params: the parameters to train and average (those of the optimizer).
        optimizer: any ``torch.optim.Optimizer`` over ``params``; its state (momentum, Adam
            moments) stays local, as in the paper.
        node: a started :class:`~gossip_sgp.GossipNode`.
        topology: a topology name (``topologies.NAMES``) or a ``Topology`` instance.
        peers_per_round: out-peers per round for the ``exponential`` and ``base-k`` graphs.
        staleness: 0 synchronous, ``tau > 0`` overlap, None asynchronous.
        timeout: seconds to wait for a round's messages before ``GossipTimeout``;
            defaults to the node config's ``timeout``.
        compression: codec of the numerator messages (``none``, ``fp16``, ``bf16``,
            ``int8[:block]``, ``topk:fraction``, options ``,ref`` and ``,step=F``; see
            :mod:`gossip_sgp.compression`). What a codec drops stays with the sender (error
            feedback), so the average is exact. ``consensus()`` sends uncompressed shares
            where the codec alone would leave the workers apart (no ``ref``, or top-k).
        policy: how the training rounds gossip (a :class:`GossipPolicy` with the same
            ``staleness``); default :class:`Lockstep` or, for ``staleness=None``,
            :class:`CreditWindow`.
        local_steps: ``H``: gossip only every ``H`` steps, in an outer step (see
            :mod:`gossip_sgp.outer`): the workers average their models by push-sum, then
            apply ``outer`` to the reference point they all started the ``H`` steps from.
            Synchronous (``staleness=0``). None (the default): gossip every step.
        outer: with ``local_steps``: the outer optimizer, ``average`` (default),
            ``slowmo``, ``diloco`` or a factory ``params -> torch.optim.Optimizer``.
        outer_rounds: with ``local_steps``: push-sum rounds per outer step. Default: exact
            on the exponential graph of a power-of-two world size (log2(n) rounds), else
            the rounds it takes every worker to hear from every other (an approximate
            average; a pseudo-gradient left out by it stays in the models, not lost).
        outer_overlap: with ``local_steps``: overlap each outer step's averaging with the
            next ``H`` inner steps instead of waiting for it. The rounds advance between
            inner steps as their messages arrive; once the average is in, the outer step is
            applied and the inner steps taken meanwhile are kept on top of the new reference
            point (``x <- x0_new + (x - x_end)``, ``x_end`` the model the average started
            from). The next outer step waits for the average if it is still on its way.
        lag_limit: asynchronous mode: how many training steps a received share's model may
            be behind or ahead of this worker's before they no longer mix. A model carries
            the push-sum average of the step counts of the models it was mixed from
            (``Message.steps``); one that fell more than ``lag_limit`` steps behind (its
            worker was stopped, swapped out, cut off) gives its weight but not its model to
            the receiver, and a worker that fell behind takes the model of a share far
            ahead of it. None: every share mixes, however old. Ignored in the synchronous,
            overlap and local-steps modes, whose workers are never far apart.
    """

    _fragment: tuple[int, int, int] | None = None
    """(index, count, the whole model's fingerprint) where this gossips one fragment of a
    model (its ``params`` slices of the model's flat buffers) for a
    :class:`~gossip_sgp.streaming.StreamingSGP`, which talks to the node for it; None: a
    model of its own."""
    _sequence: dict[int, int] | None = None
    """The per-link sequence numbers a fragment shares with its siblings (see
    ``PushSumProtocol``)."""

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        optimizer: torch.optim.Optimizer,
        node: GossipNode,
        *,
        topology: str | Topology = "exponential",
        peers_per_round: int = 1,
        staleness: int | None = 0,
        timeout: float | None = None,
        compression: str = "none",
        policy: GossipPolicy | None = None,
        local_steps: int | None = None,
        outer: str | OuterFactory | None = None,
        outer_rounds: int | None = None,
        outer_overlap: bool = False,
        lag_limit: int | None = LAG_LIMIT,
    ) -> None:
        if self._fragment is None:
            self.params = _parameters(params, optimizer, "SGP")
        else:  # slices of the parameters, checked by StreamingSGP
            self.params = list(params)
        if staleness is not None and staleness < 0:
            raise ValueError(f"staleness must be >= 0 or None, got {staleness}")
        if local_steps is not None and policy is not None:
            raise ValueError("local_steps=H gossips in its outer steps only: it takes no policy=")
        if policy is None:
            policy = CreditWindow() if staleness is None else Lockstep(staleness)
        elif policy.staleness != staleness:
            raise ValueError(
                f"the policy {type(policy).__name__} has staleness {policy.staleness}, "
                f"SGP was given {staleness}: pass the same"
            )
        self.policy = policy
        """How the training rounds gossip (see :class:`GossipPolicy`)."""
        if lag_limit is not None and (type(lag_limit) is not int or lag_limit < 1):
            raise ValueError(f"lag_limit must be an integer >= 1 or None, got {lag_limit!r}")
        if type(outer_overlap) is not bool:
            raise ValueError(f"outer_overlap must be True or False, got {outer_overlap!r}")
        if local_steps is None:
            if outer is not None or outer_rounds is not None or outer_overlap:
                raise ValueError("outer=, outer_rounds= and outer_overlap= go with local_steps=H")
        else:
            if type(local_steps) is not int or local_steps < 1:
                raise ValueError(f"local_steps must be an integer >= 1, got {local_steps!r}")
            if staleness != 0:
                raise ValueError(
                    "local_steps=H averages the models synchronously every H steps: it takes "
                    "staleness=0"
                )
            if outer_rounds is not None and (type(outer_rounds) is not int or outer_rounds < 1):
                raise ValueError(f"outer_rounds must be an integer >= 1, got {outer_rounds!r}")
        self.local_steps = local_steps
        """``H`` of the local-steps mode (None: gossip every step)."""
        outer_factory = None if local_steps is None else resolve(outer)
        if staleness is None and node.plans_rounds:
            raise ValueError(
                "staleness=None (asynchronous SGP) needs a transport that delivers whatever "
                "arrives; the torch.distributed transport exchanges planned rounds only: use "
                "staleness=0 (synchronous) or staleness >= 1 (overlap), or the zmq transport"
            )
        self.optimizer = optimizer
        self.node = node
        self.staleness = staleness
        self.timeout = node.config.timeout if timeout is None else float(timeout)
        if not self.timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        self.topology = self._resolve_topology(topology, peers_per_round, node.world_size)
        layout = _layout(self.params)
        if self._fragment is not None:  # fragments of equal shapes, or of other models, differ
            tag = "fragment {} of {} of model {:x}".format(*self._fragment)
            layout.append((tag, (), torch.float32))
        self.fingerprint = fingerprint(layout)
        # a fragment's "parameters" are slices of StreamingSGP's flat buffers already
        self._flats = self.params if self._fragment is not None else _flatten(self.params)
        self.state = PushSumState([f.detach().clone() for f in self._flats])
        self.protocol = PushSumProtocol(
            node.rank,
            self.topology,
            self.state,
            fingerprint=self.fingerprint,
            coalesce=staleness is None,
            compression=compression,
            sequence=self._sequence,
        )
        self.lag_limit = lag_limit if isinstance(policy, CreditWindow) else None
        """Asynchronous mode: see ``lag_limit`` above (None in the other modes)."""
        self.protocol.mailbox.lag_limit = self.lag_limit
        if self.lag_limit is not None:  # (else nothing to compare: no call per message)
            self.protocol.mailbox.compared = self._compared
        self.round = 0
        self.steps = 0
        """``step()`` calls so far."""
        self.outer_steps = 0
        """Outer steps taken (local-steps mode)."""
        self.outer_gradient_norm: float | None = None
        """Local-steps mode: the norm of the last outer step's pseudo-gradient
        ``x0 - mean_i(x_i)``, relative to the norm of ``x0``."""
        self._inner = 0  # local-steps mode: inner steps since the last outer step
        self._reference: list[torch.Tensor] = []  # x0 (local-steps mode), one per flat
        self._outer: torch.optim.Optimizer | None = None
        self._reference_set = False  # x0 is the workers' common model
        if outer_factory is not None:
            self._reference = [f.detach().clone() for f in self._flats]
            self._outer = outer_factory(self._reference)
        self._outer_rounds = outer_rounds or _averaging_rounds(self.topology)
        """Local-steps mode: push-sum rounds per outer step."""
        self.outer_overlap = outer_overlap
        """Local-steps mode: whether outer steps overlap the next inner steps."""
        self._flight_sent: int | None = None
        """Local-steps mode: rounds sent of the outer step's averaging in flight (None: none
        in flight; without ``outer_overlap`` only within an outer step). Meanwhile the
        numerator holds that averaging's mass, not the model, and each reference tensor's
        ``grad`` the model it started from."""
        self.step_seconds = 0.0
        """Seconds spent in ``step()`` so far (optimizer step, gossip, waiting)."""
        self.loss: float | None = None
        """The training loss last given to :meth:`report` (exported as a metric)."""
        self.round_weight = self.state.weight
        """The push-sum weight at the end of the last round (mid-round, ``weight`` is split)."""
        self._metrics = node.metrics
        self._folded_through = -1  # every round <= this has been waited for and folded in
        # Per peer, the restarts whose codec references were reset: by the gossip thread for
        # links from the peer, by the training thread for links to it.
        self._inbound_lives: dict[int, int] = {}
        self._outbound_lives: dict[int, int] = {}
        self.skipped_rounds = 0
        """Asynchronous rounds in which this worker kept its mass (no send credit, or a full
        link to its out-peer)."""
        self._initial_credit = _INITIAL_CREDIT * max(
            (len(self.topology.out_peers(node.rank, r)) for r in range(self.topology.period)),
            default=0,
        )
        self._credit = self._initial_credit
        self._start_rounds = _start_rounds(self.topology) if node.world_size > 1 else 0
        """The first rounds are synchronous in every mode: a dissemination barrier (on the
        exponential graph exactly Hensgen et al.'s), after which every worker has heard,
        indirectly, from every other. Without it a worker that starts first trains alone while
        its peers are still starting, and an asynchronous run averages models that drifted
        apart (measured: 4 workers, one starting 1.5 s late, 0.84-0.95 accuracy instead of
        0.98)."""
        self.kept_rounds = 0
        """Rounds in which this worker kept its mass because an out-peer was suspected down."""
        self._refund = 0  # send credit given back for messages lost to a dead peer
        self._refund_lock = threading.Lock()  # guards _refund and _join_requests
        self._join_requests: list[int] = []  # restarted peers asking for half of our mass
        self._joined = threading.Event()  # rejoin(): a donor's half has arrived
        self._join_round = -1
        self._refused_by: set[int] = set()  # rejoin(): neighbours that said "too late"
        self._finishing = False  # in consensus(): JOIN requests are refused (guarded as above)
        self._finish_round = -1  # in consensus(): the round it began at (guarded as above)
        self._to_answer: set[tuple[int, int]] = set()  # (sender, seq) of training shares (same)
        self._answering = False  # in consensus(), past the drain: see _answer_stragglers
        self._held: list[tuple[int, int, list[Receipt]]] = []  # (peer, answer seq, receipts)
        # (sender, seq) of the shares whose acknowledgement is held back (same lock): a copy
        # of one is not acknowledged either, see _receive
        self._held_keys: set[tuple[int, int]] = set()
        self.answered = 0
        """Shares of peers still training this worker answered in ``consensus()``."""
        self.rejoined = False
        """Whether this worker joined a running job with :meth:`rejoin`."""
        self._neighbours = sorted(
            {
                peer
                for r in range(self.topology.period)
                for peer in (
                    *self.topology.out_peers(node.rank, r),
                    *self.topology.in_peers(node.rank, r),
                )
            }
        )
        """Every peer of the topology's period, either way (liveness, checkpoint cuts)."""
        if self._fragment is None:  # (a fragment's StreamingSGP attaches it)
            self._attach()

    def _attach(self) -> None:
        """Take this worker's messages from the node, and be read by its metrics."""
        node = self.node
        if self._metrics is not None:  # read at scrape time: everything snapshot() reads is set
            self._metrics.watch(self.snapshot)
        node.set_neighbours(set(self._neighbours))
        node.on_write_off(self._written_off)
        node.on_take_back(self._take_back)
        node.on_audit(self._audited)
        node.subscribe(
            self._receive,
            fingerprint=self.fingerprint,
            on_close=self.protocol.mailbox.close,
        )

    def _receive(self, message: Message) -> bool | None:
        """Gossip thread: decode a received message and store its mass.

        False for a copy of a share folded already (the node acknowledges it again), None
        for a copy of one whose acknowledgement this worker holds back (see
        ``_answer_stragglers``: acknowledged, the copy would let its sender finish before
        the answer is folded). A payload that does not decode raises ``WireError``; the node
        counts it as rejected.
        """
        if message.kind == MessageKind.HEARTBEAT:  # "no mass for you in this round"
            self.protocol.mailbox.mark_arrived(message.sender, message.round)
            return True
        if message.kind == MessageKind.JOIN:  # served by the training thread, see _round
            if message.refused:  # a neighbour's "too late": see rejoin()
                with self._refund_lock:
                    self._refused_by.add(message.sender)
                return True
            with self._refund_lock:
                finishing = self._finishing
                if not finishing:
                    self._join_requests.append(message.sender)
            if finishing:
                self.node.send_join(message.sender, refused=True)
            return True
        if message.join and not self._joined.is_set():
            fresh = self.protocol.receive(message)  # a donor's half: see rejoin()
            self._join_round = max(self._join_round, message.round)
            self._joined.set()
            return fresh
        answerable = False
        if message.round < self._finish_round and not message.answer:
            with self._refund_lock:  # a share sent while training: see _answer_stragglers
                answerable = message.round < self._finish_round  # not just out of consensus()
                if answerable:
                    self._to_answer.add((message.sender, message.seq))
        restarts = self.node.restarts_of(message.sender)  # once per message: no copy
        if restarts > self._inbound_lives.get(message.sender, 0):
            # A new life of the sender (the node saw its incarnation before handing the
            # message over): its references start afresh, so must ours of its link.
            self._inbound_lives[message.sender] = restarts
            self.protocol.peer_restarted(message.sender, outbound=False)
        # Room first, before a codec reference moves: a message refused for room comes again.
        self.protocol.mailbox.admit(message, self.round)
        message = self.protocol.decode(message)
        metrics = self._metrics
        token = None if metrics is None else metrics.received(message)  # for the metrics
        stored = self.protocol.mailbox.store(message)
        if stored is Stored.NEW:
            try:
                self.policy.received(self, message)
            except Exception:  # the mass is stored: a policy's bug must not count it lost
                log.exception("rank %d: the gossip policy failed on a share", self.node.rank)
        elif stored is Stored.COPY_OF_FOLDED:
            key = (message.sender, message.seq)
            with self._refund_lock:
                if answerable:  # a copy of a folded share: no receipt will come for it
                    self._to_answer.discard(key)
                held = key in self._held_keys
            if metrics is not None:
                metrics.rejected(message, token)
            return None if held else False
        return True

    def _compared(self, message: Message) -> bool:
        """Gossip thread, ``lag_limit``: whether a share kept per round is compared with
        this worker's model: in ``consensus()``, a peer's share sent while it trained (one
        far behind gives its weight only, as while training); never an answer, a consensus
        round's share or one of a checkpoint cut, so that the rounds that make the models
        agree mix them all."""
        return message.round < self._finish_round and not message.answer

    def _audited(self, sender: int, seqs: Collection[int]) -> tuple[list[int], list[int]]:
        """Gossip thread: answer a peer's audit of shares it wrote off (``Mailbox.folded``),
        less the shares whose acknowledgement is held back (see ``_answer_stragglers``):
        they count as still waiting, or the audit would let the peer finish early."""
        folded, never = self.protocol.mailbox.folded(sender, seqs)
        with self._refund_lock:
            folded = [seq for seq in folded if (sender, seq) not in self._held_keys]
        return folded, never

    def _take_back(self, share: Message) -> bool:
        """Gossip thread: a share that never left for a peer now suspected down comes back
        into this worker's own mass (folded at its next step, as received mass is), with
        its send credit. Not a difference-coded share (codec option ``ref``): the link's
        reference has moved on as if it had been delivered."""
        if self.protocol.references_of(share):
            return False
        try:
            decoded = self.protocol.decode(share)
        except WireError:
            return False
        self.protocol.mailbox.give_back(decoded.tensors, decoded.weight, decoded.steps)
        with self._refund_lock:
            self._refund += 1
        return True

    def _written_off(self, peer: int, lost_messages: int) -> None:
        """Gossip thread: messages to a dead peer will never be folded; their send credit
        comes back, so the other workers' gossip does not dry up (asynchronous mode). A
        message acknowledged after all (-1: the suspicion was a mistake) takes it back."""
        with self._refund_lock:
            self._refund += lost_messages

    @staticmethod
    def _resolve_topology(topology: str | Topology, peers: int, world_size: int) -> Topology:
        if isinstance(topology, Topology):
            if topology.world_size != world_size:
                raise ValueError(
                    f"topology is for world size {topology.world_size}, the job has {world_size}"
                )
            return topology
        if world_size == 1:
            return topologies.get(topology, 1)
        options = {"exponential": {"peers_per_round": peers}, "base-k": {"k": peers}}
        return topologies.get(topology, world_size, **options.get(topology, {}))

    @property
    def start_up_rounds(self) -> int:
        """Rounds of the start-up barrier still ahead (synchronous in every mode; 0 once
        past it): a benchmark that times steady-state steps runs these first."""
        return max(0, self._start_rounds - self.round)

    @property
    def weight(self) -> float:
        """The push-sum weight ``w`` of this node (with ``outer_overlap``, while an average
        is in flight, part of it may be on its way: see :meth:`outer_wait`)."""
        return self.state.weight

    # ------------------------------------------------------------------ training
    @torch.no_grad()
    def _apply_update(self, closure: Callable[[], Any] | None, *, numerator: bool = True) -> Any:
        """The optimizer's step, and ``x <- w * z`` unless ``numerator`` is False (an
        overlapped outer step's averaging holds the numerator)."""
        loss = _optimizer_step(self.optimizer, closure)
        self._updated(numerator=numerator)
        return loss

    def _updated(self, *, numerator: bool = True) -> None:
        """After the optimizer's step: one more step in the model, and ``x <- w * z``
        unless ``numerator`` is False."""
        self.state.steps += 1.0
        if numerator:
            # x <- w * z: x / w moves by exactly the optimizer's change of z (and by any
            # change the user made to the parameters since the last step).
            self._numerator_from_model()

    def _numerator_from_model(self) -> None:
        """``x <- w * z``: the numerator follows the model's parameters, the weight stays."""
        w = self.state.weight
        for x, flat in zip(self.state.numerator, self._flats, strict=True):
            torch.mul(flat, w, out=x)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One SGP iteration: optimizer step, one gossip round, de-biased parameters.

        In the local-steps mode: the optimizer step, and every ``local_steps`` steps an
        outer step. The first ``step()`` first averages the workers' models (exactly on a
        power-of-two exponential graph), so that all start from one reference point, and
        then applies the optimizer's step, from the gradient the caller took at its own
        starting model, to that average.
        """
        started = time.perf_counter()
        if self.local_steps is None:
            loss = self._apply_update(closure)
            self._round(self.policy, gauge=0.0)
        else:
            if not self._reference_set:
                self._start_reference()
            in_flight = self._flight_sent is not None
            loss = self._apply_update(closure, numerator=not in_flight)
            self._inner_step_taken(in_flight)
        self.steps += 1
        self.step_seconds += time.perf_counter() - started
        return loss

    def _inner_step_taken(self, in_flight: bool) -> None:
        """Local-steps mode, after an inner step (``in_flight``: an averaging was on its way
        before it): advance that averaging, and every ``local_steps`` steps take an outer
        step."""
        assert self.local_steps is not None
        if in_flight:
            self._progress(block=False)
        self._inner += 1
        if self._inner >= self.local_steps:
            self._progress(block=True)  # outer_overlap: at most one averaging in flight
            self._launch()
            if not self.outer_overlap:  # the next inner steps start from its result
                self._progress(block=True)

    @torch.no_grad()
    def _average(self, rounds: int) -> None:
        """``rounds`` push-sum rounds without training (synchronous), the models de-biased."""
        if self.node.world_size == 1:
            return
        for _ in range(rounds):
            self._round(_BARRIER, gauge=0.0)

    @torch.no_grad()
    def _start_reference(self) -> None:
        """Local-steps mode, before the first step: average the workers' models (over at
        least the start-up barrier's rounds) and take the result as the reference point."""
        self._average(max(self._start_rounds, self._outer_rounds))
        for ref, flat in zip(self._reference, self._flats, strict=True):
            ref.copy_(flat)
        self._reference_set = True

    @torch.no_grad()
    def _launch(self) -> None:
        """Start an outer step: average the models (the numerator is ``w * x`` after the
        last inner step), keeping each model in its reference tensor's ``grad``. Without
        ``outer_overlap`` the caller waits for it at once (``_progress(block=True)``), and
        ``_land`` then starts the next inner steps from the new reference point."""
        for ref, flat in zip(self._reference, self._flats, strict=True):
            if ref.grad is None:
                ref.grad = flat.clone()
            else:
                ref.grad.copy_(flat)
        self._inner = 0
        self._flight_sent = 0
        self._progress(block=False)

    @torch.no_grad()
    def _progress(self, *, block: bool) -> None:
        """Advance the outer step's averaging in flight as far as what has arrived
        allows (``block``: to its end, waiting), and land it once its last round is folded.

        Round ``r + 1`` is sent only after round ``r`` is folded: each round passes on all
        the mass folded so far, which is what makes log2(n) rounds exact."""
        if self._flight_sent is None:
            return
        while self.node.world_size > 1:  # a single worker's average is its model
            if self._flight_sent > 0 and self._folded_through < self.round - 1:
                if not block and not self._arrived(self.round - 1):
                    return
                self._catch_up(self.round - 1)
            if self._flight_sent == self._outer_rounds:
                break
            self._round(_SEND_ONLY, gauge=0.0, debias=False)
            self._flight_sent += 1
        self._land()

    def _arrived(self, k: int) -> bool:
        """Whether every message of round ``k`` from a peer not suspected down is in."""
        down = self.node.down_peers()
        expected = [(s, r) for s, r in self.protocol.expected(k) if s not in down]
        return self.protocol.mailbox.has(expected)

    @torch.no_grad()
    def _land(self) -> None:
        """The average is in: step the reference point with the outer optimizer on
        ``x0 - mean_i(x_i)``, and move the model by as much as the reference moved from the
        model the average started from (with ``outer_overlap`` the inner steps taken
        meanwhile stay on top; without, there are none and the model is the new point)."""
        assert self._outer is not None
        w = self.state.weight
        for ref, flat, x in zip(self._reference, self._flats, self.state.numerator, strict=True):
            assert ref.grad is not None
            flat.sub_(ref.grad)  # the inner steps since the launch
            torch.div(x, w, out=ref.grad)  # the average
            ref.grad.neg_().add_(ref)  # x0 - mean_i(x_i)
        self.outer_gradient_norm = _norm_ratio([r.grad for r in self._reference], self._reference)
        self._outer.step()
        for ref, flat in zip(self._reference, self._flats, strict=True):
            flat.add_(ref)
        self._numerator_from_model()
        self.round_weight = w
        self.outer_steps += 1
        self._flight_sent = None

    def outer_wait(self) -> None:
        """``outer_overlap``: wait for the outer step still on its way, if any, and apply it
        (``state_dict()`` and ``consensus()`` do this first: they read the numerator). Call
        it on every worker at the same step, e.g. to time or count a run's training to its
        last outer step; nothing to do in the other modes."""
        self._progress(block=True)

    def report(self, *, loss: float) -> None:
        """Record the training loss (a number, e.g. ``loss.item()``) for the metrics.

        Cheap: it only stores the value, which Prometheus reads when it scrapes (a NaN is
        exported as NaN: a diverging run shows).
        """
        self.loss = float(loss)

    def snapshot(self) -> TrainingStats:
        """A copy of this wrapper's counters, for the metrics (thread-safe)."""
        return TrainingStats(
            steps=self.steps,
            step_seconds=self.step_seconds,
            round=self.round,
            skipped_rounds=self.skipped_rounds,
            answered=self.answered,
            outer_steps=self.outer_steps,
            outer_gradient_norm=self.outer_gradient_norm,
            weight=self.round_weight,
            loss=self.loss,
            rejected=dict(self.protocol.mailbox.rejected),
            lagged=dict(self.protocol.mailbox.lagged),
        )

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Same as the wrapped optimizer's ``zero_grad``."""
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def _round(self, policy: GossipPolicy, *, gauge: float, debias: bool = True) -> None:
        k = self.round
        for peer, restarts in self.node.restarts().items():
            if restarts > self._outbound_lives.get(peer, 0):  # see _receive
                self._outbound_lives[peer] = restarts
                self.protocol.peer_restarted(peer, inbound=False)
        if self._join_requests:
            self._serve_joins(k)
        if self.node.world_size > 1:
            if k < self._start_rounds:
                policy = _BARRIER  # see __init__
            policy.round(self, k, gauge)
        if debias:
            self.state.debias(out=self._flats)
            self.round_weight = self.state.weight
        self.round = k + 1

    def _serve_joins(self, k: int) -> None:
        """Give each restarted peer that asked (``rejoin``) half of this worker's mass."""
        with self._refund_lock:
            peers, self._join_requests = list(dict.fromkeys(self._join_requests)), []
        for peer in peers:
            if self.staleness is not None:
                log.warning(
                    "rank %d: rank %d asks to rejoin, but only asynchronous jobs "
                    "(staleness=None) take a worker back; restart the job from checkpoints",
                    self.node.rank,
                    peer,
                )
                continue
            log.warning(
                "rank %d gives half of its mass to rank %d, rejoining", self.node.rank, peer
            )
            self.node.send([self.protocol.give_half(peer, k)])

    @torch.no_grad()
    def rejoin(self, timeout: float | None = None) -> int:
        """Join a running asynchronous job as a restarted worker; returns the job's round.

        Call it instead of training from the start, before the first ``step()``, on a worker
        restarted with the rank of one that died. This worker starts with no mass at all and
        asks its neighbours, one after another, for half of theirs: the first to answer
        gives half its numerator and weight (so this worker starts from its model, and no
        mass is created) and its round counter, where this worker carries on. Messages the
        peers had queued for this rank's previous life are folded in too. A neighbour that
        is already in ``consensus()`` (the job is finishing) refuses; when every neighbour
        has refused, ``RejoinRefused`` says it is too late to rejoin. Raises
        ``GossipTimeout`` when no neighbour answers within ``timeout`` seconds (default:
        the ``timeout`` of this ``SGP``). Only the asynchronous mode (``staleness=None``)
        can take a worker back: in the others the peers' rounds are paired up.
        """
        if self.staleness is not None:
            raise ValueError(
                "rejoin() needs staleness=None: only asynchronous SGP takes a worker back"
            )
        if self.node.world_size == 1 or self.steps or self.round:
            raise GossipError("rejoin() is for a restarted worker of a job, before its first step")
        for x in self.state.numerator:
            x.zero_()
        self.state.weight = 0.0
        topology, rank = self.topology, self.node.rank
        donors = sorted(
            {p for r in range(topology.period) for p in topology.out_peers(rank, r)}
            | {p for r in range(topology.period) for p in topology.in_peers(rank, r)}
        )
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        asked = 0
        while not self._joined.is_set():
            left = deadline - time.monotonic()
            with self._refund_lock:
                refused = set(self._refused_by)
            if refused >= set(donors):
                raise RejoinRefused(
                    f"rank {rank}: too late to rejoin: every neighbour (ranks {donors}) is "
                    "already in consensus(), the job is finishing"
                )
            if left <= 0:
                raise GossipTimeout(
                    f"rank {rank}: no neighbour (ranks {donors}) answered a request to rejoin"
                )
            asking = [d for d in donors if d not in refused]
            self.node.send_join(asking[asked % len(asking)])
            asked += 1
            self._joined.wait(min(_JOIN_SLICE, left))
        self.round = self._join_round + 1
        self._absorb(self._join_round)
        self._folded_through = self._join_round
        self._start_rounds = 0  # the job is past its start-up barrier
        self.state.debias(out=self._flats)
        self.round_weight = self.state.weight
        self.rejoined = True
        return self.round

    def _catch_up(self, through: int) -> None:
        """Wait for and fold every round up to ``through`` not folded yet."""
        for r in range(self._folded_through + 1, through + 1):
            self._wait(r)
            self._absorb(r)
            self._folded_through = r

    def _check_running(self) -> None:
        """Before splitting this worker's mass: a share for a stopped node would be lost."""
        if self.node.closed:
            raise GossipError(f"the gossip node of rank {self.node.rank} has stopped")

    def _send(self, k: int, gauge: float) -> None:
        """Send round ``k``'s shares to the topology's out-peers (each costs a send credit),
        or keep the mass and send skip notices when an out-peer is suspected down."""
        self._check_running()
        out_peers = self.topology.out_peers(self.node.rank, k)
        down = self.node.down_peers()
        if any(peer in down for peer in out_peers):
            # A suspected peer: keep this round's mass (a share sent to a dead worker would
            # be lost) and tell the out-peers, in case one is alive after all and waiting.
            self.node.send_skip(out_peers, k, fingerprint=self.fingerprint)
            self.kept_rounds += 1
            return
        self._credit -= len(out_peers)
        self.node.plan_round(k, self.topology.in_peers(self.node.rank, k), out_peers)
        self.node.send(self.protocol.emit(k, gauge=gauge))

    def _absorb(self, max_round: int) -> None:
        """Fold received mass of rounds ``<= max_round``; each message earns a send credit."""
        own: Sequence[torch.Tensor] = self._flats  # z before this fold, for the metrics
        if self._metrics is not None and self._flight_sent is not None:
            # outer_overlap: the models being averaged, not the one taking inner steps
            own = self._metrics.sample_own(self.state.numerator, self.state.weight)
        self.protocol.absorb(max_round)
        receipts = self.protocol.mailbox.pop_receipts()
        if self._to_answer or self._held:
            receipts = self._answer_stragglers(receipts)
        self.node.acknowledge(receipts)
        with self._refund_lock:
            refund, self._refund = self._refund, 0
        self._credit += len(receipts) + refund
        if self._metrics is not None and receipts:
            coalesced = self.protocol.mailbox.coalesce
            self._metrics.folded_in(receipts, self.round, own, coalesced=coalesced)

    def _answer_stragglers(self, receipts: list[Receipt]) -> list[Receipt]:
        """In ``consensus()``, asynchronous mode: for each peer still training that sent this
        worker a share just folded, send ``_ANSWER_FRACTION`` of this worker's mass back,
        on the reverse link, off the topology's schedule, when that link has no share of
        this worker's unfolded. Returns the receipts to acknowledge now.

        A straggler left alone once its peers finished gets no mass back, so no send
        credit: it trains the rest of its schedule alone with whatever weight it holds, and
        that much of its drifted model goes into the final average (in a 6x straggler run
        that ended at 0.877 accuracy, it held 0.73 of the 4 units). Answered, it earns the
        credit to send at every step: it hands its mass over to the finished workers half
        a share at a time, down to about ``2 * _ANSWER_FRACTION`` of theirs, so what it
        trains alone barely moves the average, and each answer pulls its model back
        towards theirs. Answers are marked and never answered.

        The acknowledgement of an answered share is held back until the answer is
        acknowledged (folded): the peer's ``_drain`` waits for it, so every answer is folded
        before its receiver's consensus rounds, also when one is lost and sent again.
        """
        with self._refund_lock:
            answerable = [r for r in receipts if r[:2] in self._to_answer]
            keys = {r[:2] for r in answerable}
            self._to_answer.difference_update(keys)
            self._held_keys.update(keys)  # until acknowledged below: see _receive
        now = [r for r in receipts if r[:2] not in keys]
        by_peer: dict[int, list[Receipt]] = {}
        for receipt in answerable:
            by_peer.setdefault(receipt[0], []).append(receipt)
        down = self.node.down_peers() if by_peer else set()
        for peer, held in by_peer.items():
            if not self._answering or peer in down or self.node.outstanding(peer):
                now += held  # before the drain, or no room on the link: no answer
                continue
            round = max(r for _, _, r in held)
            (answer,) = self.protocol.give({peer: _ANSWER_FRACTION}, round, answer=True)
            self.node.send([answer])
            self.answered += 1
            self._held.append((peer, answer.seq, held))
        waiting = []
        for peer, seq, held in self._held:
            if self.node.is_outstanding(peer, seq):
                waiting.append((peer, seq, held))
            else:  # folded (or written off: the peer is suspected down)
                now += held
        self._held = waiting
        with self._refund_lock:
            self._held_keys.difference_update(r[:2] for r in now)
        return now

    def _wait(self, round: int) -> None:
        expected = self.protocol.expected(round)
        mailbox = self.protocol.mailbox

        def live(down: set[int]) -> list[tuple[int, int]]:
            if self.staleness is None and round < self._start_rounds:
                # A neighbour that restarted while this worker is in the start-up barrier
                # rejoins at a live worker's round: its earlier life's messages of these
                # rounds will never come (the kill -9 + rejoin test: rank 1 waited 120 s at
                # round 1 for a rank 3 killed before it got there).
                down = down | self.node.restarted_peers()
            return [(s, r) for s, r in expected if s not in down]

        # Folding late shares of earlier rounds meanwhile: their sender may be waiting for
        # that acknowledgement before it sends this round (``_drain``; else only its next
        # copy, acknowledged at once as a duplicate, would end that).
        missing = self._wait_for(live, fold_through=round - 1)
        if missing is None:
            return
        senders = sorted(s for s, _ in missing)
        if mailbox.closed:
            raise GossipError(
                f"the gossip node of rank {self.node.rank} stopped while waiting for the "
                f"round-{round} messages of ranks {senders}"
            )
        part = "" if self._fragment is None else " of fragment {} of {}".format(*self._fragment)
        raise GossipTimeout(
            f"rank {self.node.rank} waited {self.timeout:g} s for the round-{round} "
            f"messages{part} of ranks {senders}; is every worker running the same number of "
            "steps with the same topology? Raise GossipConfig.timeout for slow links, "
            "or use staleness=None (asynchronous) to never wait. "
            + "; ".join(self.node.describe_peer(peer) for peer in senders)
        )

    def _wait_for(
        self, live: Callable[[set[int]], list[tuple[int, int]]], *, fold_through: int
    ) -> list[tuple[int, int]] | None:
        """Wait up to ``timeout`` for the messages ``live(peers suspected down)`` names.

        In slices, so that a sender suspected down meanwhile is no longer waited for, folding
        what has arrived up to round ``fold_through`` between slices. None once all are in;
        else the (sender, round) pairs still missing when the time is up or the node closed.
        """
        mailbox = self.protocol.mailbox
        deadline = time.monotonic() + self.timeout
        while True:
            wanted = live(self.node.down_peers())
            left = deadline - time.monotonic()
            # While answering a straggler, fold (and answer) its shares as they come.
            slice_ = _DRAIN_POLL if self._answering else _WAIT_SLICE
            if mailbox.wait(wanted, max(0.0, min(slice_, left))):
                return None
            if mailbox.closed or left <= 0:
                return [m for m in wanted if not mailbox.has([m])]
            self._absorb(fold_through)

    # ----------------------------------------------------------------- consensus
    @torch.no_grad()
    def consensus(self, max_rounds: int = 64, tol: float = 1e-6) -> float:
        """Gossip without training until the workers agree; returns the disagreement reached.

        Call it on every worker at the same point (for example after the last epoch); training
        may go on afterwards. First the rounds still owed are folded in (in the asynchronous
        mode: what arrives until this worker's peers have folded every share it sent while
        training; meanwhile it answers each share of a peer still training with a little of
        its own mass, so a straggler hands its mass over instead of training alone with
        it), then gossip-only
        rounds run in blocks long enough for every worker to hear from every other. Each
        message carries the largest relative change of ``z`` in one round that its sender
        knows of from the previous block; at the end of a block all workers know the same
        value and stop together once it is at most ``tol``, or after ``max_rounds`` rounds.
        A codec that cannot reach ``tol`` (one without ``ref``, or top-k: error feedback
        leaves the models as far apart as the codec's error) is set aside for these rounds:
        they send uncompressed shares, so the workers end with one model.
        That value, returned, estimates the disagreement: it is 0 once the workers agree,
        but on slowly mixing graphs (a ring) it understates the distance between workers.
        It is ``inf`` when ``max_rounds`` is shorter than two blocks (the first block has
        nothing to compare with); a single worker returns 0.0.
        """
        self.outer_wait()
        if self.node.world_size == 1:
            return 0.0
        mailbox = self.protocol.mailbox
        mailbox.set_coalesce(False)  # gossip-only rounds fold round by round, in every mode
        # The job is finishing: a restarted worker asking for mass now is refused (it could
        # not take part in the rounds its neighbours have planned).
        with self._refund_lock:
            self._finishing = True
            if self.staleness is None:
                self._finish_round = self.round  # shares of earlier rounds get answers
            late, self._join_requests = list(dict.fromkeys(self._join_requests)), []
        for peer in late:
            self.node.send_join(peer, refused=True)
        codec = self.protocol.codec
        if codec.name == "topk" or not codec.reference:
            self.protocol.codec = _LOSSLESS  # (answers to a straggler too: any codec decodes)
        try:
            disagreement = self._consensus(max_rounds, tol)
        finally:
            self.protocol.codec = codec
            mailbox.set_coalesce(self.staleness is None)
            self._answering = False
            with self._refund_lock:
                self._finishing = False
                self._finish_round = -1
                self._to_answer.clear()
                self._held_keys.clear()
            held, self._held = self._held, []  # normally none left: see _answer_stragglers
            self.node.acknowledge([r for _, _, receipts in held for r in receipts])
        # The consensus rounds waited for every message they sent, and links deliver in
        # order, so (short of lost messages or a cut-short consensus) no credit is in flight
        # now: everyone starts again with an even share. Without this, the credit could sit
        # unevenly, and a worker with none would skip its first asynchronous rounds.
        with self._refund_lock:  # a refund for messages sent before now is void too
            self._credit, self._refund = self._initial_credit, 0
        return disagreement

    def _consensus(self, max_rounds: int, tol: float) -> float:
        if self.staleness is None:
            self._drain()
            self._answering = self._finish_round >= 0  # after the drain: see _answer_stragglers
        self._settle()  # after the drain: z with all it folded
        mailbox = self.protocol.mailbox
        mailbox.take_gauge(self.round - 1)  # training messages carry no gauge
        done, disagreement, local = 0, math.inf, math.inf
        while done < max_rounds:
            # A block lets every live worker hear from every other; paths through workers
            # suspected down are cut (their rounds keep the mass local), so blocks get longer.
            # Blocks end on the same rounds on every worker, also when their views of who is
            # down differ by a peer (see _block_length): else one stops a round before
            # another, which then waits for its message until GossipTimeout.
            down = frozenset(self.node.down_peers())
            length = _block_length(self.topology, down)
            block = min(length - self.round % length, max_rounds - done)
            known = local
            for i in range(block):
                # Only the block's last round's change is carried on (the model is copied
                # and compared once per block, not every round: 10M floats take 0.1 s).
                last = i == block - 1
                before = [f.clone() for f in self._flats] if last else []
                r = self.round
                self._round(_BARRIER, gauge=min(known, _GAUGE_MAX))
                known = max(known, mailbox.take_gauge(r))
                if last:
                    local = _relative_change(before, self._flats)
            done += block
            disagreement = known
            if disagreement <= tol:
                break
        return disagreement

    def _drain(self) -> None:
        """Asynchronous mode, before the consensus rounds: wait until the peers have folded
        every share this worker sent while training, folding and acknowledging theirs
        meanwhile (a share that was lost is sent again by the node).

        Without this, a share still on its way when the consensus rounds end is never
        folded: the weights held at the end add up to less than the job's (measured once:
        3.2954 of 4 with 10% of the messages lost). A peer that dies meanwhile is suspected
        and its shares written off. After ``timeout`` seconds this worker goes on, with a
        warning.
        """
        start, node = self.round, self.node
        deadline = time.monotonic() + self.timeout
        while owed := node.unacknowledged(before_round=start):
            if self.protocol.mailbox.closed:
                raise GossipError(
                    f"the gossip node of rank {node.rank} stopped while {owed} shares sent "
                    "while training were not acknowledged"
                )
            if time.monotonic() >= deadline:
                log.warning(
                    "rank %d: %d shares sent while training are not acknowledged after %g s; "
                    "the consensus rounds go on without them",
                    node.rank,
                    owed,
                    self.timeout,
                )
                return
            self._absorb(start - 1)
            time.sleep(_DRAIN_POLL)

    def _cut(self) -> None:
        """Asynchronous mode, in :meth:`state_dict` at round ``k``: fold exactly the mass sent
        before each worker's call (a consistent cut, in the manner of Chandy and Lamport).

        From here on shares are kept per round (not summed as they arrive), so a share of
        round ``k`` or later, sent by a neighbour that has finished its own cut, stays out
        of this checkpoint (it is in the sender's). Then (``_drain``) this worker waits
        until its shares have been folded (acknowledged), folding its peers' meanwhile; then
        it tells every neighbour so (a skip notice for round ``k``, sent until acknowledged)
        and waits for the same word from each live one. A neighbour's notice comes after
        the acknowledgements of all its shares, which this worker sent after folding them:
        so once every notice is in, everything sent to it before the cut is folded; and a
        neighbour sends its round ``k`` only after this worker's notice, sent after the
        switch to per-round storage. After ``timeout`` seconds it goes on with a warning.
        """
        mailbox, node, k = self.protocol.mailbox, self.node, self.round
        mailbox.set_coalesce(False)
        try:
            self._drain()
            down = node.down_peers()
            node.send_skip([peer for peer in self._neighbours if peer not in down], k)
            missing = self._wait_for(
                lambda down: [(peer, k) for peer in self._neighbours if peer not in down],
                fold_through=k - 1,
            )
            if missing and not mailbox.closed:
                log.warning(
                    "rank %d: ranks %s did not finish their checkpoint cut within %g s; "
                    "the checkpoints may miss mass that was on its way",
                    node.rank,
                    sorted(peer for peer, _ in missing),
                    self.timeout,
                )
            self._settle()  # before coalescing again: the sum would take later rounds too
        finally:
            mailbox.set_coalesce(True)

    @torch.no_grad()
    def _settle(self) -> None:
        """Fold in everything this worker is owed: in the synchronous and overlap modes every
        round sent so far (waiting for it), in the asynchronous mode whatever has arrived."""
        if self.node.world_size == 1:
            return
        if self.staleness is None:
            # Folds all that arrived, but remembers arrivals of this round on: a peer that is
            # already in consensus() may have sent its round-``self.round`` message.
            self._absorb(self.round - 1)
            self._folded_through = self.round - 1
        else:
            self._catch_up(self.round - 1)
        self.state.debias(out=self._flats)

    def mass_report(self) -> dict[str, Any]:
        """Where this worker's push-sum weight stands, as plain numbers (JSON-ready).

        ``weight``: the weight it holds now; ``lost_weight``: weight it wrote off (messages
        to peers suspected down before acknowledging them, messages it dropped);
        ``suspected``: peers suspected down now; ``net_weight_to``: per peer (a string
        key), the weight it sent that the peer acknowledged minus the weight it received
        from the peer; ``written_off_to``: per peer, the shares written off as lost (in the
        asynchronous mode at most one on each link into a dead peer). It first waits (at
        most a second) for the peers to acknowledge the last messages sent. Gather the
        survivors' reports after ``consensus()`` and :func:`gossip_sgp.liveness.lost_weight`
        tells how much weight dead workers took with them.
        """
        received = [self.protocol.mailbox.weight_from]
        return _mass_report(self.node, self.state.weight, received, rejoined=self.rejoined)

    # --------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Numerator, weight, round, sequence numbers, send credit and the optimizer's state.

        Call it on every worker at the same step. It first folds in every round sent so far
        (overlap mode: waits for the last ``staleness`` rounds), so the workers' checkpoints
        together hold all the mass, none twice. In the asynchronous mode that takes a
        consistent cut (:meth:`_cut`): every worker waits until what it sent before the
        call has been folded, and until each neighbour says the same of its own.
        """
        self.outer_wait()  # outer_overlap: the saved state has no averaging in flight
        if self.staleness is None and self.node.world_size > 1:
            self._cut()
        else:
            self._settle()
        return {
            "round": self.round,
            "weight": self.state.weight,
            "numerator": [x.detach().clone() for x in self.state.numerator],
            "next_seq": self.protocol.sequence_numbers(),
            "credit": self._credit,
            "model_steps": self.state.steps,
            "fingerprint": self.fingerprint,
            "optimizer": self.optimizer.state_dict(),
            **self._local_state(),
        }

    def _check_local_state(self, local: dict[str, Any] | None) -> None:
        """Raise ``GossipError`` unless a checkpoint's local-steps entry fits this SGP: the
        same mode, the reference point's shapes, the outer optimizer's settings (resumed
        with others, torch would silently keep the saved ones)."""
        if (local is None) != (self._outer is None):
            raise GossipError(
                "checkpoint and SGP differ in the local-steps mode (local_steps=): "
                f"the checkpoint {'has' if local is not None else 'has no'} outer state"
            )
        if local is None or self._outer is None:
            return
        saved = local["reference"]
        if len(saved) != len(self._reference) or any(
            s.shape != ref.shape for s, ref in zip(saved, self._reference, strict=True)
        ):
            raise GossipError("checkpoint reference point has the wrong shape")
        mine = [{k: v for k, v in g.items() if k != "params"} for g in self._outer.param_groups]
        theirs = [
            {k: v for k, v in g.items() if k != "params"} for g in local["outer"]["param_groups"]
        ]
        if mine != theirs:
            raise GossipError(
                f"checkpoint's outer optimizer has other settings ({theirs}) than this SGP's "
                f"outer= ({mine}); resume with the same outer optimizer"
            )

    def _local_state(self) -> dict[str, Any]:
        """Local-steps mode: the reference point, the outer optimizer's state and where the
        worker stands in its inner steps; nothing otherwise."""
        if self._outer is None:
            return {}
        return {
            "local": {
                "inner": self._inner,
                "outer_steps": self.outer_steps,
                "started": self._reference_set,
                "reference": [ref.detach().clone() for ref in self._reference],
                "outer": self._outer.state_dict(),
            }
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved (same model layout required)."""
        self._check_state(state)  # before anything changes
        self._restore(state, optimizer=True)

    def _check_state(self, state: dict[str, Any]) -> None:
        """Raise ``GossipError`` unless ``state`` is a checkpoint of this SGP's model and
        mode (nothing changes)."""
        if state.get("fingerprint") != self.fingerprint:
            raise GossipError("checkpoint is for another model layout (fingerprint differs)")
        lacking = [k for k in ("numerator", "weight", "round", "next_seq") if k not in state]
        if lacking:
            raise GossipError(f"checkpoint lacks {', '.join(lacking)}")
        numerator = state["numerator"]
        if len(numerator) != len(self.state.numerator):
            raise GossipError("checkpoint has a different number of parameter groups")
        if any(
            saved.shape != x.shape for x, saved in zip(self.state.numerator, numerator, strict=True)
        ):
            raise GossipError("checkpoint numerator has the wrong shape")
        self._check_local_state(state.get("local"))

    @torch.no_grad()
    def _restore(self, state: dict[str, Any], *, optimizer: bool) -> None:
        """Load a checked ``state`` (``optimizer``: the wrapped optimizer's too)."""
        numerator, local = state["numerator"], state.get("local")
        for x, saved in zip(self.state.numerator, numerator, strict=True):
            x.copy_(saved)
        self.state.weight = float(state["weight"])
        self.round = int(state["round"])
        self._folded_through = self.round - 1
        self._credit = int(state.get("credit", self._credit))
        self.state.steps = float(state.get("model_steps", 0.0))
        self.protocol.restore_sequence_numbers(state["next_seq"])
        if optimizer:
            self.optimizer.load_state_dict(state["optimizer"])
        if local is not None and self._outer is not None:
            for ref, saved in zip(self._reference, local["reference"], strict=True):
                ref.copy_(saved)
            self._outer.load_state_dict(local["outer"])
            self._inner = int(local["inner"])
            self.outer_steps = int(local["outer_steps"])
            self._reference_set = bool(local["started"])
        self._flight_sent = None  # a checkpoint holds no averaging in flight (state_dict)
        self.state.debias(out=self._flats)


def _parameters(
    params: Iterable[torch.Tensor], optimizer: torch.optim.Optimizer, who: str
) -> list[torch.Tensor]:
    """``params`` without repeats, in order; ``ValueError`` for none, or for one that
    ``optimizer`` does not manage."""
    unique = list(dict.fromkeys(params))  # drop repeats, keep order
    if not unique:
        raise ValueError(f"{who} needs at least one parameter")
    owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing = [i for i, p in enumerate(unique) if id(p) not in owned]
    if missing:
        raise ValueError(f"parameters {missing} are not managed by the optimizer")
    return unique


def _layout(params: Sequence[torch.Tensor]) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """What a model's fingerprint is made of: (index, shape, dtype) per parameter."""
    return [(str(i), tuple(p.shape), p.dtype) for i, p in enumerate(params)]


def _mass_report(
    node: GossipNode, weight: float, received: Sequence[dict[int, float]], *, rejoined: bool
) -> dict[str, Any]:
    """``SGP.mass_report``'s figures for push-sum states that hold ``weight`` (their mean)
    and whose mailboxes took in ``received`` (per state, per peer): one state for ``SGP``,
    one per fragment for ``StreamingSGP``, whose shares the node's ledgers add up, so its
    figures are means over the states too. First waits (at most ``_ACK_SETTLE``) for the
    last acknowledgements."""
    node.wait_acknowledged(_ACK_SETTLE)  # the last round's acknowledgements
    acked = dict(node.acked_weight)
    count = len(received)
    taken: dict[int, float] = {}
    for weights in received:
        for peer, w in weights.items():
            taken[peer] = taken.get(peer, 0.0) + w
    peers = sorted(set(acked) | set(taken))
    return {
        "weight": weight,
        "lost_weight": node.lost_weight / count,
        "suspected": sorted(node.down_peers()),
        "rejoined": rejoined,
        "net_weight_to": {str(p): (acked.get(p, 0.0) - taken.get(p, 0.0)) / count for p in peers},
        "written_off_to": {str(p): n for p, n in sorted(node.written_off.items())},
    }


def _optimizer_step(optimizer: torch.optim.Optimizer, closure: Callable[[], Any] | None) -> Any:
    """``optimizer.step(closure)``, with gradients enabled (``step()`` runs without)."""
    with torch.enable_grad():
        return optimizer.step(closure) if closure is not None else optimizer.step()


def _norm(t: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(t, dtype=torch.float64))


def _norm_ratio(top: list[Any], bottom: list[torch.Tensor]) -> float:
    """``|top| / |bottom|`` over all tensors (``|top|`` where ``bottom`` is 0)."""
    num = math.hypot(*(_norm(t) for t in top))
    den = math.hypot(*(_norm(b) for b in bottom))
    return num / den if den > 0 else num


def _relative_change(before: list[torch.Tensor], after: list[torch.Tensor]) -> float:
    return _norm_ratio([a - b for a, b in zip(after, before, strict=True)], before)


def _averaging_rounds(topology: Topology) -> int:
    """Push-sum rounds of an outer step: log2(n), exact, on the exponential graph of a
    power-of-two world size with one peer per round; else a block (every worker hears from
    every other)."""
    n = topology.world_size
    if n == 1:
        return 0
    exact = (
        topology.name == "exponential"
        and n & (n - 1) == 0
        and all(len(topology.out_peers(0, r)) == 1 for r in range(topology.period))
    )
    return topology.period if exact else _block_length(topology, frozenset())


def _start_rounds(topology: Topology) -> int:
    """Synchronous rounds at the start of a job, in every mode: the start-up barrier.

    A message of round ``r`` leaves a worker only after it has received all of its round
    ``r - 1`` messages. Rounds ``0 .. period - 1`` use every link of the topology once, so
    once every worker has (indirectly) heard from every other worker's round-``period``
    message, every link has carried a message and every worker is through its start-up:
    ``period + broadcast`` rounds. Knowing only that every worker has *sent* round 0 (the
    broadcast alone) is not enough: a link whose first connection attempt came before its
    receiver was listening waits out ZeroMQ's reconnect back-off (100 ms doubling, measured
    1.5 s on 2 cores at start-up), and while its receiver waited, workers past such a short
    barrier trained alone: AD-PSGD averaged 2 times in 240 steps instead of 40.
    """
    period = topology.period
    return period + _broadcast_rounds(topology, period)


def _block_length(topology: Topology, down: frozenset[int]) -> int:
    """Rounds per consensus block: consensus blocks end where ``round % length == 0``.

    Long enough, from any round, for every live worker to hear (indirectly) from every other
    with no worker down, with any single one down (of those whose absence leaves the rest
    connected), and with the workers in ``down`` down. So workers whose views of who is down
    differ by one peer, as around a worker's death (one suspects it, another not yet), still
    end their blocks, and so decide to stop, on the same rounds. Measured without this
    (4 asynchronous digits workers, rank 3 killed 5 s before the end of training): rank 0
    started consensus before it suspected rank 3 and used 2-round blocks, ranks 1 and 2
    3-round ones; rank 0 stopped at round 497 and rank 2 waited 120 s for its message.
    """
    return max(_single_failure_length(topology), _worst_phase(topology, down))


@functools.lru_cache(maxsize=16)
def _single_failure_length(topology: Topology) -> int:
    lengths = [_worst_phase(topology, frozenset())]
    for rank in range(topology.world_size):
        with contextlib.suppress(GossipError):  # its loss cuts the graph: nothing to plan for
            lengths.append(_worst_phase(topology, frozenset({rank})))
    return max(lengths)


def _worst_phase(topology: Topology, down: frozenset[int]) -> int:
    return max(_broadcast_rounds(topology, start, down) for start in range(topology.period))


def _broadcast_rounds(topology: Topology, start: int, down: frozenset[int] = frozenset()) -> int:
    """Rounds from ``start`` until every live node has (indirectly) heard from every other
    live node, with the nodes in ``down`` (and every edge to or from them) taken out."""
    return _broadcast_rounds_cached(topology, start % topology.period, down)


@functools.lru_cache(maxsize=64)
def _broadcast_rounds_cached(topology: Topology, start: int, down: frozenset[int]) -> int:
    n, period = topology.world_size, topology.period
    live = [i for i in range(n) if i not in down]
    heard_from = _heard_from(topology, down)
    everyone = sum(1 << i for i in live)
    reach = [1 << i for i in range(n)]  # reach[i]: bit j set once i has heard from j
    still = 0  # rounds in a row that brought nobody news
    for t in range(start, start + 4 * n + 64):
        new = list(reach)
        for i, senders in zip(live, heard_from[t % period], strict=True):
            for j in senders:
                new[i] |= reach[j]
        still = still + 1 if new == reach else 0
        reach = new
        if all(reach[i] & everyone == everyone for i in live):
            return t - start + 1
        if still >= period:  # a whole period without news: it never comes
            break
    missing = f" without the ranks {sorted(down)} suspected down" if down else ""
    raise GossipError(f"topology {topology.name} does not connect all its nodes{missing}")


@functools.lru_cache(maxsize=256)
def _heard_from(
    topology: Topology, down: frozenset[int]
) -> tuple[tuple[tuple[int, ...], ...], ...]:
    """Per phase of the topology's period, per live node, the nodes it hears from: not one
    that is down or keeps its mass in that round because an out-peer is (see SGP._send).
    Tuples: the cache hands the same value to every caller."""
    n = topology.world_size
    phases = []
    for t in range(topology.period):
        keeps = {
            j for j in range(n) if j in down or any(p in down for p in topology.out_peers(j, t))
        }
        phases.append(
            tuple(
                tuple(j for j in topology.in_peers(i, t) if j not in keeps)
                for i in range(n)
                if i not in down
            )
        )
    return tuple(phases)
