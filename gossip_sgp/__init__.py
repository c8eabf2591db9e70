"""gossip-sgp: decentralized PyTorch training with Stochastic Gradient Push.

The names below are imported on first use (PEP 562), so that command-line tools which do not
train - ``gossip-sgp launch``, ``top``, ``keys``, ``--help`` - start without importing torch
(about 2 CPU-seconds per process).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

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
from gossip_sgp.settings import LinkSettings

if TYPE_CHECKING:  # the lazy names below, for type checkers
    from gossip_sgp.mailbox import Mailbox
    from gossip_sgp.message import Message, MessageKind, fingerprint
    from gossip_sgp.node import GossipNode
    from gossip_sgp.protocol import PushSumProtocol
    from gossip_sgp.pushsum import PushSumState, Share
    from gossip_sgp.sgp import SGP
    from gossip_sgp.streaming import StreamingSGP

__version__ = "0.1.0"

_LAZY = {
    "Mailbox": "gossip_sgp.mailbox",
    "Message": "gossip_sgp.message",
    "MessageKind": "gossip_sgp.message",
    "fingerprint": "gossip_sgp.message",
    "GossipNode": "gossip_sgp.node",
    "PushSumProtocol": "gossip_sgp.protocol",
    "PushSumState": "gossip_sgp.pushsum",
    "Share": "gossip_sgp.pushsum",
    "SGP": "gossip_sgp.sgp",
    "StreamingSGP": "gossip_sgp.streaming",
}
"""Public names that need torch, by the module that defines them."""


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'gossip_sgp' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "SGP",
    "ConfigError",
    "GossipConfig",
    "GossipError",
    "GossipNode",
    "GossipTimeout",
    "LinkSettings",
    "Mailbox",
    "Message",
    "MessageKind",
    "PeerSpec",
    "PushSumProtocol",
    "PushSumState",
    "RejoinRefused",
    "Share",
    "StreamingSGP",
    "TransportClosed",
    "TransportError",
    "WireError",
    "__version__",
    "fingerprint",
]
