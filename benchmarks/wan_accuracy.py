"""Accuracy and overhead of the WAN emulator (gossip_sgp/wan/__init__.py), in one run (needs root).

    sudo .venv/bin/python benchmarks/wan_accuracy.py
    sudo .venv/bin/python benchmarks/wan_accuracy.py --repeats 9 --json > wan.json

Three measurements between two emulated hosts, with ``gossip_sgp/wan/probe.py``:

* delay: one-byte TCP ping-pongs over one connection (``--pings`` of them) for several
  one-way delays; the round trip should be twice the delay. Also the first exchange on each
  of 5 fresh connections (connect, request, answer), which over a real link takes two round
  trips (the TCP handshake, then the request).
* overhead: ``--size-mib`` MiB transfers with no delay and no rate limit, through the relay
  (``relay=True``; without a delay the emulator would route them directly) against plain
  routing between the same namespaces (``relay=False``), the two taking turns
  (``--repeats`` each), and the ping-pong round trip of both.
* rate: transfers of about two seconds' worth of bytes at several rate limits; the goodput
  (TCP payload per second) over the configured rate. TCP/IP headers take 66 of each
  1514-byte frame, so a perfect shaper gives 0.956.

Prints min / median / max of each figure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from typing import Any

from gossip_sgp.wan import WanEmulator, parse_link
from gossip_sgp.wan.probe import run_client, start_server

DELAYS = ["1ms", "10ms", "50ms", "100ms", "50ms,jitter=10ms"]
RATES = ["10mbit", "100mbit", "1gbit", "100mbit,50ms"]


def summary(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def _row(values: dict[str, float], scale: float = 1.0, fmt: str = "8.2f") -> str:
    return " / ".join(f"{values[k] * scale:{fmt}}" for k in ("min", "median", "max"))


def measure_delay(pings: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for text in DELAYS:
        with WanEmulator(2, text, seed=0) as wan:
            start_server(wan, 1)
            result = run_client(wan, 0, "pingpong", 1, "--count", str(pings), "--connections", "5")
        rtt = 2 * parse_link(text).delay_ms / 1000
        out[text] = {
            "configured_rtt_s": rtt,
            "rtt_s": summary(result["rtts"]),
            "first_exchange_s": summary(result["firsts"]),
            "configured_first_exchange_s": 2 * rtt,
        }
    return out


def measure_overhead(size_mib: int, repeats: int, pings: int) -> dict[str, Any]:
    nbytes = str(size_mib << 20)
    rates: dict[str, list[float]] = {"plain": [], "relay": []}
    rtts: dict[str, list[float]] = {}
    with WanEmulator(2, relay=False) as plain, WanEmulator(2, relay=True) as relay:
        emulators = {"plain": plain, "relay": relay}
        for wan in emulators.values():
            start_server(wan, 1)
        for name, wan in emulators.items():
            run_client(wan, 0, "send", 1, "--bytes", nbytes)  # warm-up
            rtts[name] = run_client(wan, 0, "pingpong", 1, "--count", str(pings))["rtts"]
        for _ in range(repeats):
            for name, wan in emulators.items():
                r = run_client(wan, 0, "send", 1, "--bytes", nbytes)
                rates[name].append(r["bytes"] / r["seconds"])
    return {
        "size_mib": size_mib,
        "throughput_bytes_per_s": {name: summary(v) for name, v in rates.items()},
        "relay_over_plain": summary(
            [r / p for r, p in zip(rates["relay"], rates["plain"], strict=True)]
        ),
        "rtt_s": {name: summary(v) for name, v in rtts.items()},
    }


def measure_rate(repeats: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for text in RATES:
        link = parse_link(text)
        assert link.rate_mbit is not None
        rate = link.rate_mbit * 1e6 / 8
        with WanEmulator(2, link) as wan:
            start_server(wan, 1)
            ratios = []
            for _ in range(repeats):
                r = run_client(wan, 0, "send", 1, "--bytes", str(int(2 * rate)))
                # one round trip of the transfer is latency, not bandwidth
                seconds = r["seconds"] - 2 * link.delay_ms / 1000
                ratios.append(r["bytes"] / seconds / rate)
        out[text] = {"goodput_over_rate": summary(ratios)}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=256, help="overhead transfer size")
    parser.add_argument("--repeats", type=int, default=5, help="transfers per case")
    parser.add_argument("--pings", type=int, default=30, help="ping-pongs per delay")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    result = {
        "delay": measure_delay(args.pings),
        "overhead": measure_overhead(args.size_mib, args.repeats, args.pings),
        "rate": measure_rate(max(1, args.repeats // 2)),
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(
        f"delay, ms: round trip (min / median / max of {args.pings}) and first exchange on a"
        " new connection (of 5)"
    )
    for text, r in result["delay"].items():
        print(
            f"  {text:17s} round trip     configured {r['configured_rtt_s'] * 1e3:6.1f}"
            f"  measured {_row(r['rtt_s'], 1e3)}"
        )
        print(
            f"  {'':17s} first exchange configured {r['configured_first_exchange_s'] * 1e3:6.1f}"
            f"  measured {_row(r['first_exchange_s'], 1e3)}"
        )
    o = result["overhead"]
    print(f"overhead: {o['size_mib']} MiB transfers, no delay, no rate limit; MB/s")
    for name, r in o["throughput_bytes_per_s"].items():
        print(f"  {name:6s} {_row(r, 1e-6, '7.0f')}   round trip ms {_row(o['rtt_s'][name], 1e3)}")
    print(f"  relay / plain, per pair: {_row(o['relay_over_plain'], 1.0, '5.2f')}")
    print("rate: goodput / configured rate (0.956 is the TCP/IP header ceiling)")
    for text, r in result["rate"].items():
        print(f"  {text:14s} {_row(r['goodput_over_rate'], 1.0, '5.3f')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
