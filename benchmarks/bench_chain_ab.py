"""A/B of the compiled kernels' run-time switches on the decode step's compiled part alone, switched every call.

``bench_decode_ab.py`` times whole ``generate()`` calls, a second or more each; on a shared host whose speed
swings by a third from one second to the next, one round's ratio then spreads by +-20% and a 2% difference needs
hundreds of rounds. Here the unit is one call of the prepared chain of decoder layers (every fused layer, the final
norm and the output projection: what a decoded token costs without the Python around it, a few milliseconds),
with the switch on and off in the order on, off, off, on, ... so that a drift in the host's speed hits both alike
within each pair. The result is the median of the per-pair ratios (off time / on time: above 1, the switch's "on"
is faster) with its quartiles, over ``--calls`` calls.

The chain is the one ``generate()`` builds for the default model (kernel injection, hf_fastinfer's cache, batch
1), after a ``--prompt``-token prompt; every call decodes the same token at the same position (the cache slot is
written again with the same values). Switches (each on against off; the library's own setting is put back after):

  nta        the quantized GEMVs' software prefetches of the weights non-temporal, or (off) into L2 far ahead and
             L1 near (``kernels/cpu/quant_gemv.cpp``; off by default)
  twolevel   the prefetches that are not non-temporal into L2 far ahead and L1 near, or into L1 alone (only where
             ``nta`` is off)
  i8a16      int8 weights against bf16 activations held as int16 per group, or as float
  i4a16      the same for int4 weights
  pairs      int8 group-32 weights against int16 activations two groups per product vector (AVX-512), or one
  i4bytes    int4 group-32 weights against int16 activations by byte products (vpdpbusd, AVX-512 VNNI), or by
             int16 products after widening the nibbles (vpdpwssd)
  bf16dot    bf16 weights through AVX512-BF16 dot products, or widened to fp32

What it cannot see: the Python and ``generate()`` loop between a token's chains (their cost, and what a switch
leaves of their data in the caches), and carry-over from one call to the next (half the calls follow a call of the
other setting, which narrows a difference that lies in what one call leaves cached for the next). A switch that
wins here still needs the whole decode (``bench_decode_ab.py``) before it becomes the library's choice; one that
shows no difference here and changes only the stream's own speed has none to give.

The table says whether both settings gave the same output (prefetch hints must; the int16 roads round the
activations, so they need not).

    python benchmarks/bench_chain_ab.py --bits 8,4 --switches nta --calls 1000
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (KERNEL_SWITCHES, kernel_switches, machine, read_bandwidth_gbs, set_kernel_switches,  # noqa: E402
                     write_section)

import hf_fastinfer  # noqa: E402
from hf_fastinfer import evaluation, models  # noqa: E402
from hf_fastinfer.bench import decode_read_bytes  # noqa: E402
from hf_fastinfer.cache import FastInferCache  # noqa: E402
from hf_fastinfer.kernels._cpu_ext import cpu_extension  # noqa: E402

def prepared_chain(model, prompt_ids: torch.Tensor):
    """(the prepared chain generate() would run, its call's arguments) after the prompt and one decoded token."""
    step = model._hf_fastinfer_injection.step
    if step is None:
        raise SystemExit("the whole decode step is not in use for this model on this machine; nothing to time")
    cache = FastInferCache(config=model.config, max_cache_len=prompt_ids.shape[1] + 8)
    token = torch.tensor([[int(prompt_ids[0, -1])]])
    with torch.inference_mode():
        model(input_ids=prompt_ids, past_key_values=cache, use_cache=True)
        before = step.prepared_calls
        model(input_ids=token, past_key_values=cache, use_cache=True)
        if step.prepared_calls != before + 1 or step._prepared is None:
            raise SystemExit("the decode call did not take the prepared chain; nothing to time")
        hidden = model.get_input_embeddings()(token)  # [1, 1, H]
        position = prompt_ids.shape[1] + 1
        cos, sin = step.rotary()(hidden, torch.tensor([[position]]))
    # (the chain keeps the cache's buffers through weak references: the cache must outlive the calls)
    return step._prepared[1], (hidden, cos, sin, None, position, position + 1), cache


def ab(chain, call_args, setter, calls: int):
    """(on times, off times, whether both gave the same outputs): calls alternate on, off, off, on, ... (the caller
    puts the library's own setting back)"""
    times = {True: [], False: []}
    outputs = {}
    with torch.inference_mode():
        for i in range(calls):
            on = i % 4 in (0, 3)
            setter(on)
            start = time.perf_counter()
            # (the last layer's output [1, 1, H] and the logits [1, V] or None: new tensors every call, never
            # written again, so the last call's of each setting is kept without a copy)
            outputs[on] = chain(*call_args)
            times[on].append(time.perf_counter() - start)
    same = all((a is None and b is None) or torch.equal(a, b) for a, b in zip(outputs[True], outputs[False]))
    return times[True], times[False], same


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", default="none,8,4", help="comma-separated: none (bf16 weights), 8, 4")
    parser.add_argument("--switches", default="nta", help="comma-separated, of: " + ", ".join(KERNEL_SWITCHES))
    parser.add_argument("--calls", type=int, default=1000, help="chain calls per switch and precision (even)")
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md")
    args = parser.parse_args()
    switches = args.switches.split(",")
    if not switches or any(s not in KERNEL_SWITCHES for s in switches):
        raise SystemExit(f"--switches: comma-separated, of {', '.join(KERNEL_SWITCHES)}")
    if args.calls < 8 or args.calls % 2:
        raise SystemExit("--calls: an even number, at least 8")
    ext = cpu_extension()
    library = kernel_switches(ext)
    for name in switches:  # a switch this build or CPU has no road for reads off whatever it is set to
        getter, setter = getattr(ext, KERNEL_SWITCHES[name][0]), getattr(ext, KERNEL_SWITCHES[name][1])
        setter(True)
        available = getter()
        setter(library[name])
        if not available:
            raise SystemExit(f"{name}: this build or CPU has no such road; nothing to compare")
    folder = models.default_model_path(progress=False)
    _, tokenizer = models.load_default(progress=False)
    ids = evaluation.reference_tokens(tokenizer, args.prompt)
    bandwidths = [read_bandwidth_gbs()[0]]
    rows = []
    for bits in args.bits.split(","):
        config = hf_fastinfer.FastInferConfig(bits=None if bits == "none" else int(bits))
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, attn_implementation="fastinfer",
                                                     quantization_config=config).eval()
        chain, call_args, cache = prepared_chain(model, ids)
        weight_bytes = decode_read_bytes(model)
        for name in switches:
            try:
                on, off, same = ab(chain, call_args, getattr(ext, KERNEL_SWITCHES[name][1]), args.calls)
            finally:
                set_kernel_switches(ext, library)
            ratios = [b / a for a, b in zip(on, off)]
            quartiles = statistics.quantiles(ratios, n=4)
            rows.append((bits, name, statistics.median(on), statistics.median(off), statistics.median(ratios),
                         quartiles[0], quartiles[2], len(ratios), weight_bytes, same))
            print(*rows[-1], flush=True)
        del model, chain, cache
    bandwidths.append(read_bandwidth_gbs()[0])
    lines = [
        f"Command: `python benchmarks/bench_chain_ab.py --bits {args.bits} --switches {args.switches} "
        f"--calls {args.calls} --prompt {args.prompt} --write`",
        "",
        f"Machine: {machine()}. Read bandwidth (1 GiB fp32 sum) before and after: {bandwidths[0]:.1f} and "
        f"{bandwidths[1]:.1f} GB/s.",
        "",
        f"SmolLM2-135M-Instruct, bf16 activations, batch 1, the prepared chain of every decoder layer, the final norm "
        f"and the output projection after a {args.prompt}-token prompt; each switch on and off in turns of one call "
        "(on, off, off, on, ...). Times are medians; the ratio is the median of the pairs' off / on times (above 1: "
        "\"on\" is faster), with its quartiles; GB/s: the step's weight bytes over the median time with the switch on.",
        "",
        "| weights | switch | on ms | off ms | off / on (quartiles) | pairs | GB/s on | same output |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for bits, name, t_on, t_off, ratio, q1, q3, pairs, weight_bytes, same in rows:
        lines.append(f"| {'bf16' if bits == 'none' else 'int' + bits} | {KERNEL_SWITCHES[name][2]} | "
                     f"{t_on * 1e3:.2f} | {t_off * 1e3:.2f} | {ratio:.3f} ({q1:.3f}-{q3:.3f}) | {pairs} | "
                     f"{weight_bytes / t_on / 1e9:.1f} | {'yes' if same else 'no'} |")
    table = "\n".join(lines)
    print(table)
    if args.write:
        write_section("bench_chain_ab_" + "_".join(switches),
                      f"## Decode chain A/B: {' and '.join(KERNEL_SWITCHES[s][2] for s in switches)}\n\n" + table)


if __name__ == "__main__":
    main()
