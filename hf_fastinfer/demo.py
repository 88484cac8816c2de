"""``python -m hf_fastinfer demo``: chat with the default model through hf_fastinfer, and compare, on the same
prompt in the same process, three ways of loading it:

* transformers' own path (SDPA attention, dynamic cache), the baseline;
* hf_fastinfer's exact configuration: kernel injection with float weights (``FastInferConfig(bits=None)``), its
  attention and cache; its greedy tokens are expected to equal the baseline's;
* hf_fastinfer with int8 weights (``FastInferConfig(bits=8)``): a quarter of the float weights' bytes read per
  token.

Timing (:func:`hf_fastinfer.bench.timed_generate`): a streamer records when ``generate()`` hands over each token.
Prefill runs from the call to the first new token, decode from the first new token to the last. The paths run
one after the other in each repeat, so drifting machine load hits all alike; the table gives medians. Memory is
the weights' bytes and the peak growth of the process while the path loaded and ran a short warm-up
(:func:`hf_fastinfer.bench.load_measured`).
"""

from __future__ import annotations

import statistics
import sys

import torch
from transformers.generation.streamers import TextStreamer

from .bench import DTYPES, SHORT_DTYPE, load_measured, timed_generate, weight_bytes

DEFAULT_PROMPT = "What is the capital of France? Answer in one sentence, then name two famous sights there."


def _paths(dtype: torch.dtype, baseline: bool) -> list[tuple[str, dict, dict]]:
    """(label, from_pretrained keywords, generate keywords) per path."""
    from . import FastInferConfig

    short = SHORT_DTYPE[dtype]
    fast = dict(cache_implementation="fastinfer")
    paths = [(f"transformers {short} (sdpa, dynamic cache)", dict(attn_implementation="sdpa"), {})] if baseline else []
    paths += [
        (f"hf_fastinfer {short} (kernels, exact)",
         dict(attn_implementation="fastinfer", quantization_config=FastInferConfig(bits=None)), fast),
        (f"hf_fastinfer {short} int8 weights",
         dict(attn_implementation="fastinfer", quantization_config=FastInferConfig(bits=8)), fast),
    ]
    return paths


def run(args) -> int:
    from . import models

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    paths = _paths(dtype, baseline=not args.no_baseline)

    folder = models.default_model_path(progress=True)  # converts the GGUF once, with its own progress bar
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    inputs = {k: v.to(device) for k, v in models.chat_inputs(tokenizer, args.prompt).items()}
    loaded, memory, weights = {}, {}, {}
    for label, load_kwargs, generate_kwargs in paths:
        # one line per path instead of transformers' nested loading bars; a short warm-up: first calls pay for
        # allocator growth and lazy initialisation
        print(f"Loading {models.DEFAULT_MODEL_NAME}: {label} ...", file=sys.stderr, flush=True)
        model, _, memory[label] = load_measured(folder, dict(load_kwargs, dtype=dtype), device,
                                                lambda m, kw=generate_kwargs: timed_generate(m, inputs, 2, kw))
        loaded[label], weights[label] = model, weight_bytes(model)

    timings = {label: ([], []) for label, _, _ in paths}
    tokens = {}
    print(f"\nUser: {args.prompt}\nAssistant: ", end="", flush=True)
    display = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    shown = paths[1][0] if len(paths) == 3 else paths[0][0]  # the answer streamed is hf_fastinfer's exact path's
    for repeat in range(args.repeats):
        for label, _, generate_kwargs in paths:
            streamer = display if repeat == 0 and label == shown else None
            prefill, decode, new, _ = timed_generate(loaded[label], inputs, args.max_new_tokens, generate_kwargs,
                                                     streamer=streamer, stop_at_eos=True)
            timings[label][0].append(prefill)
            timings[label][1].append(decode)
            tokens[label] = new

    baseline = paths[0][0] if not args.no_baseline else None
    print()
    print(f"prompt: {inputs['input_ids'].shape[1]} tokens; answer: {tokens[shown].shape[1]} tokens; device: "
          f"{device}; dtype: {args.dtype}; threads: {torch.get_num_threads()}; {args.repeats} repeats (medians)")
    header = (f"{'path':<42} {'prefill tok/s':>13} {'decode tok/s':>12} {'decode range':>13} {'vs transformers':>15} "
              f"{'weights MB':>10} {'peak MB':>8}  same tokens")
    print(header)
    print("-" * len(header))
    base_decode = statistics.median(timings[baseline][1]) if baseline else None
    for label, _, _ in paths:
        prefill, decode = (statistics.median(t) for t in timings[label])
        spread = f"{min(timings[label][1]):.1f}-{max(timings[label][1]):.1f}" if args.repeats > 1 else ""
        versus = f"{decode / base_decode:.2f}x" if baseline and label != baseline else ""
        if baseline is None or label == baseline:
            same = ""
        else:
            a, b = tokens[label], tokens[baseline]
            same = "yes" if a.shape == b.shape and torch.equal(a, b) else "no"
        print(f"{label:<42} {prefill:>13.1f} {decode:>12.1f} {spread:>13} {versus:>15} "
              f"{weights[label] / 2**20:>10.0f} {memory[label] / 2**20:>8.0f}  {same}")
    if baseline:
        print("same tokens: the greedy answer equals transformers' token for token. int8 weights may change a token "
              "where two candidates are nearly tied; `python -m hf_fastinfer bench` measures perplexity.")
    return 0
