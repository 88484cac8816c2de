"""Prefill speed: transformers' own path and hf_fastinfer's, interleaved in one process.

A prompt's prefill is short (a few hundred ms on the default model), so on a noisy host the generation
benchmark's five rounds leave wide ranges; this script times only the prefill (``generate`` with one new
token, which is the prompt's forward plus one sampling step), many rounds, each round every path once in turn:

  transformers fp32 / bf16   : attn "sdpa", DynamicCache, no hf_fastinfer
  hf_fastinfer fp32 / bf16   : FastInferConfig(bits=None) (kernel injection), attn and cache "fastinfer"
  hf_fastinfer int8 / int4   : FastInferConfig(bits=8 / 4), bf16 activations, compared with transformers bf16

    python benchmarks/bench_prefill.py --rounds 10 --write

``--sdpa-rows`` adds, in the same rounds, the hf_fastinfer fp32 and bf16 models with the prefill-attention kernel
turned off (SDPA instead): the kernel's A/B. ``--whole-rows`` adds the hf_fastinfer models with the last block run
for every prompt position (``FusedDecodeStep.trim_prefill`` off), where generate() needs the last position only:
the trimmed last block's A/B.
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
from hf_fastinfer.kernels import prefill_attention  # noqa: E402

#: --sdpa-rows: label -> the loaded path it reruns with the prefill-attention kernel off
SDPA_ROWS = {"hf_fastinfer fp32, SDPA attention": "hf_fastinfer fp32",
             "hf_fastinfer bf16, SDPA attention": "hf_fastinfer bf16"}
#: --whole-rows: label -> the loaded path it reruns with the last block computed for every prompt position
WHOLE_ROWS = {f"{source}, last block whole": source
              for source in ("hf_fastinfer fp32", "hf_fastinfer bf16", "hf_fastinfer int8", "hf_fastinfer int4")}


def prefill_seconds(model, inputs, cache: str | None, kernel_attention: bool = True, trim: bool = True) -> float:
    kwargs = {"cache_implementation": cache} if cache else {}
    prefill_attention.enabled = kernel_attention
    state = getattr(model, "_hf_fastinfer_injection", None)
    step = state.step if state is not None else None
    if step is not None:
        step.trim_prefill = trim
    try:
        start = time.perf_counter()
        model.generate(**inputs, max_new_tokens=1, do_sample=False, **kwargs)
        return time.perf_counter() - start
    finally:
        prefill_attention.enabled = True
        if step is not None:
            step.trim_prefill = True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--prompt", type=int, default=256, help="prompt tokens (from the built-in text)")
    parser.add_argument("--sdpa-rows", action="store_true",
                        help="also time the hf_fastinfer float paths with SDPA for prefill attention (the kernel's A/B)")
    parser.add_argument("--whole-rows", action="store_true",
                        help="also time the hf_fastinfer paths with the last block run for every prompt position "
                             "(the trimmed last block's A/B)")
    parser.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md")
    args = parser.parse_args()
    reruns = {**(SDPA_ROWS if args.sdpa_rows else {}), **(WHOLE_ROWS if args.whole_rows else {})}
    rows = {}
    for label, path in PATHS.items():  # each rerun right after its path, so that both see the host alike
        rows[label] = path
        rows.update({rerun: path for rerun, source in reruns.items() if source == label})

    folder = models.default_model_path(progress=False)
    _, tokenizer = models.load_default(progress=False)
    ids = evaluation.reference_tokens(tokenizer, args.prompt)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    loaded = {}
    for label, (dtype, config, attention, _, _) in PATHS.items():
        kwargs = {"quantization_config": hf_fastinfer.FastInferConfig(**config)} if config else {}
        loaded[label] = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation=attention,
                                                             **kwargs).eval()
    def timed(label: str) -> float:
        source = reruns.get(label, label)
        return prefill_seconds(loaded[source], inputs, PATHS[source][3], kernel_attention=label not in SDPA_ROWS,
                               trim=label not in WHOLE_ROWS)

    for label in rows:  # warm-up
        timed(label)
    times = {label: [] for label in rows}
    for _ in range(args.rounds):
        for label in rows:
            times[label].append(timed(label))
    lines = [
        f"Command: `python benchmarks/bench_prefill.py --rounds {args.rounds} --prompt {args.prompt}"
        f"{' --sdpa-rows' if args.sdpa_rows else ''}{' --whole-rows' if args.whole_rows else ''} --write`",
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
    for label in rows:
        median, low, high = summarize(times[label])
        base_label = rows[label][4]
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
