"""``StreamingSGP``: local steps whose outer steps average the model a fragment at a time.

``SGP(..., local_steps=H)`` sends the whole model in every outer step's push-sum rounds, once
every ``H`` steps: the link idles for ``H - 1`` steps, then carries the whole model at once.
Streaming DiLoCo (Douillard et al., 2025) splits the parameters into ``F`` fragments (here
``F`` equal pieces of the flattened parameters), each averaged every ``H`` steps as before
but on staggered steps, fragment ``f`` on the steps
``t`` with ``t = round((f + 1) H / F) (mod H)``; every ``H / F`` steps one fragment goes
out, so the link carries ``1 / F`` of the model at a time, as many bytes per ``H`` steps::

    sgp = StreamingSGP(model.parameters(), optimizer, node, fragments=4, local_steps=16,
                       outer="slowmo")

Each fragment is gossiped as a model of its own: an :class:`~gossip_sgp.sgp.SGP` in the
local-steps mode over its piece of the parameters, with its own push-sum state and weight, mailbox,
reference point and outer optimizer (a pseudo-gradient of one fragment never moves
another's parameters). The fragments share the worker's node: each has its own model
fingerprint, by which the node's messages reach it, and one series of sequence numbers per
link, by which the node acknowledges, sends again and audits the shares of all of them.
What holds for the local-steps mode holds per fragment: exact averages on a power-of-two
exponential graph, ``outer_overlap``, suspected peers left out of the rounds,
``consensus()``, checkpoints that resume bit for bit.
"""

from __future__ import annotations

import itertools
import math
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Any

import torch

from gossip_sgp.errors import GossipError, WireError
from gossip_sgp.message import Message, MessageKind, fingerprint
from gossip_sgp.node import GossipNode
from gossip_sgp.outer import OuterFactory
from gossip_sgp.sgp import SGP, _flatten, _layout, _mass_report, _optimizer_step, _parameters
from gossip_sgp.stats import TrainingStats
from topologies import Topology

__all__ = ["StreamingSGP", "first_outer_step", "fragment_slices"]


def fragment_slices(flats: Sequence[torch.Tensor], fragments: int) -> list[list[torch.Tensor]]:
    """Cut the flat buffers ``flats`` (taken as one vector, in order) into ``fragments``
    pieces of equal size (to an element): per fragment, the views of the buffers' slices it
    covers (one, or more where it spans two buffers). A piece may cut through a
    parameter: every fragment is as large as every other, whatever the model's layers."""
    total = sum(flat.numel() for flat in flats)
    if not 1 <= fragments <= total:
        raise ValueError(f"{total} elements cannot make {fragments} non-empty fragments")
    cuts = [total * f // fragments for f in range(fragments + 1)]
    pieces: list[list[torch.Tensor]] = []
    for start, end in itertools.pairwise(cuts):
        piece, offset = [], 0
        for flat in flats:
            lo, hi = max(start, offset), min(end, offset + flat.numel())
            if lo < hi:
                piece.append(flat[lo - offset : hi - offset])
            offset += flat.numel()
        pieces.append(piece)
    return pieces


def first_outer_step(fragment: int, fragments: int, local_steps: int) -> int:
    """The step (counted from 1) of fragment ``fragment``'s first outer step: the fragments'
    outer steps spread evenly over every ``local_steps`` steps, the last fragment's on the
    ``local_steps``-th (where the local-steps mode of ``SGP`` takes its first)."""
    return round((fragment + 1) * local_steps / fragments)


class _Fragment(SGP):
    """One fragment's gossip: an ``SGP`` in the local-steps mode that leaves the node to
    its ``StreamingSGP`` and numbers its shares in the series its siblings share."""

    def __init__(
        self,
        index: int,
        count: int,
        model: int,
        sequence: dict[int, int],
        params: list[torch.Tensor],
        optimizer: torch.optim.Optimizer,
        node: GossipNode,
        **options: Any,
    ) -> None:
        self._fragment = (index, count, model)
        self._sequence = sequence
        super().__init__(params, optimizer, node, **options)


class StreamingSGP:
    """Wraps ``optimizer`` as ``SGP(..., local_steps=H)`` does, with the parameters
    averaged in ``fragments`` fragments on staggered steps (see the module's text).

    Args:
        params, optimizer, node, topology, peers_per_round, timeout, compression: as
            :class:`~gossip_sgp.sgp.SGP`'s.
        fragments: ``F``, how many fragments: the parameters, flattened in the order of
            ``params`` into one buffer per (device, dtype) as ``SGP`` does, cut into ``F``
            pieces of equal size (:func:`fragment_slices`; a piece may cut through a
            parameter); at least 1, at most ``local_steps``. With ``F = 1`` the whole
            model is averaged every ``H`` steps, as by ``SGP(..., local_steps=H)``.
        local_steps: ``H``: each fragment is averaged every ``H`` steps; fragment ``f``
            first on step ``round((f + 1) H / F)`` (the last on step ``H``).
        outer, outer_rounds, outer_overlap: as ``SGP``'s, for each fragment (each has an
            outer optimizer of its own, made by ``outer``).

    Synchronous, as the local-steps mode is. Needs a transport that delivers whatever
    arrives (ZeroMQ, in-process): the torch.distributed transport plans its rounds by
    round number, which the fragments count each on their own.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        optimizer: torch.optim.Optimizer,
        node: GossipNode,
        *,
        fragments: int,
        local_steps: int,
        outer: str | OuterFactory | None = None,
        outer_rounds: int | None = None,
        outer_overlap: bool = False,
        topology: str | Topology = "exponential",
        peers_per_round: int = 1,
        timeout: float | None = None,
        compression: str = "none",
    ) -> None:
        self.params = _parameters(params, optimizer, "StreamingSGP")
        if type(local_steps) is not int or local_steps < 1:
            raise ValueError(f"local_steps must be an integer >= 1, got {local_steps!r}")
        if type(fragments) is not int or fragments < 1:
            raise ValueError(f"fragments must be an integer >= 1, got {fragments!r}")
        total = sum(p.numel() for p in self.params)
        if fragments > total:
            raise ValueError(f"fragments={fragments}: the model has only {total} elements")
        if fragments > local_steps:
            raise ValueError(
                f"fragments={fragments} > local_steps={local_steps}: each fragment's outer "
                "step needs a step of its own"
            )
        if node.plans_rounds:
            raise ValueError(
                "StreamingSGP needs a transport that delivers whatever arrives (zmq): the "
                "torch.distributed transport plans rounds by number, and each fragment "
                "numbers its rounds on its own"
            )
        self.optimizer = optimizer
        self.node = node
        self.local_steps = local_steps
        """``H``: steps between two outer steps of one fragment."""
        self.fragments = fragments
        """``F``: how many fragments."""
        self.fingerprint = fingerprint(
            [*_layout(self.params), (f"streaming, {fragments} fragments", (), torch.float32)]
        )
        """The whole model's fingerprint (the node's own messages carry it; each fragment's
        is made from its own parameters and this)."""
        self._flats = _flatten(self.params)  # the parameters become views into these
        pieces = fragment_slices(self._flats, fragments)
        sequence: dict[int, int] = {}  # the links' sequence numbers, shared
        self.parts: list[SGP] = [
            _Fragment(
                f,
                fragments,
                self.fingerprint,
                sequence,
                piece,
                optimizer,
                node,
                topology=topology,
                peers_per_round=peers_per_round,
                timeout=timeout,
                compression=compression,
                local_steps=local_steps,
                outer=outer,
                outer_rounds=outer_rounds,
                outer_overlap=outer_overlap,
            )
            for f, piece in enumerate(pieces)
        ]
        """One ``SGP`` per fragment (its ``params``: the fragment's slices of the flat
        buffers)."""
        for f, part in enumerate(self.parts):  # stagger: fragment f's first outer step
            part._inner = local_steps - first_outer_step(f, fragments, local_steps)
        self._by_fingerprint = {part.fingerprint: part for part in self.parts}
        if len(self._by_fingerprint) != fragments or self.fingerprint in self._by_fingerprint:
            raise GossipError("two fragments have the same fingerprint")  # (a 64-bit clash)
        self.steps = 0
        """``step()`` calls so far."""
        self.step_seconds = 0.0
        """Seconds spent in ``step()`` so far."""
        self.loss: float | None = None
        """The training loss last given to :meth:`report`."""
        self.outer_gradient_norm: float | None = None
        """The norm of the last outer step's pseudo-gradient (of whichever fragment took
        it), relative to the norm of that fragment's reference point."""
        self._attach()

    def _attach(self) -> None:
        """Take the node's messages for every fragment; be read by the node's metrics."""
        node, first = self.node, self.parts[0]
        if node.metrics is not None:
            node.metrics.watch(self.snapshot)
        node.set_neighbours(set(first._neighbours))  # (one topology: the same for all)
        node.on_take_back(self._take_back)
        node.on_audit(self._audited)
        node.subscribe(
            self._receive,
            fingerprint=self.fingerprint,
            on_close=self._closed,
            also=list(self._by_fingerprint),
        )

    # ------------------------------------------------------------------ gossip thread
    def _receive(self, message: Message) -> bool | None:
        """Gossip thread: hand a message to its fragment; the others count its sequence
        number as seen (see ``Mailbox.seen_elsewhere``)."""
        part = self._by_fingerprint.get(message.fingerprint)
        if part is None:  # the whole model's: a restarted worker asking for mass
            if message.kind == MessageKind.JOIN and not message.refused:
                self.node.send_join(message.sender, refused=True)  # no rejoin() here
            return True
        mass = message.kind == MessageKind.MASS
        try:
            fresh = part._receive(message)
        except WireError as exc:
            # Refused (its copy may come again), its number is taken all the same: the
            # siblings' references go on after it. Not a number of an earlier life.
            if mass and exc.reason != "stale":
                self._passed(part, message)
            raise
        if mass:
            self._passed(part, message)
            for other in self.parts:  # (only a share taken counts as seen: see _audited)
                if other is not part:
                    other.protocol.mailbox.seen_elsewhere(
                        message.sender, message.incarnation, message.seq
                    )
        return fresh

    def _passed(self, part: SGP, message: Message) -> None:
        """Difference coding (``ref``): the other fragments' references of the link skip
        ``message``'s number (see ``References.passed``)."""
        for other in self.parts:
            if other is not part:
                other.protocol.passed(message.sender, message.seq)

    def _audited(self, sender: int, seqs: Collection[int]) -> tuple[list[int], list[int]]:
        """Gossip thread: a peer's audit of shares it wrote off, which may be any
        fragment's. Every fragment counts every number as seen (see :meth:`_receive`), so
        "never received" is what all say; "folded" what all say (the owner, once it
        folded the share; the others of every number they saw).
        """
        asked = list(seqs)
        folded, never = set(asked), set(asked)
        for part in self.parts:
            theirs, none = part._audited(sender, asked)
            folded.intersection_update(theirs)
            never.intersection_update(none)
        return sorted(folded), sorted(never)

    def _take_back(self, share: Message) -> bool:
        """Gossip thread: a share that never left for a peer suspected down goes back to
        its fragment."""
        part = self._by_fingerprint.get(share.fingerprint)
        return part is not None and part._take_back(share)

    def _closed(self) -> None:
        for part in self.parts:
            part.protocol.mailbox.close()

    # ------------------------------------------------------------------ training
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """The optimizer's step; then each fragment whose turn it is takes its outer step.

        The first call first averages every fragment (so all workers start from one
        reference point), then applies the optimizer's step to that average, as
        ``SGP``'s local-steps mode does.
        """
        started = time.perf_counter()
        for part in self.parts:
            if not part._reference_set:
                part._start_reference()
        in_flight = [part._flight_sent is not None for part in self.parts]
        loss = _optimizer_step(self.optimizer, closure)
        with torch.no_grad():
            for part, flying in zip(self.parts, in_flight, strict=True):
                part._updated(numerator=not flying)
        for part, flying in zip(self.parts, in_flight, strict=True):
            before = part.outer_steps
            part._inner_step_taken(flying)
            part.steps += 1
            if part.outer_steps != before:
                self.outer_gradient_norm = part.outer_gradient_norm
        self.steps += 1
        self.step_seconds += time.perf_counter() - started
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Same as the wrapped optimizer's ``zero_grad``."""
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def outer_wait(self) -> None:
        """``outer_overlap``: wait for every fragment's average still on its way, and
        apply it (see ``SGP.outer_wait``)."""
        for part in self.parts:
            before = part.outer_steps
            part.outer_wait()
            if part.outer_steps != before:
                self.outer_gradient_norm = part.outer_gradient_norm

    @property
    def outer_steps(self) -> int:
        """Outer steps taken, all fragments together (``F`` per ``H`` steps)."""
        return sum(part.outer_steps for part in self.parts)

    @property
    def weight(self) -> float:
        """The fragments' push-sum weights, averaged (each fragment's add up to the number
        of workers, less what dead workers took with them)."""
        return math.fsum(part.weight for part in self.parts) / len(self.parts)

    @property
    def kept_rounds(self) -> int:
        """Rounds, of all fragments, in which this worker kept its mass because an
        out-peer was suspected down."""
        return sum(part.kept_rounds for part in self.parts)

    @property
    def skipped_rounds(self) -> int:
        """0: the asynchronous mode's count (see ``SGP.skipped_rounds``); outer steps are
        synchronous."""
        return sum(part.skipped_rounds for part in self.parts)

    @property
    def answered(self) -> int:
        """0: the asynchronous mode's count (see ``SGP.answered``)."""
        return sum(part.answered for part in self.parts)

    @property
    def start_up_rounds(self) -> int:
        """Rounds of the start-up barrier still ahead (see ``SGP.start_up_rounds``)."""
        return max(part.start_up_rounds for part in self.parts)

    def mass_report(self) -> dict[str, Any]:
        """As ``SGP.mass_report``, with every weight a mean over the fragments (``weight``,
        ``lost_weight``, ``net_weight_to``): each fragment keeps its own push-sum weight,
        and the node's ledgers add up the shares of all of them."""
        received = [part.protocol.mailbox.weight_from for part in self.parts]
        report = _mass_report(self.node, self.weight, received, rejoined=False)
        return {**report, "fragments": len(self.parts)}

    def consensus(self, max_rounds: int = 64, tol: float = 1e-6) -> float:
        """Gossip without training until the workers agree on every fragment, one fragment
        after the other (see ``SGP.consensus``); returns the largest disagreement reached."""
        self.outer_wait()
        return max([part.consensus(max_rounds, tol) for part in self.parts])

    def report(self, *, loss: float) -> None:
        """Record the training loss for the metrics (see ``SGP.report``)."""
        self.loss = float(loss)

    def snapshot(self) -> TrainingStats:
        """The counters of all fragments together, for the metrics (thread-safe)."""
        parts = [part.snapshot() for part in self.parts]
        rejected: Counter[str] = Counter()
        lagged: Counter[str] = Counter()
        for stats in parts:
            rejected.update(stats.rejected)
            lagged.update(stats.lagged)
        return TrainingStats(
            steps=self.steps,
            step_seconds=self.step_seconds,
            round=sum(stats.round for stats in parts),
            skipped_rounds=sum(stats.skipped_rounds for stats in parts),
            answered=sum(stats.answered for stats in parts),
            outer_steps=sum(stats.outer_steps for stats in parts),
            outer_gradient_norm=self.outer_gradient_norm,
            weight=sum(stats.weight for stats in parts) / len(parts),
            loss=self.loss,
            rejected=dict(rejected),
            lagged=dict(lagged),
        )

    # --------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Every fragment's state (``SGP.state_dict``) and the optimizer's, once. Call it
        on every worker at the same step."""
        self.outer_wait()
        states = [part.state_dict() for part in self.parts]
        for state in states:
            del state["optimizer"]  # the one optimizer of all fragments: saved once
        return {
            "fingerprint": self.fingerprint,
            "steps": self.steps,
            "optimizer": self.optimizer.state_dict(),
            "fragments": states,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved (the same model and fragments); every
        fragment's state is checked before anything changes."""
        if state.get("fingerprint") != self.fingerprint:
            raise GossipError(
                "checkpoint is for another model layout or number of fragments "
                "(fingerprint differs)"
            )
        lacking = [k for k in ("fragments", "optimizer", "steps") if k not in state]
        if lacking:
            raise GossipError(f"checkpoint lacks {', '.join(lacking)}")
        saved = state["fragments"]
        if len(saved) != len(self.parts):
            raise GossipError("checkpoint's fragments differ from this StreamingSGP's")
        for part, part_state in zip(self.parts, saved, strict=True):
            part._check_state(part_state)
        self.optimizer.load_state_dict(state["optimizer"])
        for part, part_state in zip(self.parts, saved, strict=True):
            part._restore(part_state, optimizer=False)
        self.steps = int(state["steps"])
