"""Benchmark scripts of gossip-sgp, run from a checkout (``python -m benchmarks.NAME``).

Not installed: a wheel holds gossip_sgp, transports and topologies only.
"""
