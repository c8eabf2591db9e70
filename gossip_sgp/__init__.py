"""gossip-sgp: decentralized PyTorch training with Stochastic Gradient Push."""

from __future__ import annotations

from gossip_sgp.errors import (
    ConfigError,
    GossipError,
    GossipTimeout,
    TransportClosed,
    TransportError,
    WireError,
)
from gossip_sgp.mailbox import Mailbox
from gossip_sgp.message import Message, MessageKind, fingerprint
from gossip_sgp.protocol import PushSumProtocol
from gossip_sgp.pushsum import PushSumState, Share

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "GossipError",
    "GossipTimeout",
    "Mailbox",
    "Message",
    "MessageKind",
    "PushSumProtocol",
    "PushSumState",
    "Share",
    "TransportClosed",
    "TransportError",
    "WireError",
    "__version__",
    "fingerprint",
]
