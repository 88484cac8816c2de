"""Where a decoded token's time goes on CPU: the fused decode step phase by phase.

Runs hf_fastinfer's paths (default model, kernel injection, "fastinfer" attention and cache, batch 1, greedy)
on the profiling build of the compiled kernels, whose fused decoder layers count the cycles of each phase on
each thread (``kernels/cpu/phases.h``: the projections, the attention, the residual adds and norms, and the
waits at the barriers between them). For each precision it prints, per decoded token:

  * the token's time (``generate()``'s decode rate), the compiled chain of decoder layers (wall time of its
    calls, the output projection included where the chain runs it) and the rest (the model's Python,
    ``generate()``'s loop, and the output projection where the chain does not run it);
  * each phase's time on each thread, and for the projections the weight bytes a token reads in them and the
    rate they stream at, beside the machine's read bandwidth (fp32 ``sum()`` of 1 GiB) measured in the same run.

The profiling build is a second extension (``hf_fastinfer_cpu_phases``, compiled on first use); the counters
cost a few cycles per phase. The numbers are for finding where the time goes, not for the speed tables
(``bench_generation.py``).

    python benchmarks/profile_decode.py --precisions bf16,int4 --write
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, read_bandwidth_gbs, write_section  # noqa: E402

from hf_fastinfer.kernels import _cpu_ext  # noqa: E402

#: precision -> (dtype, FastInferConfig bits)
PRECISIONS = {"fp32": (torch.float32, None), "bf16": (torch.bfloat16, None), "int8": (torch.bfloat16, 8),
              "int4": (torch.bfloat16, 4)}
#: the phases that stream a projection's weights -> the projections of a layer they read
STREAMING = {"q/k/v": ("qkv",), "o_proj": ("o",), "gate/up + act": ("gate_up",), "down + residual": ("down",),
             "head (final norm + output projection)": ("head",)}


def projection_size(p) -> int:
    """Bytes of one projection's tensors (weight, scales, zero points, bias)."""
    return sum(t.numel() * t.element_size() for t in (p.weight, p.scales, p.zeros, p.bias) if t is not None)


def projection_bytes(spec) -> dict[str, int]:
    """Bytes of one fused layer's weights by projection group (weights, scales, zero points, biases)."""
    return {"qkv": sum(projection_size(p) for p in spec.qkv), "o": projection_size(spec.o),
            "gate_up": sum(projection_size(p) for p in spec.gate_up),
            "down": projection_size(spec.down) if spec.down is not None else 0}


def tsc_per_second() -> float:
    """Time-stamp counter ticks per second (the counters count TSC ticks)."""
    ext = _cpu_ext.cpu_extension()
    t0, c0 = time.perf_counter(), ext.read_tsc()
    time.sleep(0.3)
    return (ext.read_tsc() - c0) / (time.perf_counter() - t0)


def profile(label: str, folder, inputs, new_tokens: int, rounds: int, tsc: float) -> list[str]:
    import hf_fastinfer
    from hf_fastinfer.bench import timed_generate
    from hf_fastinfer.kernels import decoder_layer as fused
    from transformers import AutoModelForCausalLM

    dtype, bits = PRECISIONS[label]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="fastinfer",
                                                 quantization_config=hf_fastinfer.FastInferConfig(bits=bits)).eval()
    # the fused layers' specs (the injection's own record of them: this script is the project's tooling)
    layers = list(model._hf_fastinfer_injection.layers.values())
    per_token_bytes: dict[str, int] = {}
    for layer in layers:
        for group, nbytes in projection_bytes(layer.spec).items():
            per_token_bytes[group] = per_token_bytes.get(group, 0) + nbytes
    step = model._hf_fastinfer_injection.step
    if step is not None and step.head is not None:  # the chain's head: the output projection's weight, once
        per_token_bytes["head"] = projection_size(step.head.proj)
    ext = _cpu_ext.cpu_extension()
    names = ext.phase_names()
    threads = torch.get_num_threads()
    chain_ns: list[int] = []
    # the chain runs as the whole step's prepared chain, or from the first block's call (decode_chain)
    original, original_prepared = fused.decode_chain, fused.PreparedChain.__call__

    def timed(call):
        def timed_call(*args, **kwargs):
            start = time.perf_counter_ns()
            out = call(*args, **kwargs)
            chain_ns.append(time.perf_counter_ns() - start)
            return out
        return timed_call

    fused.decode_chain, fused.PreparedChain.__call__ = timed(original), timed(original_prepared)
    try:
        timed_generate(model, inputs, 16, {"cache_implementation": "fastinfer"})  # warm-up
        token_ms, chain_ms, phases = [], [], []
        for _ in range(rounds):
            ext.phase_reset()
            chain_ns.clear()
            _, decode, _, _ = timed_generate(model, inputs, new_tokens, {"cache_implementation": "fastinfer"})
            calls = len(chain_ns)
            if calls == 0:
                raise RuntimeError(f"{label}: no decode step ran the compiled chain of layers; nothing to profile")
            cycles = ext.phase_cycles()
            token_ms.append(1e3 / decode)
            chain_ms.append(sum(chain_ns) / calls / 1e6)
            # us per decoded token, [thread][phase]
            phases.append([[cycles[t][p] / tsc * 1e6 / calls for p in range(len(names))] for t in range(threads)])
    finally:
        fused.decode_chain, fused.PreparedChain.__call__ = original, original_prepared
    median = statistics.median
    token, chain = median(token_ms), median(chain_ms)
    lines = [f"**{label}**: {token:.2f} ms a token ({1e3 / token:.1f} tok/s); the chain of {len(layers)} layers "
             f"{chain:.2f} ms (with the output projection, where it runs the head), the rest (the model's Python, "
             f"`generate()`'s loop) "
             f"{token - chain:.2f} ms.", "",
             "| phase | " + " | ".join(f"thread {t} us" for t in range(threads)) + " | MB a token | GB/s |",
             "| --- | " + " | ".join("---:" for _ in range(threads)) + " | ---: | ---: |"]
    for p, name in enumerate(names):
        values = [median(r[t][p] for r in phases) for t in range(threads)]
        if max(values) < 0.5:
            continue  # a phase this model's layers do not have
        row = f"| {name} | " + " | ".join(f"{v:.0f}" for v in values)
        if name in STREAMING:
            nbytes = sum(per_token_bytes.get(g, 0) for g in STREAMING[name])
            row += f" | {nbytes / 1e6:.1f} | {nbytes / (max(values) * 1e-6) / 1e9:.1f} |"
        else:
            row += " | | |"
        lines.append(row)
    inside = max(sum(median(r[t][p] for r in phases) for p in range(len(names))) for t in range(threads))
    lines.append(f"| the rest of the chain's call (Python, argument conversion) | {max(0.0, chain * 1e3 - inside):.0f} | | | |")
    del model
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precisions", default="fp32,bf16,int8,int4", help=f"comma-separated, of {list(PRECISIONS)}")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt", type=int, default=256, help="prompt tokens (from the built-in text)")
    parser.add_argument("--write", action="store_true", help="write the tables into BENCHMARKS.md")
    args = parser.parse_args()
    labels = args.precisions.split(",")
    unknown = [label for label in labels if label not in PRECISIONS]
    if unknown:
        parser.error(f"unknown precision(s) {unknown}; choose from {list(PRECISIONS)}")

    _cpu_ext.use_phase_profiling_build()  # before anything else uses the compiled kernels
    from hf_fastinfer import evaluation, models

    folder = models.default_model_path(progress=False)
    _, tokenizer = models.load_default(progress=False)
    ids = evaluation.reference_tokens(tokenizer, args.prompt)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    tsc = tsc_per_second()
    bandwidth = read_bandwidth_gbs()[0]
    lines = ["## Decode step on CPU, phase by phase", "",
             f"Command: `python benchmarks/profile_decode.py --precisions {args.precisions} --rounds {args.rounds} "
             f"--new-tokens {args.new_tokens} --prompt {args.prompt} --write`", "",
             f"Machine: {machine()}. Read bandwidth (fp32 sum of 1 GiB): {bandwidth:.1f} GB/s.", "",
             f"SmolLM2-135M-Instruct, batch 1, greedy, {args.prompt}-token prompt, {args.new_tokens} new tokens; "
             f"per decoded token, medians of {args.rounds} rounds. A phase's time on a thread runs from the end of "
             "the phase before it to its own end; a wait is the time at the barrier after a phase. GB/s: the "
             "phase's weight bytes over its slower thread's time.", ""]
    for label in labels:
        lines += profile(label, folder, inputs, args.new_tokens, args.rounds, tsc) + [""]
    text = "\n".join(lines)
    print(text)
    if args.write:
        write_section("profile_decode", text)


if __name__ == "__main__":
    main()
