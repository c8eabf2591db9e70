"""Benchmark scripts and the WAN emulator (``benchmarks.wan``) of gossip-sgp."""
