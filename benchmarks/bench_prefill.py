"""Prefill speed: transformers' own path and hf_fastinfer's, interleaved in one process.

A prompt's prefill is short (a few hundred ms on the default model), so on a noisy host the generation
benchmark's five rounds leave wide ranges; this script times only the prefill (``generate`` with one new
token, which is the prompt's forward plus one sampling step), many rounds, each round every path once in turn:

  transformers fp32 / bf16   : attn "sdpa", DynamicCache, no hf_fastinfer
  hf_fastinfer fp32 / bf16   : FastInferConfig(bits=None) (kernel injection), attn and cache "fastinfer"
  hf_fastinfer int8 / int4   : FastInferConfig(bits=8 / 4), bf16 activations, compared with transformers bf16

    python benchmarks/bench_prefill.py --rounds 10 --write
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, summarize, write_section  # noqa: E402
from bench_generation import PATHS  # noqa: E402  (the same six paths, one table of them)

import hf_fastinfer  # noqa: E402
from hf_fastinfer import evaluation, models  # noqa: E402



def prefill_seconds(model, inputs, cache: str | None) -> float:
    kwargs = {"cache_implementation": cache} if cache else {}
    start = time.perf_counter()
    model.generate(**inputs, max_new_tokens=1, do_sample=False, **kwargs)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--prompt", type=int, default=256, help="prompt tokens (from the built-in text)")
    parser.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md")
    args = parser.parse_args()

    folder = models.default_model_path(progress=False)
    _, tokenizer = models.load_default(progress=False)
    ids = evaluation.reference_tokens(tokenizer, args.prompt)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    loaded = {}
    for label, (dtype, config, attention, _, _) in PATHS.items():
        kwargs = {"quantization_config": hf_fastinfer.FastInferConfig(**config)} if config else {}
        loaded[label] = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation=attention,
                                                             **kwargs).eval()
    for label, model in loaded.items():  # warm-up
        prefill_seconds(model, inputs, PATHS[label][3])
    times = {label: [] for label in PATHS}
    for _ in range(args.rounds):
        for label, model in loaded.items():
            times[label].append(prefill_seconds(model, inputs, PATHS[label][3]))
    lines = [
        f"Command: `python benchmarks/bench_prefill.py --rounds {args.rounds} --prompt {args.prompt} --write`",
        "",
        f"Machine: {machine()}.",
        "",
        f"SmolLM2-135M-Instruct, batch 1, a {args.prompt}-token prompt, `generate(max_new_tokens=1)`; every path "
        f"once per round, {args.rounds} rounds; prompt tokens/s as median (min-max), and the ratio of medians "
        "against the transformers path of the same activation dtype.",
        "",
        "| path | prefill ms | prefill tok/s | vs transformers |",
        "| --- | ---: | ---: | ---: |",
    ]
    for label in PATHS:
        median, low, high = summarize(times[label])
        base_label = PATHS[label][4]
        base = summarize(times[base_label])[0]
        versus = "" if label == base_label else f" ({base_label.split()[1]})"
        lines.append(f"| {label} | {median * 1e3:.0f} ({low * 1e3:.0f}-{high * 1e3:.0f}) | "
                     f"{args.prompt / median:.0f} | {base / median:.2f}x{versus} |")
    table = "\n".join(lines)
    print(table)
    if args.write:
        write_section("bench_prefill", "## Prefill: transformers and hf_fastinfer, interleaved\n\n" + table)


if __name__ == "__main__":
    main()
