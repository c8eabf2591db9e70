"""gossip-sgp: decentralized PyTorch training with Stochastic Gradient Push."""

from __future__ import annotations

from gossip_sgp.config import GossipConfig, PeerSpec
from gossip_sgp.errors import (
    ConfigError,
    GossipError,
    GossipTimeout,
    RejoinRefused,
    TransportClosed,
    TransportError,
    WireError,
)
from gossip_sgp.mailbox import Mailbox
from gossip_sgp.message import Message, MessageKind, fingerprint
from gossip_sgp.node import GossipNode
from gossip_sgp.protocol import PushSumProtocol
from gossip_sgp.pushsum import PushSumState, Share
from gossip_sgp.sgp import SGP

__version__ = "0.1.0"

__all__ = [
    "SGP",
    "ConfigError",
    "GossipConfig",
    "GossipError",
    "GossipNode",
    "GossipTimeout",
    "Mailbox",
    "Message",
    "MessageKind",
    "PeerSpec",
    "PushSumProtocol",
    "PushSumState",
    "RejoinRefused",
    "Share",
    "TransportClosed",
    "TransportError",
    "WireError",
    "__version__",
    "fingerprint",
]
