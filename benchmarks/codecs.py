"""Encode + decode speed of each compression codec on one large float32 tensor.

For each codec, times ``Codec.roundtrip`` (encode, then decode what was encoded: what a
sender does for error feedback) and the receiver's validating ``Codec.decode``, on a tensor
of ``--numel`` floats (default 10M), and prints the median over ``--repeat`` runs, the
throughput in GB/s of raw float32 data (encode + decode), and the compression ratio.

    python benchmarks/codecs.py --numel 10000000 --repeat 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from gossip_sgp.compression import parse_codec

CODECS = ["fp16", "bf16", "int8", "int8:1024", "topk:0.01", "topk:0.001"]


def time_codec(spec: str, x: torch.Tensor, repeat: int) -> dict[str, float | str]:
    codec = parse_codec(spec)
    layout = [(x.numel(), x.dtype, x.device)]
    meta = {"raw_bytes": x.numel() * x.element_size()}
    encode_s, decode_s = [], []
    parts: list[torch.Tensor] = []
    for _ in range(repeat + 1):  # the first run warms up allocator and kernels
        t0 = time.perf_counter()
        parts = codec.encode(x)
        t1 = time.perf_counter()
        (y,) = codec.decode(parts, layout, meta)
        t2 = time.perf_counter()
        encode_s.append(t1 - t0)
        decode_s.append(t2 - t1)
    enc = statistics.median(encode_s[1:])
    dec = statistics.median(decode_s[1:])
    wire = sum(p.numel() * p.element_size() for p in parts)
    raw = x.numel() * x.element_size()
    return {
        "codec": spec,
        "encode_s": enc,
        "decode_s": dec,
        "total_s": enc + dec,
        "gb_per_s": raw / (enc + dec) / 1e9,
        "ratio": raw / wire,
        "max_abs_error": float((y - x).abs().max()),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--numel", type=int, default=10_000_000, help="floats per tensor")
    p.add_argument("--repeat", type=int, default=5, help="timed runs per codec (median)")
    p.add_argument("--codecs", nargs="+", default=CODECS, help="codec specs to time")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument(
        "--reference-s",
        type=float,
        default=0.23,
        help="a reference time for 10M floats to compare the int8 codecs with",
    )
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    x = torch.randn(args.numel, generator=torch.Generator().manual_seed(0))
    if not args.json:
        threads = torch.get_num_threads()
        print(f"{args.numel} float32, {threads} torch threads, median of {args.repeat}")
        print(
            f"{'codec':<12} {'encode s':>9} {'decode s':>9} {'GB/s':>7} {'ratio':>7} "
            f"{'max abs err':>12} {'vs ref':>7}"
        )
    for spec in args.codecs:
        row = time_codec(spec, x, args.repeat)
        scale = args.numel / 10_000_000
        row["speedup_vs_reference"] = args.reference_s * scale / float(row["total_s"])
        if args.json:
            print(json.dumps(row))
            continue
        print(
            f"{spec:<12} {row['encode_s']:9.4f} {row['decode_s']:9.4f} {row['gb_per_s']:7.2f} "
            f"{row['ratio']:7.2f} {row['max_abs_error']:12.3e} "
            f"{row['speedup_vs_reference']:6.1f}x"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
