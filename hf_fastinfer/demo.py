"""``python -m hf_fastinfer demo``: chat with the default model through hf_fastinfer, and time it against
transformers' own path on the same prompt, in the same process.

Timing method (same for both paths): a streamer records the wall-clock time at which ``generate()`` hands
over each token. Prefill time runs from the call to the first new token (the prompt's forward pass and the
first sampling step); decode time from the first new token to the last, over ``new tokens - 1`` steps.
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass, field

import torch
from transformers.generation.streamers import BaseStreamer, TextStreamer

DEFAULT_PROMPT = "What is the capital of France? Answer in one sentence, then name two famous sights there."


class _TimingStreamer(BaseStreamer):
    """Records when each chunk of tokens arrives; optionally forwards to a text streamer for display."""

    def __init__(self, forward: BaseStreamer | None = None):
        self.forward = forward
        self.times: list[float] = []
        self.new_tokens = 0
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        now = time.perf_counter()
        if not self._prompt_seen:  # generate() first hands over the prompt
            self._prompt_seen = True
        else:
            self.times.append(now)
            self.new_tokens += value.numel()
        if self.forward is not None:
            self.forward.put(value)

    def end(self) -> None:
        if self.forward is not None:
            self.forward.end()


@dataclass
class PathTiming:
    label: str
    prompt_tokens: int
    prefill_tps: list[float] = field(default_factory=list)
    decode_tps: list[float] = field(default_factory=list)
    tokens: torch.Tensor | None = None

    def summary(self) -> tuple[float, float]:
        return statistics.median(self.prefill_tps), statistics.median(self.decode_tps)

    def spread(self) -> str:
        if len(self.decode_tps) < 2:
            return ""
        return f"{min(self.decode_tps):.1f}-{max(self.decode_tps):.1f}"


def _generate_timed(model, inputs, gen_kwargs, streamer: BaseStreamer | None = None):
    timer = _TimingStreamer(forward=streamer)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**inputs, **gen_kwargs, streamer=timer)
    if timer.new_tokens < 2:
        raise RuntimeError("the model stopped after one token: raise --max-new-tokens or change --prompt to time decoding")
    prefill_s = timer.times[0] - start
    decode_s = timer.times[-1] - timer.times[0]
    prompt_len = inputs["input_ids"].shape[1]
    return out[0, prompt_len:], prompt_len / prefill_s, (timer.new_tokens - 1) / decode_s


def run(args) -> int:
    import hf_fastinfer  # noqa: F401  (registers "fastinfer" with transformers)
    from hf_fastinfer import models

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")

    print(f"Loading {models.DEFAULT_MODEL_NAME} ({args.dtype}, {device}) ...", file=sys.stderr)
    fast_model, tokenizer = models.load_default(dtype=dtype, attn_implementation="fastinfer", device_map=device)
    baseline_model = None
    if not args.no_baseline:
        baseline_model, _ = models.load_default(dtype=dtype, attn_implementation="sdpa", device_map=device)

    inputs = {k: v.to(device) for k, v in models.chat_inputs(tokenizer, args.prompt).items()}
    common = dict(max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    fast_kwargs = dict(common, cache_implementation="fastinfer")
    base_kwargs = dict(common)  # transformers' defaults: SDPA attention, DynamicCache

    # One short warm-up per path: first calls pay for allocator growth and lazy initialisation.
    warm = dict(max_new_tokens=2, min_new_tokens=2)
    with torch.inference_mode():
        fast_model.generate(**inputs, **{**fast_kwargs, **warm})
        if baseline_model is not None:
            baseline_model.generate(**inputs, **{**base_kwargs, **warm})

    prompt_len = inputs["input_ids"].shape[1]
    fast = PathTiming("hf_fastinfer  (attn fastinfer, cache fastinfer)", prompt_len)
    base = PathTiming("transformers  (attn sdpa, dynamic cache)", prompt_len)

    print(f"\nUser: {args.prompt}\nAssistant: ", end="", flush=True)
    display = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    for repeat in range(args.repeats):
        # Alternate the two paths so that drifting machine load affects both alike.
        tokens, prefill, decode = _generate_timed(fast_model, inputs, fast_kwargs, display if repeat == 0 else None)
        fast.prefill_tps.append(prefill)
        fast.decode_tps.append(decode)
        fast.tokens = tokens
        if baseline_model is not None:
            tokens, prefill, decode = _generate_timed(baseline_model, inputs, base_kwargs)
            base.prefill_tps.append(prefill)
            base.decode_tps.append(decode)
            base.tokens = tokens

    print()
    print(f"prompt: {prompt_len} tokens; generated: {len(fast.tokens)} tokens; device: {device}; "
          f"dtype: {args.dtype}; threads: {torch.get_num_threads()}; repeats: {args.repeats} (medians)")
    header = f"{'path':<50} {'prefill tok/s':>14} {'decode tok/s':>13} {'decode range':>13}"
    print(header)
    print("-" * len(header))
    fp, fd = fast.summary()
    if baseline_model is not None:
        bp, bd = base.summary()
        print(f"{base.label:<50} {bp:>14.1f} {bd:>13.1f} {base.spread():>13}")
    print(f"{fast.label:<50} {fp:>14.1f} {fd:>13.1f} {fast.spread():>13}")
    if baseline_model is not None:
        print(f"{'ratio (hf_fastinfer / transformers)':<50} {fp / bp:>13.2f}x {fd / bd:>12.2f}x")
        same = fast.tokens.shape == base.tokens.shape and bool(torch.equal(fast.tokens.cpu(), base.tokens.cpu()))
        print(f"same tokens as transformers: {'yes' if same else 'NO'}")
    return 0
