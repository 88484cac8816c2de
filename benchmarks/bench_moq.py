"""MoQ weight quantization on the default model: quality (perplexity, greedy answers, SQNR, bytes) and speed
(prefill / decode tokens/s and weight memory against transformers' fp32 and bf16 paths, in one run).

    python benchmarks/bench_moq.py [--repeats 3] [--new-tokens 64] [--write]

Quality variants beside the defaults are applied by quantizing each Linear weight and writing the dequantized
weight back into the float model (same numbers as MoQLinear up to fp32 rounding: tests/test_moq.py); the
defaults themselves are loaded through ``from_pretrained(..., quantization_config=FastInferConfig(...))``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, summarize, write_section  # noqa: E402
from bench_generation import run as _run  # noqa: E402

import hf_fastinfer  # noqa: E402
from hf_fastinfer import FastInferConfig, evaluation, models  # noqa: E402
from hf_fastinfer.kernels.quant_format import dequantize_weight, num_groups, quantize_weight  # noqa: E402
from hf_fastinfer.quant.search import SCALE_DTYPE, quantize_linear_weight, sqnr_db  # noqa: E402

PROMPTS = models.CHAT_PROMPTS


def _integer_zero_rtn(w: torch.Tensor, group_size: int):
    """Conventional asymmetric int4 rounding: range widened to include 0, integer zero point."""
    n, k = w.shape
    ng = num_groups(k, group_size)
    wg = torch.nn.functional.pad(w.float(), (0, ng * group_size - k)).view(n, ng, group_size)
    wmax, wmin = wg.amax(-1).clamp_min(0), wg.amin(-1).clamp_max(0)
    s = ((wmax - wmin) / 15).clamp_min(1e-7).to(SCALE_DTYPE).float()
    z = (-8 - torch.round(wmin / s)).clamp(-8, 7)
    return quantize_weight(w, 4, group_size, False, scale_dtype=SCALE_DTYPE, scales=s, zeros=z)


VARIANTS = {
    # label: function(weight) -> QuantizedWeight
    "int8 g128 symmetric": lambda w: quantize_linear_weight(w, 8, 128, True),
    "int4 g32 asymmetric, integer zero point (conventional)": lambda w: _integer_zero_rtn(w, 32),
    "int4 g32 asymmetric, float zero point + MSE range search": lambda w: quantize_linear_weight(w, 4, 32, False, search=True),
    "int4 g32 symmetric": lambda w: quantize_linear_weight(w, 4, 32, True),
}


def _greedy_prefixes(model, tokenizer, references=None, new_tokens=64):
    out = []
    for i, prompt in enumerate(PROMPTS):
        inputs = models.chat_inputs(tokenizer, prompt)
        with torch.inference_mode():
            tokens = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)[0, inputs["input_ids"].shape[1]:]
        if references is None:
            out.append(tokens)
        else:
            ref = references[i]
            n = min(len(ref), len(tokens))
            same = int((tokens[:n] == ref[:n]).int().cumprod(0).sum())
            out.append(n if same == n and len(ref) == len(tokens) else same)
    return out


def quality(args) -> list[str]:
    path = models.default_model_path(progress=False)
    reference, tokenizer = models.load_default(dtype=torch.float32, progress=False)
    ids = evaluation.reference_tokens(tokenizer, 16384)
    base_ppl = evaluation.perplexity(reference, ids, progress=False)
    ref_tokens = _greedy_prefixes(reference, tokenizer)
    rows = [("fp32 (transformers)", base_ppl, None, None, None, [len(t) for t in ref_tokens])]

    for label, kwargs in (("int8 (default: g32 symmetric)", dict(bits=8)),
                          ("int4 (default: g32 asymmetric, float zero point)", dict(bits=4)),
                          ("auto, target_bits=5.0", dict(bits="auto", target_bits=5.0))):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, quantization_config=FastInferConfig(**kwargs))
        rep = hf_fastinfer.report(model)
        ppl = evaluation.perplexity(model, ids, progress=False)
        sqnrs = []
        floats = dict(reference.named_modules())
        for name, module in model.named_modules():
            if isinstance(module, hf_fastinfer.MoQLinear):
                sqnrs.append(sqnr_db(floats[name].weight, module.quantized()))
        rows.append((label, ppl, rep.ratio, rep.average_bits, statistics.median(sqnrs),
                     _greedy_prefixes(model, tokenizer, ref_tokens)))
        print(rows[-1][:5], flush=True)
        del model

    originals = {n: m.weight.detach().clone() for n, m in reference.named_modules() if isinstance(m, torch.nn.Linear)}
    for label, quantize in VARIANTS.items():
        sqnrs, q_bytes, f_bytes = [], 0, 0
        for name, module in reference.named_modules():
            if isinstance(module, torch.nn.Linear):
                qw = quantize(originals[name])
                sqnrs.append(sqnr_db(originals[name], qw))
                q_bytes += qw.nbytes()
                f_bytes += originals[name].numel() * 4
                module.weight = torch.nn.Parameter(dequantize_weight(qw), requires_grad=False)
        ppl = evaluation.perplexity(reference, ids, progress=False)
        bits = 8 if label.startswith("int8") else 4
        rows.append((label, ppl, q_bytes / f_bytes, bits, statistics.median(sqnrs),
                     _greedy_prefixes(reference, tokenizer, ref_tokens)))
        print(rows[-1][:5], flush=True)

    lines = [
        "Perplexity on the first 16,384 tokens of `pydoc_data.topics` (windows of 512, fp32 activations); "
        "bytes = all Linear weights as stored (int8/int4, fp16 scales and zero points) over fp32, lm_head included "
        "(untied from the float embedding); SQNR = median over layers of 10 log10(|W|^2 / |W - deq(Q)|^2); "
        "greedy = for each of 10 chat prompts, the number of leading tokens (of 64) identical to fp32's answer "
        "(fp32's own answer length where it stops earlier).",
        "",
        "| weights | perplexity | vs fp32 | bytes vs fp32 | average bits | median SQNR dB | greedy prefix per prompt | full 64-token matches |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    full = [len(t) for t in ref_tokens]
    for label, ppl, ratio, bits, sqnr, prefixes in rows:
        matches = sum(p == f for p, f in zip(prefixes, full))
        lines.append(
            f"| {label} | {ppl:.4f} | {(ppl / base_ppl - 1) * 100:+.2f}% | "
            f"{'-' if ratio is None else f'{ratio:.3f}x'} | {'-' if bits is None else f'{bits:.2f}'} | "
            f"{'-' if sqnr is None else f'{sqnr:.1f}'} | {' '.join(map(str, prefixes))} | {matches}/10 |"
        )
    return lines


def speed(args) -> list[str]:
    path = models.default_model_path(progress=False)
    tokenizer = models.load_default(progress=False)[1]
    paths = []
    for label, dtype, config in (("transformers fp32", torch.float32, None),
                                 ("transformers bf16", torch.bfloat16, None),
                                 ("MoQ int8 (fp32 activations)", torch.float32, FastInferConfig(bits=8)),
                                 ("MoQ int4 (fp32 activations)", torch.float32, FastInferConfig(bits=4)),
                                 ("MoQ int4 (bf16 activations)", torch.bfloat16, FastInferConfig(bits=4))):
        kwargs = {"quantization_config": config} if config is not None else {}
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa", **kwargs).eval()
        tensors = list(model.parameters()) + list(model.buffers())
        mem = sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors}.values())
        paths.append((label, model, mem))
    chat = models.chat_inputs(tokenizer, "Write a short story about a robot who learns to paint.")
    long_ids = evaluation.reference_tokens(tokenizer, 512)
    prompts = {"chat": chat, "512": {"input_ids": long_ids, "attention_mask": torch.ones_like(long_ids)}}
    rows = []
    for prompt_name, inputs in prompts.items():
        for _, model, _ in paths:
            _run(model, inputs, 4, None)
        results = {label: ([], []) for label, _, _ in paths}
        for _ in range(args.repeats):
            for label, model, _ in paths:
                prefill, decode = _run(model, inputs, args.new_tokens, None)
                results[label][0].append(prefill)
                results[label][1].append(decode)
        base_p, base_d = summarize(results[paths[0][0]][0])[0], summarize(results[paths[0][0]][1])[0]
        bf16_d = summarize(results[paths[1][0]][1])[0]
        for label, _, mem in paths:
            p, d = summarize(results[label][0]), summarize(results[label][1])
            rows.append((prompt_name, inputs["input_ids"].shape[1], label, mem, p, d, p[0] / base_p, d[0] / base_d, d[0] / bf16_d))
            print(rows[-1], flush=True)
    lines = [
        f"Batch 1, greedy, {args.new_tokens} new tokens, {args.repeats} alternating repeats, transformers' SDPA "
        "attention and DynamicCache on every row (only the weights differ); tokens/s as median (min-max); "
        "memory = parameters and buffers of the loaded model (the float embedding included).",
        "",
        "| prompt tokens | weights | model memory | prefill tok/s | decode tok/s | prefill vs fp32 | decode vs fp32 | decode vs bf16 |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for _, n, label, mem, p, d, pr, dr, dbf in rows:
        lines.append(f"| {n} | {label} | {mem / 2**20:.0f} MiB | {p[0]:.0f} ({p[1]:.0f}-{p[2]:.0f}) | "
                     f"{d[0]:.1f} ({d[1]:.1f}-{d[2]:.1f}) | {pr:.2f}x | {dr:.2f}x | {dbf:.2f}x |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--skip-quality", action="store_true", help="only the speed table")
    parser.add_argument("--skip-speed", action="store_true", help="only the quality table")
    parser.add_argument("--write", action="store_true", help="write the tables into BENCHMARKS.md")
    args = parser.parse_args()
    header = [f"Command: `python benchmarks/bench_moq.py --repeats {args.repeats} --new-tokens {args.new_tokens}"
              f"{' --skip-quality' if args.skip_quality else ''}{' --skip-speed' if args.skip_speed else ''} --write`",
              "", f"Machine: {machine()}.", ""]
    if not args.skip_speed:
        speed_lines = speed(args)
        print("\n".join(speed_lines), flush=True)
        if args.write:
            write_section("bench_moq_speed", "\n".join(["### MoQ: speed and memory", ""] + header + speed_lines))
    if not args.skip_quality:
        quality_lines = quality(args)
        print("\n".join(quality_lines), flush=True)
        if args.write:
            write_section("bench_moq_quality", "\n".join(["### MoQ: quality", ""] + header + quality_lines))

if __name__ == "__main__":
    main()
