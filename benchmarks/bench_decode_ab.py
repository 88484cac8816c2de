"""A/B of parts of kernel injection's decode path, interleaved in one process on one loaded model
(``--factors``, each on or off):

  step       the injected model's forward is the whole decode step (injection/step.py), or the model's own
             forward calling the fused blocks one by one
  huge       the decode weights in transparent huge pages (injection/hugepages.py), or in ordinary pages
  nta        the quantized GEMVs' software prefetches of the weights non-temporal, or into L2 far ahead and L1
             near (``kernels/cpu/quant_gemv.cpp``; off by default)
  i8a16      int8 weights against bf16 activations held as int16 per group (integer products: VNNI, or AVX2's
             vpmaddwd), or as float
  i4a16      the same for int4 weights
  head       the final norm and output projection run by the chain of layers in its parallel region, or by
             their modules after it (injection/step.py)
  bf16dot    bf16 weights against the activations through AVX512-BF16 dot products, or widened to fp32
             (``kernels/cpu/dense_gemv.cpp``; on where the CPU has them)
  consume    the whole step takes the outputs of the blocks a chain ran from the chain, or calls each block,
             which hands back the chain's output (injection/step.py)
  twolevel   the quantized GEMVs' prefetches (where not non-temporal) into L2 far ahead and into L1 near, or
             into L1 alone (``kernels/cpu/quant_gemv.cpp``)
  pairs      int8 group-32 weights against int16 activations two groups per product vector, or one
  i4bytes    int4 group-32 weights against int16 activations by byte products (vpdpbusd, AVX-512 VNNI), or by
             int16 products after widening the nibbles (vpdpwssd)
  prepared   a decode call runs every block through one prepared chain (the blocks' compiled layers and the
             cache's buffers converted once, the first block's q/k/v in the chain's region), or through the first
             block's call, which builds the chain's arguments every token (injection/step.py)

Each round times the default model's greedy decode (batch 1, ``--prompt`` prompt tokens, ``--new-tokens`` new
tokens, hf_fastinfer's cache) in every combination, one after the other (every other round in reverse order),
so drifting machine load hits all alike; the table gives medians and ranges, tokens/s, and checks that every
combination gives the same tokens. The factors left out keep the library's own choice.

    python benchmarks/bench_decode_ab.py --bits none,4 --repeats 6 --write
    python benchmarks/bench_decode_ab.py --factors nta --bits 8,4 --repeats 8
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (KERNEL_SWITCHES, kernel_switches, machine, read_bandwidth_gbs, set_kernel_switch,  # noqa: E402
                     set_kernel_switches, summarize, write_section)

import hf_fastinfer  # noqa: E402
from hf_fastinfer import evaluation, models  # noqa: E402
from hf_fastinfer.bench import decode_read_bytes, timed_generate  # noqa: E402
from hf_fastinfer.injection import _move_to_huge_pages, _spec_tensors  # noqa: E402
from hf_fastinfer.injection.hugepages import move_out_of_huge_pages  # noqa: E402
from hf_fastinfer.kernels._cpu_ext import cpu_extension  # noqa: E402

FACTORS = {"step": "whole step", "huge": "huge pages", "head": "head in the chain",
           "consume": "step takes the chain's outputs", "prepared": "prepared chain",
           **{name: label for name, (_, _, label) in KERNEL_SWITCHES.items()}}


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
    if state.step is not None and state.step.head is not None:
        state.step.head._compiled = None  # the head's compiled form holds the tensors it was built on
    if state.step is not None:
        state.step.reset_prepared()  # (built on the compiled layers just dropped)


def set_step(model, step, on: bool) -> None:
    if on:
        model.forward = step
    elif "forward" in model.__dict__:
        del model.forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", default="none,4", help="comma-separated: none (bf16 weights), 8, 4")
    parser.add_argument("--factors", default="step,huge", help="comma-separated, of: " + ", ".join(FACTORS))
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md")
    args = parser.parse_args()

    folder = models.default_model_path(progress=False)
    _, tokenizer = models.load_default(progress=False)
    ids = evaluation.reference_tokens(tokenizer, args.prompt)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    factors = args.factors.split(",")
    if not factors or any(f not in FACTORS for f in factors):
        raise SystemExit(f"--factors: comma-separated, of {', '.join(FACTORS)}")
    combos = list(itertools.product((True, False), repeat=len(factors)))
    ext = cpu_extension()
    library = kernel_switches(ext)
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
        head = state.step.head
        if "bf16dot" in factors and not ext.bf16_dot_products():
            raise SystemExit("this CPU has no AVX512-BF16 dot products (or the kernels were built without them)")
        if "head" in factors and head is None:
            raise SystemExit(f"bits={bits}: the chain runs no head for this model; nothing to compare")
        setters = {"step": lambda on: set_step(model, state.step, on), "huge": lambda on: set_huge_pages(model, on),
                   "consume": lambda on: setattr(state.step, "consume_chain", on),
                   "prepared": lambda on: setattr(state.step, "use_prepared", on),
                   "head": lambda on: setattr(state.step, "head", head if on else None),
                   **{name: lambda on, name=name: set_kernel_switch(ext, name, on) for name in KERNEL_SWITCHES}}
        results, tokens = {c: [] for c in combos}, {}
        for round_index in range(args.repeats):
            bandwidths.append(read_bandwidth_gbs()[0])
            # every other round in reverse order, so that no combination always runs first after the bandwidth
            # measurement (which evicts the caches)
            for combo in combos if round_index % 2 == 0 else combos[::-1]:
                for factor, on in zip(factors, combo):
                    setters[factor](on)
                _, decode, new, _ = timed_generate(model, inputs, args.new_tokens, {"cache_implementation": "fastinfer"})
                results[combo].append(decode)
                tokens.setdefault(combo, new)
                print(bits, *combo, round(decode, 1), flush=True)
        set_step(model, state.step, True)
        set_huge_pages(model, True)
        set_kernel_switches(ext, library)
        state.step.consume_chain = True
        state.step.use_prepared = True
        state.step.head = head
        same = all(torch.equal(t, tokens[combos[0]]) for t in tokens.values())
        roofline = summarize(bandwidths)[0] * 1e9 / decode_read_bytes(model)
        base = summarize(results[combos[-1]])[0]
        for combo, values in results.items():
            d = summarize(values)
            rows.append((bits, combo, d, d[0] / base, d[0] / roofline, same))
        del model
    bandwidth = summarize(bandwidths)
    lines = [
        f"Command: `python benchmarks/bench_decode_ab.py{'' if args.factors == 'step,huge' else ' --factors ' + args.factors} "
        f"--bits {args.bits} --repeats {args.repeats} "
        f"--new-tokens {args.new_tokens} --prompt {args.prompt} --write`",
        "",
        f"Machine: {machine()}. Read bandwidth (1 GiB fp32 sum, the faster of 4 KiB and huge pages): "
        f"{bandwidth[0]:.1f} GB/s ({bandwidth[1]:.1f}-{bandwidth[2]:.1f}).",
        "",
        f"SmolLM2-135M-Instruct, bf16 activations, batch 1, greedy, {args.prompt}-token prompt, {args.new_tokens} new "
        f"tokens, hf_fastinfer's cache; {args.repeats} interleaved rounds; decode tokens/s as median (min-max).",
        "",
        f"Factors not varied keep the library's choice (non-temporal prefetch: "
        f"{'on' if library['nta'] else 'off'}); \"vs none\" is against every factor off.",
        "",
        "| weights | " + " | ".join(FACTORS[f] for f in factors) + " | decode tok/s | vs none | share of roofline | "
        "same tokens in all |",
        "| --- | " + " | ".join("---" for _ in factors) + " | ---: | ---: | ---: | --- |",
    ]
    for bits, combo, d, ratio, share, same in rows:
        lines.append(f"| {'bf16' if bits == 'none' else 'int' + bits} | " +
                     " | ".join("yes" if on else "no" for on in combo) +
                     f" | {d[0]:.1f} ({d[1]:.1f}-{d[2]:.1f}) | {ratio:.2f}x | {share:.0%} | {'yes' if same else 'no'} |")
    table = "\n".join(lines)
    print(table)
    if args.write:
        title = " and ".join(FACTORS[f] for f in factors)
        name = "bench_decode_ab" if args.factors == "step,huge" else "bench_decode_ab_" + "_".join(factors)
        write_section(name, f"## Decode path A/B: {title}\n\n" + table)


if __name__ == "__main__":
    main()
