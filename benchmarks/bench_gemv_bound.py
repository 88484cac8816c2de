"""Is a quantized decode GEMV held back by the core or by the memory? One process, interleaved rounds.

For int8 and int4 weights (group 32, fp16 scales, bf16 activations, one row: a decode token) it times the same
GEMV two ways:

  * cache:  one weight called over and over, small enough to stay in the last-level cache: the rate the core's
    instructions allow;
  * memory: twelve different weights of that size in turn, too many for the cache: the rate a decode step sees.

A cache rate close to the memory rate means the kernel, not the memory, sets the pace on this host; the
``sum()`` line gives the host's read bandwidth in the same run.

    python benchmarks/bench_gemv_bound.py
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, read_bandwidth_gbs  # noqa: E402

from hf_fastinfer.kernels.quant_matmul import quant_matmul  # noqa: E402
from hf_fastinfer.quant.search import quantize_linear_weight  # noqa: E402

K = 576  # the default model's hidden size
WEIGHTS = 12  # distinct weights of the memory case (12 x 10-12 MB, beyond a 32 MB last-level cache)


def weight_bytes(qw) -> int:
    return sum(t.numel() * t.element_size() for t in (qw.qweight, qw.scales, qw.zeros) if t is not None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    median, low, high = read_bandwidth_gbs()
    print(f"Machine: {machine()}. Read bandwidth (fp32 sum of 1 GiB, median of 7): {median:.1f} GB/s "
          f"({low:.1f}-{high:.1f}).\n")
    print("| weight | MB each | cache GB/s | memory GB/s | cache / memory |")
    print("| --- | ---: | ---: | ---: | ---: |")
    x = torch.randn(1, K).bfloat16()
    for bits, rows in ((8, 16384), (4, 32768)):  # about 10-12 MB each
        weights = [quantize_linear_weight(torch.randn(rows, K), bits, 32, symmetric=bits == 8) for _ in range(WEIGHTS)]

        def call(qw, bits=bits):
            return quant_matmul(x, qw.qweight, qw.scales, qw.zeros, bits=bits, group_size=32, in_features=K)

        for qw in weights:
            call(qw)
        times = {"cache": [], "memory": []}
        for _ in range(args.rounds):
            for case, sequence in (("cache", [weights[0]] * WEIGHTS), ("memory", weights)):
                start = time.perf_counter()
                for qw in sequence:
                    call(qw)
                times[case].append(time.perf_counter() - start)
        size = weight_bytes(weights[0])
        rate = {case: size * WEIGHTS / statistics.median(t) / 1e9 for case, t in times.items()}
        print(f"| int{bits}, {rows} x {K} | {size / 1e6:.1f} | {rate['cache']:.1f} | {rate['memory']:.1f} | "
              f"{rate['cache'] / rate['memory']:.2f}x |")


if __name__ == "__main__":
    main()
