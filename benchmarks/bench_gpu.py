"""GPU decode and prefill: transformers' own path against hf_fastinfer's injected one, side by side in one
process, on one CUDA GPU. Both run transformers' static cache, with ``torch.compile`` (CUDA graphs through
transformers' compile path) and without.

Models: the default model's shape (SmolLM2-135M-Instruct: small enough that launches, not bytes, bound a token;
its real weights when the converted folder is there, else random weights of its shape: speed does not depend on
the values) and a random-weight Llama of about 1B parameters (Llama-3.2-1B's shape: bytes bound a token). The
prompt is token ids drawn at random with a fixed seed. Precisions: bf16,
int8 and int4 weights (hf_fastinfer's MoQ; transformers has no int8 / int4 path of its own here, so those rows
are compared with transformers' bf16). Roofline = the GPU's measured read bandwidth / weight bytes per token.

    python benchmarks/bench_gpu.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers.generation.streamers import BaseStreamer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402

import hf_fastinfer  # noqa: E402
from hf_fastinfer import models  # noqa: E402
from hf_fastinfer._compat import cache_kwarg  # noqa: E402


class _Clock(BaseStreamer):
    def __init__(self):
        self.times, self.seen_prompt = [], False

    def put(self, value):
        torch.cuda.synchronize()
        if self.seen_prompt:
            self.times.append(time.perf_counter())
        self.seen_prompt = True

    def end(self):
        pass


def gpu_bandwidth_gbs() -> float:
    x = torch.ones(1 << 28, device="cuda")  # 1 GiB
    x.sum()
    torch.cuda.synchronize()
    times = []
    for _ in range(10):
        start = time.perf_counter()
        x.sum()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    del x
    return (1 << 30) / statistics.median(times) / 1e9


def weight_bytes(model) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.dim() >= 2 and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def run(model, ids, new_tokens, compiled):
    clock = _Clock()
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, streamer=clock,
                  cache_implementation="static")
    if not compiled:
        kwargs["disable_compile"] = True
    torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    return ids.shape[1] / (clock.times[0] - start), (len(clock.times) - 1) / (clock.times[-1] - clock.times[0])


SHAPES = {
    # SmolLM2-135M-Instruct (the default model)
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, head_dim=64, vocab_size=49152, tie_word_embeddings=True,
                    rms_norm_eps=1e-5, rope_theta=100000.0, max_position_embeddings=8192),
    # Llama-3.2-1B
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, max_position_embeddings=8192,
                     rope_theta=500000.0),
}


def model_folder(name: str, root: Path) -> Path:
    """The default model's converted folder when it is there (real weights), else a random-weight Llama of the
    shape, saved once in bf16."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if name == "smollm2":
        try:
            return models.default_model_path(download=False, progress=False)
        except models.DefaultModelUnavailable:
            pass
    path = root / name
    if not (path / "config.json").exists():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = LlamaForCausalLM(LlamaConfig(**SHAPES[name])).to(torch.bfloat16)
        model.save_pretrained(path)
    return path


@torch.inference_mode()
def graph_decode_rate(model, ids, steps: int) -> float:
    """Decode tokens/s with one decode step captured in a CUDA graph (torch.cuda.graph) and replayed: transformers'
    StaticCache, a 4-D boolean mask and the position ids held in static tensors that are updated in place
    between replays, so no host synchronisation happens inside the step."""
    from transformers import StaticCache

    prompt = ids.shape[1]
    max_len = prompt + steps + 8
    cache = StaticCache(config=model.config, max_cache_len=max_len)
    mask = torch.zeros(1, 1, 1, max_len, dtype=torch.bool, device="cuda")
    mask[..., :prompt] = True
    prefill_mask = torch.arange(max_len, device="cuda")[None, :] <= torch.arange(prompt, device="cuda")[:, None]
    out = model(ids, attention_mask=prefill_mask[None, None], use_cache=True, **{cache_kwarg(): cache},
                position_ids=torch.arange(prompt, device="cuda")[None])
    token = out.logits[:, -1:].argmax(-1)
    position = torch.tensor([[prompt]], device="cuda")
    step_args = dict(input_ids=token, attention_mask=mask, use_cache=True, **{cache_kwarg(): cache},
                     position_ids=position)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    filled = prompt
    with torch.cuda.stream(side):
        for _ in range(3):  # warm-up (Triton autotuning / compilation, cuBLAS handles) before capture
            mask[..., filled] = True
            model(**step_args)
            position.add_(1)
            filled += 1
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    mask[..., filled] = True
    with torch.cuda.graph(graph):
        logits = model(**step_args).logits
    filled += 1
    position.add_(1)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        mask[..., filled] = True
        graph.replay()
        token.copy_(logits[:, -1:].argmax(-1))
        position.add_(1)
        filled += 1
    torch.cuda.synchronize()
    return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--models", default="smollm2,llama-1b")
    parser.add_argument("--precisions", default="bf16,int8,int4")
    parser.add_argument("--compile", default="off,on")
    parser.add_argument("--graph", action="store_true", help="time a decode step captured with torch.cuda.graph instead")
    parser.add_argument("--json", default=None)
    parser.add_argument("--model-dir", default="/tmp/hf_fastinfer_bench_models")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    bandwidth = gpu_bandwidth_gbs()
    print(f"{machine()}; read bandwidth {bandwidth:.0f} GB/s", flush=True)
    rows = []
    for name in args.models.split(","):
        folder = model_folder(name, Path(args.model_dir))
        vocab = SHAPES[name]["vocab_size"]
        ids = torch.randint(3, vocab, (1, args.prompt), generator=torch.Generator().manual_seed(0)).cuda()
        if args.graph:
            paths = [("transformers bf16", AutoModelForCausalLM.from_pretrained(
                folder, dtype=torch.bfloat16, attn_implementation="sdpa").cuda().eval())]
            for precision in args.precisions.split(","):
                bits = None if precision == "bf16" else int(precision[3:])
                paths.append((f"hf_fastinfer {precision}", AutoModelForCausalLM.from_pretrained(
                    folder, dtype=torch.bfloat16, attn_implementation="fastinfer", device_map="cuda",
                    quantization_config=hf_fastinfer.FastInferConfig(bits=bits)).eval()))
            rates = {label: [] for label, _ in paths}
            for _ in range(args.repeats):
                for label, model in paths:
                    try:
                        rates[label].append(graph_decode_rate(model, ids, args.new_tokens))
                    except Exception as exc:  # report, and go on with the other paths
                        print(f"{label}: capture failed: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
            base = statistics.median(rates[paths[0][0]]) if rates[paths[0][0]] else float("nan")
            for label, model in paths:
                if not rates[label]:
                    continue
                decode = statistics.median(rates[label])
                roofline = bandwidth * 1e9 / weight_bytes(model)
                row = dict(model=name, compiled="cuda graph", path=label, prefill_tok_s=float("nan"),
                           decode_tok_s=decode, decode_range=[min(rates[label]), max(rates[label])],
                           decode_vs_transformers=decode / base, prefill_vs_transformers=float("nan"),
                           roofline_tok_s=roofline, roofline_share=decode / roofline)
                rows.append(row)
                print(json.dumps(row), flush=True)
            del paths
            torch.cuda.empty_cache()
            continue
        for compiled in [c == "on" for c in args.compile.split(",")]:
            paths = [("transformers bf16", AutoModelForCausalLM.from_pretrained(
                folder, dtype=torch.bfloat16, attn_implementation="sdpa").cuda().eval())]
            for precision in args.precisions.split(","):
                bits = None if precision == "bf16" else int(precision[3:])
                model = AutoModelForCausalLM.from_pretrained(
                    folder, dtype=torch.bfloat16, attn_implementation="fastinfer", device_map="cuda",
                    quantization_config=hf_fastinfer.FastInferConfig(bits=bits)).eval()
                paths.append((f"hf_fastinfer {precision}", model))
            for _, model in paths:  # warm-up (and compile): the measured shapes, so no recompilation follows
                run(model, ids, args.new_tokens, compiled)
            results = {label: ([], []) for label, _ in paths}
            for _ in range(args.repeats):
                for label, model in paths:
                    prefill, decode = run(model, ids, args.new_tokens, compiled)
                    results[label][0].append(prefill)
                    results[label][1].append(decode)
            base = statistics.median(results[paths[0][0]][1])
            base_prefill = statistics.median(results[paths[0][0]][0])
            for label, model in paths:
                prefill, decode = (statistics.median(v) for v in results[label])
                roofline = bandwidth * 1e9 / weight_bytes(model)
                row = dict(model=name, compiled=compiled, path=label, prefill_tok_s=prefill, decode_tok_s=decode,
                           decode_range=[min(results[label][1]), max(results[label][1])],
                           decode_vs_transformers=decode / base, prefill_vs_transformers=prefill / base_prefill,
                           roofline_tok_s=roofline, roofline_share=decode / roofline)
                rows.append(row)
                print(json.dumps(row), flush=True)
            del paths
            torch.cuda.empty_cache()
    print("| model | compile | path | prefill tok/s | decode tok/s | decode vs transformers bf16 | share of roofline |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['model']} | {r['compiled'] if isinstance(r['compiled'], str) else ('on' if r['compiled'] else 'off')} | {r['path']} | {r['prefill_tok_s']:.0f} | "
              f"{r['decode_tok_s']:.0f} ({r['decode_range'][0]:.0f}-{r['decode_range'][1]:.0f}) | "
              f"{r['decode_vs_transformers']:.2f}x | {r['roofline_share']:.0%} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "bandwidth_gbs": bandwidth, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
