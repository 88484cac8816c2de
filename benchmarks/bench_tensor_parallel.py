"""Tensor parallelism on this machine: tp=1 against tp=2 / tp=3, decode and prefill tokens/s, memory per rank.

    python benchmarks/bench_tensor_parallel.py            # prints the tables
    python benchmarks/bench_tensor_parallel.py --large --write    # with a 0.79 B model, into BENCHMARKS.md

Each size runs in its own processes, started the way a user starts them: tp=1 is one plain process with every
core's thread, tp>1 runs under torchrun with one thread per rank. Rank 0 times greedy generation (batch 1, the
full number of new tokens: no early stop) after one warm-up, ``--repeats`` times; every rank reports its peak
resident memory (VmHWM), and its resident memory after the imports, before loading. A gloo all-reduce of one
token's hidden state is timed too (``--rank`` processes), since it sets what a decoded token costs here. Two models: the default
model (9 query / 3 KV heads: tp=1 and tp=3) and a random-weight Llama of similar size with 12 / 4 heads (tp=1 and
tp=2), built locally. Sizes are run one after the other, so only ratios within one run of this script compare.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()


def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as handle:
        for line in handle:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out[key] = int(value.split()[0]) * 1024
    return out


def rank_main(args) -> None:
    """One rank (or the single process): load, warm up, time, report."""
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    import hf_fastinfer

    baseline = _status()["VmRSS"]  # after the imports: the interpreter, torch, transformers, hf_fastinfer
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    tp = int(os.environ.get("WORLD_SIZE", "1"))
    bits = None if args.bits == "none" else int(args.bits)
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.path, dtype=torch.float32, quantization_config=
                                                 hf_fastinfer.FastInferConfig(bits=bits, tp_size=tp))
    load_s = time.perf_counter() - start
    vocab = model.config.vocab_size
    prompt = (torch.arange(args.prompt_tokens) * 7919 + 17) % vocab
    ids = prompt[None, :]

    def generate(new_tokens):
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)

    generate(4)  # warm-up
    prefill, decode = [], []
    for _ in range(args.repeats):
        if dist.is_initialized():
            dist.barrier()
        start = time.perf_counter()
        generate(1)
        first = time.perf_counter() - start
        start = time.perf_counter()
        generate(args.new_tokens)
        total = time.perf_counter() - start
        prefill.append(args.prompt_tokens / first)
        decode.append((args.new_tokens - 1) / max(total - first, 1e-9))
    allreduce_us = None
    if dist.is_initialized():
        # what one all-reduce of a token's hidden state costs between these ranks (two per block per token)
        hidden = torch.zeros(1, 1, model.config.hidden_size)
        times = []
        for _ in range(220):
            dist.barrier()
            start = time.perf_counter()
            dist.all_reduce(hidden)
            times.append(time.perf_counter() - start)
        allreduce_us = statistics.median(times[20:]) * 1e6
    memory = {"peak": _status()["VmHWM"], "baseline": baseline}
    memories = [memory]
    if dist.is_initialized():
        memories = [None] * tp
        dist.all_gather_object(memories, memory)
    if int(os.environ.get("RANK", "0")) == 0:
        summary = str(hf_fastinfer.report(model).parallel or "")
        result = {"tp": tp, "bits": args.bits, "load_s": load_s, "allreduce_us": allreduce_us, "prefill": prefill, "decode": decode,
                  "memory": memories, "threads": torch.get_num_threads(), "plan": summary}
        Path(args.out).write_text(json.dumps(result))


def run_size(path: str, bits: str, tp: int, args, out: Path) -> dict:
    common = ["--rank", "--path", path, "--bits", bits, "--out", str(out), "--repeats", str(args.repeats),
              "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens)]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    if tp == 1:
        command = [sys.executable, str(HERE)] + common
        env["OMP_NUM_THREADS"] = str(os.cpu_count() or 1)
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={tp}",
                   str(HERE)] + common
        env["OMP_NUM_THREADS"] = "1"
    run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800)
    if run.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{run.stderr[-3000:]}")
    return json.loads(out.read_text())


def build_gqa_llama(folder: Path, large: bool = False) -> str:
    """A random-weight Llama with 12 query / 4 KV heads (so tp=2 divides), about the default model's size; or
    (``large``) one with 16 / 4 heads and 0.79 B parameters (3.2 GB in fp32), where the ~400 MiB each process
    carries for its interpreter and libraries no longer dominates its memory."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if not (folder / "config.json").exists():
        shape = (dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16)
                 if large else dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                                    num_attention_heads=12))
        config = LlamaConfig(vocab_size=32768, num_key_value_heads=4, tie_word_embeddings=True,
                             max_position_embeddings=4096, **shape)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            LlamaForCausalLM(config).save_pretrained(folder)
    return str(folder)


def _mib(n: float) -> str:
    return f"{n / 2**20:.0f}"


def table(rows: list[tuple[str, dict]], base: dict) -> str:
    lines = ["| model, weights | tp | threads per rank | decode tok/s (min-max) | vs tp=1 | prefill tok/s (min-max) | "
             "vs tp=1 | peak RSS per rank, MiB | vs tp=1 | growth over imports, MiB | vs tp=1 | one all-reduce, us |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for label, r in rows:
        b = base[(label, r["bits"])]
        med = {k: statistics.median(r[k]) for k in ("decode", "prefill")}
        bmed = {k: statistics.median(b[k]) for k in ("decode", "prefill")}
        peak = max(m["peak"] for m in r["memory"])
        growth = max(m["peak"] - m["baseline"] for m in r["memory"])
        bpeak = b["memory"][0]["peak"]
        bgrowth = b["memory"][0]["peak"] - b["memory"][0]["baseline"]
        allreduce = "" if r["allreduce_us"] is None else f"{r['allreduce_us']:.0f}"
        lines.append(
            f"| {label}, {'fp32' if r['bits'] == 'none' else 'int' + r['bits']} | {r['tp']} | {r['threads']} | "
            f"{med['decode']:.1f} ({min(r['decode']):.1f}-{max(r['decode']):.1f}) | {med['decode'] / bmed['decode']:.2f}x | "
            f"{med['prefill']:.0f} ({min(r['prefill']):.0f}-{max(r['prefill']):.0f}) | "
            f"{med['prefill'] / bmed['prefill']:.2f}x | {_mib(peak)} | {peak / bpeak:.2f}x | {_mib(growth)} | "
            f"{growth / bgrowth:.2f}x | {allreduce} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--bits", default="none,8")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--large", action="store_true",
                        help="also a 0.79 B-parameter random Llama (3.2 GB fp32; tp=1 and tp=2, fp32)")
    parser.add_argument("--write", action="store_true", help="write BENCHMARKS.md's tensor-parallel section")
    args = parser.parse_args()
    if args.rank:
        rank_main(args)
        return
    sys.path.insert(0, str(HERE.parent))
    from _common import machine, read_bandwidth_gbs, write_section

    from hf_fastinfer import models

    work = Path(tempfile.mkdtemp(prefix="hf_fastinfer_tp_bench_"))
    default = str(models.default_model_path())
    gqa = build_gqa_llama(Path(tempfile.gettempdir()) / "hf_fastinfer_gqa_llama")
    runs = [("default model (9/3 heads)", default, (1, 3), args.bits.split(",")),
            ("Llama 12/4 heads", gqa, (1, 2), args.bits.split(","))]
    if args.large:
        large = build_gqa_llama(Path(tempfile.gettempdir()) / "hf_fastinfer_gqa_llama_large", large=True)
        runs.append(("Llama 16/4 heads, 0.79 B", large, (1, 2), ["none"]))
    bandwidth = read_bandwidth_gbs()[0]
    rows, base, plans = [], {}, {}
    for label, path, sizes, bits_list in runs:
        for bits in bits_list:
            for tp in sizes:
                result = run_size(path, bits, tp, args, work / f"{tp}-{bits}.json")
                print(f"{label} bits={bits} tp={tp}: decode {statistics.median(result['decode']):.1f} tok/s, "
                      f"prefill {statistics.median(result['prefill']):.0f} tok/s", flush=True)
                if tp == 1:
                    base[(label, bits)] = result
                rows.append((label, result))
                if tp > 1 and bits == "none":
                    plans[(label, tp)] = result["plan"]
    text = table(rows, base)
    print(text)
    command = "python benchmarks/bench_tensor_parallel.py --large --write"
    plan_text = "\n\n".join(f"{label}, tp={tp}:\n\n```\n{plan}\n```" for (label, tp), plan in plans.items())
    body = (f"Command: `{command}` (defaults: fp32 and int8 weights, batch 1, {args.prompt_tokens}-token prompt, "
            f"{args.new_tokens} new tokens, {args.repeats} rounds, medians with min-max). Machine: {machine()}; read "
            f"bandwidth {bandwidth:.1f} GB/s. tp=1: one process with {os.cpu_count()} threads; tp>1: torchrun, gloo, "
            "one thread per rank. Peak RSS is VmHWM of each rank (the largest rank shown); growth is that peak less the "
            "rank's resident memory after its imports (interpreter, torch, transformers, hf_fastinfer), before "
            "loading.\n\n" + text + "\n\nThe fp32 plans and what each decoded token all-reduces, as "
            "`hf_fastinfer.report(model)` prints them on rank 0:\n\n" + plan_text)
    if args.write:
        write_section("tensor-parallel", body)


if __name__ == "__main__":
    main()
