"""Generation speed of hf_fastinfer's paths against transformers' own, side by side in one process.

Paths (all on the default model, greedy, batch 1):
  transformers : attn "sdpa", DynamicCache            (transformers' defaults)
  fastinfer    : attn "fastinfer", cache "fastinfer"
  fastinfer_int8: attn "fastinfer", cache "fastinfer_int8"

For each dtype and prompt length, the paths run alternately (so drifting load hits all alike), ``--repeats``
times; the table gives the median tokens/s, the range, and the ratio to transformers. Decode tokens/s is
timed from the first to the last new token; prefill from the call to the first new token. The roofline is
the measured read bandwidth divided by the bytes of weights read per decoded token.

    python benchmarks/bench_generation.py --repeats 5 --write
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from transformers.generation.streamers import BaseStreamer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, read_bandwidth_gbs, summarize, write_section  # noqa: E402

import hf_fastinfer  # noqa: E402,F401
from hf_fastinfer import evaluation, models  # noqa: E402


class _Clock(BaseStreamer):
    def __init__(self):
        self.times, self.seen_prompt = [], False

    def put(self, value):
        if self.seen_prompt:
            self.times.append(time.perf_counter())
        self.seen_prompt = True

    def end(self):
        pass


def _run(model, inputs, new_tokens, cache):
    clock = _Clock()
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, streamer=clock)
    if cache:
        kwargs["cache_implementation"] = cache
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(**inputs, **kwargs)
    prompt_len = inputs["input_ids"].shape[1]
    return prompt_len / (clock.times[0] - start), (len(clock.times) - 1) / (clock.times[-1] - clock.times[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--prompt-lengths", default="chat,1024", help="'chat' (a short chat prompt) and/or token counts")
    parser.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md")
    args = parser.parse_args()

    bandwidth = summarize([read_bandwidth_gbs()[0] for _ in range(3)])
    rows = []
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        reference, tokenizer = models.load_default(dtype=dtype, attn_implementation="sdpa", progress=False)
        fast, _ = models.load_default(dtype=dtype, attn_implementation="fastinfer", progress=False)
        weight_bytes = sum(p.numel() * p.element_size() for p in fast.parameters())  # tied lm_head read once more
        weight_bytes += fast.lm_head.weight.numel() * fast.lm_head.weight.element_size()
        roofline = bandwidth[0] * 1e9 / weight_bytes
        for length in args.prompt_lengths.split(","):
            if length == "chat":
                inputs = models.chat_inputs(tokenizer, "Write a short story about a robot who learns to paint.")
            else:
                ids = evaluation.reference_tokens(tokenizer, int(length))
                inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
            paths = [("transformers (sdpa + DynamicCache)", reference, None),
                     ("hf_fastinfer (fastinfer + fastinfer)", fast, "fastinfer"),
                     ("hf_fastinfer (fastinfer + fastinfer_int8)", fast, "fastinfer_int8")]
            for _, model, cache in paths:  # warm-up
                _run(model, inputs, 4, cache)
            results = {label: ([], []) for label, _, _ in paths}
            for _ in range(args.repeats):
                for label, model, cache in paths:
                    prefill, decode = _run(model, inputs, args.new_tokens, cache)
                    results[label][0].append(prefill)
                    results[label][1].append(decode)
            base_prefill = summarize(results[paths[0][0]][0])[0]
            base_decode = summarize(results[paths[0][0]][1])[0]
            for label, _, _ in paths:
                p, d = summarize(results[label][0]), summarize(results[label][1])
                rows.append((dtype_name, inputs["input_ids"].shape[1], label, p, d, p[0] / base_prefill,
                             d[0] / base_decode, d[0] / roofline))
                print(rows[-1], flush=True)

    lines = [
        "Command: `python benchmarks/bench_generation.py "
        f"--repeats {args.repeats} --new-tokens {args.new_tokens} --dtypes {args.dtypes} "
        f"--prompt-lengths {args.prompt_lengths} --write`",
        "",
        f"Machine: {machine()}. Read bandwidth (fp32 sum of 1 GiB, median of 3x7): {bandwidth[0]:.1f} GB/s "
        f"(range {bandwidth[1]:.1f}-{bandwidth[2]:.1f}).",
        "",
        f"SmolLM2-135M-Instruct, batch 1, greedy, {args.new_tokens} new tokens, {args.repeats} alternating repeats; "
        "tokens/s as median (min-max); ratios against transformers' own path in the same run; "
        "roofline = bandwidth / weight bytes read per token.",
        "",
        "| dtype | prompt | path | prefill tok/s | decode tok/s | prefill ratio | decode ratio | decode / roofline |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for dtype_name, prompt_len, label, p, d, pr, dr, roof in rows:
        lines.append(f"| {dtype_name} | {prompt_len} | {label} | {p[0]:.0f} ({p[1]:.0f}-{p[2]:.0f}) | "
                     f"{d[0]:.1f} ({d[1]:.1f}-{d[2]:.1f}) | {pr:.2f}x | {dr:.2f}x | {roof:.0%} |")
    table = "\n".join(lines)
    print(table)
    if args.write:
        write_section("bench_generation", "## Generation: attention + KV cache\n\n" + table)


if __name__ == "__main__":
    main()
