"""A/B of two parts of kernel injection's decode path, interleaved in one process on one loaded model:

  whole step   the injected model's forward is the whole decode step (injection/step.py), or the model's own
               forward calling the fused blocks one by one
  huge pages   the decode weights in transparent huge pages (injection/hugepages.py), or in ordinary pages

Each round times the default model's greedy decode (batch 1, ``--prompt`` prompt tokens, ``--new-tokens`` new
tokens, hf_fastinfer's cache) in every combination, one after the other, so drifting machine load hits all
alike; the table gives medians and ranges, tokens/s, and checks that every combination gives the same tokens.

    python benchmarks/bench_decode_ab.py --bits none,4 --repeats 6 --write
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
from hf_fastinfer.injection import _move_to_huge_pages, _spec_tensors  # noqa: E402
from hf_fastinfer.injection.hugepages import move_out_of_huge_pages  # noqa: E402


def set_huge_pages(model, on: bool) -> None:
    state = model._hf_fastinfer_injection
    if on and state.huge_pages is None:
        _move_to_huge_pages(model, state)
    elif not on and state.huge_pages is not None:
        every = list(model.parameters()) + list(model.buffers())
        every += [t for layer in state.layers.values() for t in _spec_tensors(layer.spec)]
        move_out_of_huge_pages(every, state.huge_pages)
        state.huge_pages, state.report.huge_page_bytes = None, 0
        for layer in state.layers.values():
            layer.spec._compiled = None


def set_step(model, step, on: bool) -> None:
    if on:
        model.forward = step
    elif "forward" in model.__dict__:
        del model.forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", default="none,4", help="comma-separated: none (bf16 weights), 8, 4")
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md")
    args = parser.parse_args()

    folder = models.default_model_path(progress=False)
    _, tokenizer = models.load_default(progress=False)
    ids = evaluation.reference_tokens(tokenizer, args.prompt)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    combos = [(step, huge) for step in (True, False) for huge in (True, False)]
    rows = []
    bandwidths = []
    for bits in args.bits.split(","):
        config = hf_fastinfer.FastInferConfig(bits=None if bits == "none" else int(bits))
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, attn_implementation="fastinfer",
                                                     quantization_config=config).eval()
        state = model._hf_fastinfer_injection
        if state.step is None or state.huge_pages is None:
            raise SystemExit(f"bits={bits}: the whole step ({state.report.decode_step_left}) or huge pages are not "
                             "in use on this machine; nothing to compare")
        results, tokens = {c: [] for c in combos}, {}
        for _ in range(args.repeats):
            bandwidths.append(read_bandwidth_gbs()[0])
            for step_on, huge_on in combos:
                set_step(model, state.step, step_on)
                set_huge_pages(model, huge_on)
                _, decode, new, _ = timed_generate(model, inputs, args.new_tokens, {"cache_implementation": "fastinfer"})
                results[(step_on, huge_on)].append(decode)
                tokens.setdefault((step_on, huge_on), new)
                print(bits, step_on, huge_on, round(decode, 1), flush=True)
        set_step(model, state.step, True)
        set_huge_pages(model, True)
        same = all(torch.equal(t, tokens[combos[0]]) for t in tokens.values())
        roofline = summarize(bandwidths)[0] * 1e9 / decode_read_bytes(model)
        base = summarize(results[(False, False)])[0]
        for (step_on, huge_on), values in results.items():
            d = summarize(values)
            rows.append((bits, step_on, huge_on, d, d[0] / base, d[0] / roofline, same))
        del model
    bandwidth = summarize(bandwidths)
    lines = [
        f"Command: `python benchmarks/bench_decode_ab.py --bits {args.bits} --repeats {args.repeats} "
        f"--new-tokens {args.new_tokens} --prompt {args.prompt} --write`",
        "",
        f"Machine: {machine()}. Read bandwidth (1 GiB fp32 sum, the faster of 4 KiB and huge pages): "
        f"{bandwidth[0]:.1f} GB/s ({bandwidth[1]:.1f}-{bandwidth[2]:.1f}).",
        "",
        f"SmolLM2-135M-Instruct, bf16 activations, batch 1, greedy, {args.prompt}-token prompt, {args.new_tokens} new "
        f"tokens, hf_fastinfer's cache; {args.repeats} interleaved rounds; decode tokens/s as median (min-max).",
        "",
        "| weights | whole step | huge pages | decode tok/s | vs neither | share of roofline | same tokens in all |",
        "| --- | --- | --- | ---: | ---: | ---: | --- |",
    ]
    for bits, step_on, huge_on, d, ratio, share, same in rows:
        lines.append(f"| {'bf16' if bits == 'none' else 'int' + bits} | {'yes' if step_on else 'no'} | "
                     f"{'yes' if huge_on else 'no'} | {d[0]:.1f} ({d[1]:.1f}-{d[2]:.1f}) | {ratio:.2f}x | {share:.0%} | "
                     f"{'yes' if same else 'no'} |")
    table = "\n".join(lines)
    print(table)
    if args.write:
        write_section("bench_decode_ab", "## Decode path A/B: whole step and huge pages\n\n" + table)


if __name__ == "__main__":
    main()
