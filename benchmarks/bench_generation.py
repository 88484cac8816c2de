"""Generation speed: transformers' own path and hf_fastinfer's, side by side in one process.

Paths (the default model, greedy, batch 1, ``--prompt`` prompt tokens, ``--new-tokens`` new tokens):

  transformers fp32 / bf16   : attn "sdpa", DynamicCache, no hf_fastinfer (transformers' defaults)
  hf_fastinfer fp32 / bf16   : FastInferConfig(bits=None) (kernel injection), attn "fastinfer", cache "fastinfer"
  hf_fastinfer int8 / int4   : FastInferConfig(bits=8 / 4), bf16 activations, same attention and cache

The paths run one after the other in each of ``--repeats`` rounds, so drifting load hits all alike; the table
gives medians and ranges. Decode tokens/s is timed from the first to the last new token, prefill from the call
to the first new token. The read bandwidth (fp32 sum of 1 GiB) is measured before every round; the roofline
of a path is that bandwidth (median over the rounds) divided by the bytes a decode step reads: its model's tensors
of two or more dimensions (each storage once) less an input embedding table that the output projection does not
share (a step reads one row of it; hf_fastinfer's int8 / int4 keep the embedding in float and quantize a copy
for the output projection). Generation runs to exactly ``--new-tokens`` (no end-of-sequence token), without
``min_new_tokens``, whose logits processors would cost every path ~0.3 ms a token.

    python benchmarks/bench_generation.py --repeats 5 --write
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, read_bandwidth_gbs, summarize, write_section  # noqa: E402

import hf_fastinfer  # noqa: E402
from hf_fastinfer import evaluation, models  # noqa: E402
from hf_fastinfer.bench import decode_read_bytes, timed_generate  # noqa: E402


def run(model, inputs, new_tokens, cache):
    kwargs = {"cache_implementation": cache} if cache else {}
    prefill, decode, _, _ = timed_generate(model, inputs, new_tokens, kwargs)
    return prefill, decode


PATHS = {
    # label: (dtype, quantization_config or None, attention, cache, the transformers path it is compared with)
    "transformers fp32": (torch.float32, None, "sdpa", None, "transformers fp32"),
    "hf_fastinfer fp32": (torch.float32, dict(bits=None), "fastinfer", "fastinfer", "transformers fp32"),
    "transformers bf16": (torch.bfloat16, None, "sdpa", None, "transformers bf16"),
    "hf_fastinfer bf16": (torch.bfloat16, dict(bits=None), "fastinfer", "fastinfer", "transformers bf16"),
    "hf_fastinfer int8": (torch.bfloat16, dict(bits=8), "fastinfer", "fastinfer", "transformers bf16"),
    "hf_fastinfer int4": (torch.bfloat16, dict(bits=4), "fastinfer", "fastinfer", "transformers bf16"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt", type=int, default=256, help="prompt tokens (from the built-in text)")
    parser.add_argument("--paths", default=",".join(PATHS), help="comma-separated labels of PATHS")
    parser.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md")
    args = parser.parse_args()

    folder = models.default_model_path(progress=False)
    _, tokenizer = models.load_default(progress=False)
    ids = evaluation.reference_tokens(tokenizer, args.prompt)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    labels = args.paths.split(",")
    loaded = {}
    for label in labels:
        dtype, config, attention, cache, _ = PATHS[label]
        kwargs = {"quantization_config": hf_fastinfer.FastInferConfig(**config)} if config else {}
        loaded[label] = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation=attention,
                                                             **kwargs).eval()
        run(loaded[label], inputs, 8, cache)  # warm-up
    results = {label: ([], []) for label in labels}
    bandwidths = []
    for _ in range(args.repeats):
        bandwidths.append(read_bandwidth_gbs()[0])
        for label in labels:
            prefill, decode = run(loaded[label], inputs, args.new_tokens, PATHS[label][3])
            results[label][0].append(prefill)
            results[label][1].append(decode)
            print(label, round(prefill), round(decode, 1), flush=True)
    bandwidth = summarize(bandwidths)
    rows = []
    for label in labels:
        base = PATHS[label][4]
        prefill, decode = summarize(results[label][0]), summarize(results[label][1])
        roofline = bandwidth[0] * 1e9 / decode_read_bytes(loaded[label])
        ratio = (lambda i: summarize(results[label][i])[0] / summarize(results[base][i])[0]) if base in results else None
        rows.append((label, prefill, decode, roofline, ratio(0) if ratio else None, ratio(1) if ratio else None, base))

    lines = [
        f"Command: `python benchmarks/bench_generation.py --repeats {args.repeats} --new-tokens {args.new_tokens} "
        f"--prompt {args.prompt}{'' if args.paths == ','.join(PATHS) else ' --paths ' + args.paths} --write`",
        "",
        f"Machine: {machine()}. Read bandwidth (fp32 sum of 1 GiB, median of 7, before each round): "
        f"{bandwidth[0]:.1f} GB/s (rounds {bandwidth[1]:.1f}-{bandwidth[2]:.1f}).",
        "",
        f"SmolLM2-135M-Instruct, batch 1, greedy, {args.prompt}-token prompt, {args.new_tokens} new tokens, "
        f"{args.repeats} rounds; tokens/s as median (min-max). Ratios against the transformers path of the same "
        "activation dtype in the same run; roofline = bandwidth / bytes a decode step reads (the model's tensors "
        "of two or more dimensions, less an input embedding table the output projection does not share).",
        "",
        "| path | prefill tok/s | decode tok/s | roofline tok/s | decode / roofline | prefill vs transformers | "
        "decode vs transformers |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, p, d, roofline, pr, dr, base in rows:
        versus = "" if label == base else f" ({base.split()[1]})"
        lines.append(f"| {label} | {p[0]:.0f} ({p[1]:.0f}-{p[2]:.0f}) | {d[0]:.1f} ({d[1]:.1f}-{d[2]:.1f}) | "
                     f"{roofline:.0f} | {d[0] / roofline:.0%} | "
                     f"{'' if pr is None else f'{pr:.2f}x{versus}'} | {'' if dr is None else f'{dr:.2f}x{versus}'} |")
    table = "\n".join(lines)
    print(table)
    if args.write:
        write_section("bench_generation", "## Generation: transformers and hf_fastinfer, batch 1 on CPU\n\n" + table)


if __name__ == "__main__":
    main()
