"""Block sizes for the decode GEMV kernel of kernels/quant_matmul.py on a GPU: times every candidate on decode
shapes (one x row; a 1B Llama's projections) with triton.testing.do_bench and prints the fastest, as GB/s of
weight bytes. The shipped choice in quant_matmul_triton comes from this table.

    python benchmarks/tune_quant_gemv_gpu.py
"""

from __future__ import annotations

import itertools

import torch
import triton
from triton.testing import do_bench

from hf_fastinfer.kernels.quant_format import quantize_weight
from hf_fastinfer.kernels.quant_matmul import _quant_gemv_kernel

SHAPES = [(3072, 2048), (2048, 2048), (16384, 2048), (2048, 8192), (960, 576), (3072, 576), (576, 1536)]


def main() -> None:
    for bits in (8, 4):
        for n, k in SHAPES:
            q = quantize_weight(torch.randn(n, k, device="cuda"), bits, 32, symmetric=bits == 8,
                                scale_dtype=torch.float16)
            x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
            y = torch.empty(1, n, device="cuda", dtype=torch.bfloat16)
            z = q.zeros if q.zeros is not None else q.scales
            nbytes = q.qweight.numel() + q.scales.numel() * 2 * (1 if q.zeros is None else 2)
            results = []
            for bn, bk, warps in itertools.product((4, 8, 16, 32, 64), (64, 128, 256, 512), (1, 2, 4, 8)):
                def launch():
                    _quant_gemv_kernel[(triton.cdiv(n, bn),)](
                        x, q.qweight, q.scales, z, q.scales, y, 1, n, k, 32,
                        x.stride(0), x.stride(1), q.qweight.stride(0), q.qweight.stride(1), q.scales.stride(0),
                        q.scales.stride(1), z.stride(0), z.stride(1), y.stride(0), y.stride(1),
                        BITS=bits, HAS_ZEROS=q.zeros is not None, HAS_BIAS=False, BLOCK_N=bn, BLOCK_K=bk,
                        num_warps=warps)
                try:
                    ms = do_bench(launch, warmup=5, rep=20)
                except Exception:  # out of resources
                    continue
                results.append((ms, bn, bk, warps))
            results.sort()
            best = results[0]
            shipped = next(r for r in results if r[1:] == (16, 256, 4))
            print(f"int{bits} N={n} K={k}: best BLOCK_N={best[1]} BLOCK_K={best[2]} warps={best[3]} "
                  f"{nbytes / best[0] / 1e6:.0f} GB/s; shipped 16/256/4 {nbytes / shipped[0] / 1e6:.0f} GB/s; "
                  f"top 5 {[r[1:] for r in results[:5]]}", flush=True)


if __name__ == "__main__":
    main()
