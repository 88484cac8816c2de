"""Per-op CPU timings of the kernel library against the unfused transformers / PyTorch equivalent, at the
default model's shapes (SmolLM2-135M: hidden 576, intermediate 1536, 9 query / 3 KV heads of 64, vocab
49152), batch 1, in one run: median of repeats, with the machine's read bandwidth measured in the same run.
Linear layers are timed cycling through copies of their weights larger than the last-level cache together.

    python benchmarks/bench_ops.py --write

GPU mode (``--gpu``, when a CUDA device is present): the Triton kernels timed with
``triton.testing.do_bench``, achieved bandwidth against a measured device-to-device copy.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, read_bandwidth_gbs, write_section  # noqa: E402

from hf_fastinfer.kernels.decode_attention import decode_attention  # noqa: E402
from hf_fastinfer.kernels.gated_act import gated_act  # noqa: E402
from hf_fastinfer.kernels.quant_format import dequantize_weight, quantize_weight  # noqa: E402
from hf_fastinfer.kernels.quant_matmul import quant_matmul  # noqa: E402
from hf_fastinfer.kernels.kv_quant import kv_append, quantize_kv  # noqa: E402
from hf_fastinfer.kernels.prefill_attention import prefill_attention, prefill_attention_available  # noqa: E402
from hf_fastinfer.kernels.rms_norm import rms_norm  # noqa: E402
from hf_fastinfer.kernels.rotary import rotary, rotary_tables  # noqa: E402
from hf_fastinfer.quant.search import quantize_linear_weight  # noqa: E402

LINEAR_SHAPES = [("q_proj / o_proj", 576, 576), ("k_proj / v_proj", 192, 576), ("gate / up", 1536, 576),
                 ("down_proj", 576, 1536), ("lm_head", 49152, 576)]


def _time(fn, repeats: int, inner: int = 1) -> tuple[float, float, float]:
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter() - start) / inner)
    return statistics.median(samples), min(samples), max(samples)


def _cache_bytes() -> int:
    """The last-level cache's size (64 MiB where the system does not say)."""
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"), reverse=True):
        try:
            size = (index / "size").read_text().strip()
        except OSError:
            continue
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        return int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size)
    return 64 << 20


def _rotating(make_call, nbytes: int, cache_bytes: int):
    """(call, copies): calls cycling over enough copies of the weights (make_call(i) builds the i-th) to
    exceed three times the last-level cache, so each call reads its weight from memory as in a decode step
    (a model's weights do not fit in cache). Without this, a weight that fits in L3 is timed from L3."""
    copies = max(1, -(-3 * cache_bytes // nbytes))
    calls = [make_call(i) for i in range(copies)]
    cycle = itertools.cycle(calls)
    return (lambda: next(cycle)()), copies


def cpu_rows(repeats: int, dtype: torch.dtype, bandwidth: float) -> list[str]:
    rows = []
    g = torch.Generator().manual_seed(0)
    cache = _cache_bytes()
    for name, n, k in LINEAR_SHAPES:
        w = torch.randn(n, k, generator=g) * 0.05
        x = torch.randn(1, k, generator=g).to(dtype)
        dense = w.to(dtype)
        dense_bytes = dense.numel() * dense.element_size()
        call, copies = _rotating(lambda i: (lambda d=dense.clone(): torch.nn.functional.linear(x, d)), dense_bytes, cache)
        t_dense = _time(call, repeats, copies)
        del call
        rows.append(f"| linear {dtype_name(dtype)} (transformers' nn.Linear) | {name} {n}x{k} | "
                    f"{t_dense[0] * 1e6:.0f} ({t_dense[1] * 1e6:.0f}-{t_dense[2] * 1e6:.0f}) | "
                    f"{dense_bytes / t_dense[0] / 1e9:.1f} | {dense_bytes / t_dense[0] / 1e9 / bandwidth:.0%} | 1.00x |")
        for bits, group in ((8, 128), (8, 32), (4, 32)):
            qw = quantize_linear_weight(w, bits, group, symmetric=bits == 8)  # as MoQ stores it (fp16 scales)

            def fast_call(i, qw=qw, bits=bits, group=group):
                qweight, scales = qw.qweight.clone(), qw.scales.clone()
                zeros = None if qw.zeros is None else qw.zeros.clone()
                return lambda: quant_matmul(x, qweight, scales, zeros, bits=bits, group_size=group, in_features=k)

            call, copies = _rotating(fast_call, qw.nbytes(), cache)
            t_fast = _time(call, repeats, copies)
            del call
            # the unfused equivalent: dequantize the weight, then nn.Linear (compute-bound: no copies needed)
            t_unfused = _time(lambda: torch.nn.functional.linear(x, dequantize_weight(qw, dtype)), repeats,
                              3 if n * k > 5_000_000 else 20)
            gbs = qw.nbytes() / t_fast[0] / 1e9
            rows.append(f"| W{bits}A16 g{group} CPU path | {name} {n}x{k} | {t_fast[0] * 1e6:.0f} "
                        f"({t_fast[1] * 1e6:.0f}-{t_fast[2] * 1e6:.0f}) | {gbs:.1f} | {gbs / bandwidth:.0%} | "
                        f"{t_unfused[0] / t_fast[0]:.2f}x vs dequantize + nn.Linear; {t_dense[0] / t_fast[0]:.2f}x vs dense |")
    # RMSNorm + residual add, one token: against transformers' LlamaRMSNorm after the model's own add
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(576, eps=1e-5).to(dtype)
    x = torch.randn(1, 1, 576, generator=g).to(dtype)
    r = torch.randn(1, 1, 576, generator=g).to(dtype)
    with torch.no_grad():
        t_unfused = _time(lambda: norm(x + r), repeats, 200)
        t_fast = _time(lambda: rms_norm(x, norm.weight, r, 1e-5), repeats, 200)
    rows.append(f"| RMSNorm + residual CPU path | 1 token x 576 | {t_fast[0] * 1e6:.1f} "
                f"({t_fast[1] * 1e6:.1f}-{t_fast[2] * 1e6:.1f}) | - | - | "
                f"{t_unfused[0] / t_fast[0]:.2f}x vs add + transformers' LlamaRMSNorm |")
    # gated activation, one token: against transformers' act_fn(gate) * up on separate projections' outputs
    gate_up = torch.randn(1, 1, 2 * 1536, generator=g).to(dtype)
    gate, up = gate_up[..., :1536].contiguous(), gate_up[..., 1536:].contiguous()
    act = torch.nn.functional.silu
    t_unfused = _time(lambda: act(gate) * up, repeats, 200)
    t_fast = _time(lambda: gated_act(gate_up, "silu"), repeats, 200)
    rows.append(f"| SiLU(gate) * up CPU path | 1 token x 1536 | {t_fast[0] * 1e6:.1f} "
                f"({t_fast[1] * 1e6:.1f}-{t_fast[2] * 1e6:.1f}) | - | - | {t_unfused[0] / t_fast[0]:.2f}x vs act(gate) * up |")
    # rotary on q and k, one token: against transformers' apply_rotary_pos_emb on the same tensors
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    cos_t, sin_t = rotary_tables(1.0 / (100000 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64)), 8192)
    q = torch.randn(1, 9, 1, 64, generator=g).to(dtype)
    k = torch.randn(1, 3, 1, 64, generator=g).to(dtype)
    positions = torch.tensor([[300]])
    cos_full = torch.cat([cos_t[positions], cos_t[positions]], -1).to(dtype)  # what the model hands each layer
    sin_full = torch.cat([sin_t[positions], sin_t[positions]], -1).to(dtype)
    t_unfused = _time(lambda: apply_rotary_pos_emb(q, k, cos_full, sin_full), repeats, 200)
    t_fast = _time(lambda: rotary(q, k, cos_t, sin_t, positions, inplace=True), repeats, 200)
    rows.append(f"| rotary q + k CPU path (in place) | 1 token, 9 + 3 heads x 64 | {t_fast[0] * 1e6:.1f} "
                f"({t_fast[1] * 1e6:.1f}-{t_fast[2] * 1e6:.1f}) | - | - | "
                f"{t_unfused[0] / t_fast[0]:.2f}x vs transformers' apply_rotary_pos_emb |")
    # int8 KV quantize-and-append, one token: against quantizing with torch ops and copying into the slots
    kc, vc = torch.zeros(1, 3, 512, 64, dtype=torch.int8), torch.zeros(1, 3, 512, 64, dtype=torch.int8)
    ks, vs = torch.zeros(1, 3, 512, dtype=torch.float16), torch.zeros(1, 3, 512, dtype=torch.float16)
    kn = torch.randn(1, 3, 1, 64, generator=g).to(dtype)
    vn = torch.randn(1, 3, 1, 64, generator=g).to(dtype)
    slots = torch.tensor([[200]])

    def unfused_append():
        for x, cache, scale in ((kn, kc, ks), (vn, vc, vs)):
            q8, s16 = quantize_kv(x)
            cache[:, :, 200:201].copy_(q8)
            scale[:, :, 200:201].copy_(s16)

    t_unfused = _time(unfused_append, repeats, 200)
    t_fast = _time(lambda: kv_append(kn, vn, kc, vc, ks, vs, slots), repeats, 200)
    rows.append(f"| int8 KV quantize + append CPU path | 1 token, 3 KV heads x 64 | {t_fast[0] * 1e6:.1f} "
                f"({t_fast[1] * 1e6:.1f}-{t_fast[2] * 1e6:.1f}) | - | - | "
                f"{t_unfused[0] / t_fast[0]:.2f}x vs quantize with torch ops + copy |")
    # decode attention: 1 query, 9/3 heads of 64, against transformers' SDPA integration on the same cache
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal, module.training = 3, True, False
    for length in (256, 2048):
        q = torch.randn(1, 9, 1, 64, generator=g).to(dtype)
        kc = torch.randn(1, 3, length, 64, generator=g).to(dtype)
        vc = torch.randn(1, 3, length, 64, generator=g).to(dtype)
        t_fast = _time(lambda: decode_attention(q, kc, vc), repeats, 50)
        t_sdpa = _time(lambda: sdpa_attention_forward(module, q, kc, vc, None), repeats, 50)
        kv_bytes = 2 * kc.numel() * kc.element_size()
        gbs = kv_bytes / t_fast[0] / 1e9
        rows.append(f"| decode attention CPU path | 1 query, KV {length} | {t_fast[0] * 1e6:.0f} "
                    f"({t_fast[1] * 1e6:.0f}-{t_fast[2] * 1e6:.0f}) | {gbs:.1f} | {gbs / bandwidth:.0%} | "
                    f"{t_sdpa[0] / t_fast[0]:.2f}x vs transformers' SDPA |")
    # prompt attention: a causal prompt, 9/3 heads of 64, against transformers' SDPA integration (flash
    # attention for CPU); GFLOP/s counts the causal half of QK^T and PV (4 L^2 D / 2 a query head)
    if prefill_attention_available():
        for length in (256, 1024):
            q = torch.randn(1, 9, length, 64, generator=g).to(dtype)
            kc = torch.randn(1, 3, length, 64, generator=g).to(dtype)
            vc = torch.randn(1, 3, length, 64, generator=g).to(dtype)
            inner = 20 if length <= 256 else 3
            t_fast = _time(lambda: prefill_attention(q, kc, vc, None, 0.125, True), repeats, inner)
            t_sdpa = _time(lambda: sdpa_attention_forward(module, q, kc, vc, None, scaling=0.125), repeats, inner)
            gflops = 9 * 2 * length * length * 64 / t_fast[0] / 1e9
            rows.append(f"| prompt attention CPU path (causal) | {length} tokens, 9 / 3 heads | {t_fast[0] * 1e6:.0f} "
                        f"({t_fast[1] * 1e6:.0f}-{t_fast[2] * 1e6:.0f}) | - | - | "
                        f"{t_sdpa[0] / t_fast[0]:.2f}x vs transformers' SDPA ({gflops:.0f} GFLOP/s) |")
    return rows


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def gpu_report(repeats: int) -> str:  # pragma: no cover - needs a GPU
    import triton.testing

    n_bytes = 1 << 30
    src = torch.empty(n_bytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy_ms = triton.testing.do_bench(lambda: dst.copy_(src))
    copy_gbs = 2 * n_bytes / copy_ms / 1e6
    lines = [f"Device: {machine()}. Device-to-device copy: {copy_gbs:.0f} GB/s (read + write).", "",
             "| op | shape | time (us) | GB/s | of copy bandwidth |", "| --- | --- | ---: | ---: | ---: |"]
    for name, n, k in LINEAR_SHAPES + [("7B gate/up", 11008, 4096), ("7B down", 4096, 11008)]:
        w = torch.randn(n, k, device="cuda") * 0.05
        for bits, group in ((8, 128), (4, 32)):
            qw = quantize_weight(w, bits, group, symmetric=bits == 8)
            for m in (1, 16):
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                ms = triton.testing.do_bench(lambda: quant_matmul(x, qw.qweight, qw.scales, qw.zeros, bits=bits,
                                                                  group_size=group, in_features=k))
                gbs = qw.nbytes() / ms / 1e6
                lines.append(f"| W{bits}A16 M={m} | {name} {n}x{k} | {ms * 1e3:.1f} | {gbs:.0f} | {gbs / copy_gbs * 2:.0%} |")
    for heads, kv_heads, tokens in ((9, 3, 1), (32, 8, 1), (32, 8, 512)):
        d = 128 if heads == 32 else 64
        cos_t, sin_t = rotary_tables(1.0 / (10000 ** (torch.arange(0, d, 2, device="cuda", dtype=torch.float64) / d)), 4096)
        q = torch.randn(1, heads, tokens, d, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, kv_heads, tokens, d, device="cuda", dtype=torch.bfloat16)
        positions = torch.arange(tokens, device="cuda")[None]
        ms = triton.testing.do_bench(lambda: rotary(q, k, cos_t, sin_t, positions, inplace=True))
        gbs = 2 * (q.numel() + k.numel()) * 2 / ms / 1e6
        lines.append(f"| rotary q + k | {heads}/{kv_heads} heads, {tokens} tokens | {ms * 1e3:.1f} | {gbs:.0f} | "
                     f"{gbs / copy_gbs * 2:.0%} |")
        kc = torch.zeros(1, kv_heads, 4096, d, device="cuda", dtype=torch.int8)
        ks = torch.zeros(1, kv_heads, 4096, device="cuda", dtype=torch.float16)
        slots = torch.arange(tokens, device="cuda")[None]
        vc, vs = kc.clone(), ks.clone()
        ms = triton.testing.do_bench(lambda: kv_append(k, k, kc, vc, ks, vs, slots))
        lines.append(f"| int8 KV quantize + append | {kv_heads} heads, {tokens} tokens | {ms * 1e3:.1f} | - | - |")
    for heads, kv_heads, length in ((9, 3, 4096), (32, 8, 8192)):
        q = torch.randn(1, heads, 1, 128 if heads == 32 else 64, device="cuda", dtype=torch.bfloat16)
        kc = torch.randn(1, kv_heads, length, q.shape[-1], device="cuda", dtype=torch.bfloat16)
        ms = triton.testing.do_bench(lambda: decode_attention(q, kc, kc))
        gbs = 2 * kc.numel() * 2 / ms / 1e6
        lines.append(f"| decode attention | {heads}/{kv_heads} heads, KV {length} | {ms * 1e3:.1f} | {gbs:.0f} | "
                     f"{gbs / copy_gbs * 2:.0%} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--write", action="store_true", help="write the table(s) into BENCHMARKS.md")
    parser.add_argument("--gpu", action="store_true", help="time the Triton kernels on the GPU")
    args = parser.parse_args()
    if args.gpu:
        if not torch.cuda.is_available():
            sys.exit("--gpu needs a CUDA device")
        text = gpu_report(args.repeats)
        print(text)
        if args.write:
            write_section("bench_ops_gpu", "## Kernel library on GPU\n\nCommand: `python benchmarks/bench_ops.py --gpu --write`\n\n" + text)
        return
    bandwidth = statistics.median(read_bandwidth_gbs()[0] for _ in range(3))
    lines = [
        f"Command: `python benchmarks/bench_ops.py --repeats {args.repeats} --write`",
        "",
        f"Machine: {machine()}. Read bandwidth (fp32 sum of 1 GiB): {bandwidth:.1f} GB/s. Batch 1; "
        "time in microseconds as median (min-max); GB/s = bytes of weights (or K/V) read / time. The linear "
        "layers cycle through copies of their weights totalling 3x the last-level cache, so every call reads "
        "its weight from memory, as a decode step does.",
        "",
        "| op | shape | time (us) | GB/s | of read bandwidth | speed-up |",
        "| --- | --- | ---: | ---: | ---: | --- |",
    ]
    for dtype in (torch.float32, torch.bfloat16):
        lines += cpu_rows(args.repeats, dtype, bandwidth)
    text = "\n".join(lines)
    print(text)
    if args.write:
        write_section("bench_ops", "## Kernel library, CPU paths\n\n" + text)


if __name__ == "__main__":
    main()
