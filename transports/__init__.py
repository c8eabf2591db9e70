"""Transports: how push-sum messages travel between workers.

One small async interface (:class:`Transport`) and one module per backend: ZeroMQ
(:class:`ZmqTransport`, for Ethernet, WAN and cloud), torch.distributed
(``transports.torchdist.TorchDistTransport``, gloo/NCCL inside a cluster), in-process
(:class:`InProcTransport`, for tests and the simulator), and a fault-injecting wrapper
(:class:`FaultyTransport`).
"""

from __future__ import annotations

from transports.base import Transport, TransportStats, iter_messages
from transports.faults import FaultSpec, FaultyTransport
from transports.inproc import InProcNetwork, InProcTransport

__all__ = [
    "FaultSpec",
    "FaultyTransport",
    "InProcNetwork",
    "InProcTransport",
    "Transport",
    "TransportStats",
    "iter_messages",
]
