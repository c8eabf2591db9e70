"""The library's own error types.

Foreign errors (ZeroMQ, msgpack, torch.distributed, OS) are translated into these at the
boundary where they occur, so callers only ever need to catch ``GossipError``.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "GossipError",
    "GossipTimeout",
    "RejoinRefused",
    "SendTimeout",
    "TransportClosed",
    "TransportError",
    "WireError",
]


class GossipError(Exception):
    """Base class of every error raised by gossip-sgp."""


class ConfigError(GossipError, ValueError):
    """A configuration, peer list, environment variable or CLI argument is invalid."""


class WireError(GossipError):
    """A message from the network failed validation and was rejected.

    ``reason`` is one of a small fixed set of labels (see ``gossip_sgp.wire.REJECT_REASONS``),
    used as the label value of the rejected-messages metric.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class TransportError(GossipError):
    """A transport failed to start, send or receive."""


class TransportClosed(TransportError):
    """The transport was closed; no more messages will be received or sent."""


class GossipTimeout(GossipError, TimeoutError):
    """Waiting for gossip messages exceeded its deadline."""


class SendTimeout(TransportError, GossipTimeout):
    """A message could not be queued for a peer in time (its send queue stayed full).

    The message was not sent: its mass is still the sender's to keep or to send again.
    """


class RejoinRefused(GossipError):
    """``SGP.rejoin()``: every neighbour refused, because the job is finishing (they are in
    ``consensus()``): too late to rejoin."""
