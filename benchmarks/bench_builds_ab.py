"""A/B of two versions of the library's code: the working tree against a git revision, decode speed side by side.

For a change with no switch to turn it off at run time (``bench_decode_ab.py`` covers those, in one process),
e.g. a rewrite of a compiled kernel that gives the same results. The revision is checked out into a temporary
worktree; each side compiles the CPU kernels into its own build folder (a compiled module cannot be loaded twice
in one process under one name). For each precision, each side loads the default model in a process of its own and
warms up; then the two processes take turns, one timed greedy decode at a time (batch 1, ``--prompt`` prompt
tokens, ``--new-tokens`` new tokens, hf_fastinfer's cache; every other round in reverse order), so drifting
machine load hits both alike, as in one process. The table gives each side's median, its range, the median of
the per-round ratios, and whether both sides gave the same tokens.

    python benchmarks/bench_builds_ab.py --base HEAD~1 --bits 4,8 --rounds 12
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# One side: load the model at one precision, warm up, then one timed decode per line read from stdin.
_CHILD = r"""
import json, sys, torch
import hf_fastinfer, hf_fastinfer.kernels
from hf_fastinfer import evaluation, models
from hf_fastinfer.bench import timed_generate
from transformers import AutoModelForCausalLM

bits, prompt, new_tokens = json.loads(sys.argv[1])
folder = models.default_model_path(progress=False)
_, tokenizer = models.load_default(progress=False)
ids = evaluation.reference_tokens(tokenizer, prompt)
inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
dtype = torch.float32 if bits == "fp32" else torch.bfloat16
quant = None if bits in ("fp32", "bf16") else int(bits)
model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="fastinfer",
                                             quantization_config=hf_fastinfer.FastInferConfig(bits=quant)).eval()
timed_generate(model, inputs, 16, {"cache_implementation": "fastinfer"})  # warm-up (and the kernels' build)
print("READY " + json.dumps([hf_fastinfer.__file__, hf_fastinfer.kernels.__file__]), flush=True)
for _ in sys.stdin:
    _, decode, tokens, _ = timed_generate(model, inputs, new_tokens, {"cache_implementation": "fastinfer"})
    print("RESULT " + json.dumps([decode, tokens.tolist()]), flush=True)
"""


def checkout(revision: str, folder: Path) -> Path:
    """A worktree of ``revision`` at ``folder``, importable as the package: its ``kernels/`` is reachable as
    ``hf_fastinfer.kernels`` through a link (the installed package maps that name to the working tree's folder)."""
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(folder), revision], check=True)
    link = folder / "hf_fastinfer" / "kernels"
    if not link.exists():
        link.symlink_to(Path("..") / "kernels")
    return folder


class Side:
    """One side's process: the model loaded from ``source``, the kernels built in ``build``."""

    def __init__(self, source: Path, build: Path, bits: str, args):
        env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(build),
                   PYTHONPATH=os.pathsep.join(filter(None, [str(source), os.environ.get("PYTHONPATH")])))
        payload = json.dumps([bits, args.prompt, args.new_tokens])
        self.source = source
        self.proc = subprocess.Popen([sys.executable, "-c", _CHILD, payload], env=env, cwd=source, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        files = json.loads(self._line("READY "))
        # both the package and its compiled kernels' sources must be that checkout's
        if not all(Path(f).resolve().is_relative_to(source.resolve()) for f in files):
            self.close()
            raise RuntimeError(f"the process for {source} imported {files}, not that checkout's package")

    def _line(self, tag: str) -> str:
        for line in self.proc.stdout:
            if line.startswith(tag):
                return line[len(tag):]
        raise RuntimeError(f"the process for {self.source} ended (exit status {self.proc.wait()})")

    def decode(self) -> tuple[float, list]:
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        tok_s, tokens = json.loads(self._line("RESULT "))
        return tok_s, tokens

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="the git revision to compare the working tree against")
    parser.add_argument("--bits", default="4,8", help="comma-separated, of fp32, bf16, 8, 4")
    parser.add_argument("--rounds", type=int, default=12, help="timed decodes of each side, taking turns")
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    precisions = args.bits.split(",")
    unknown = [b for b in precisions if b not in ("fp32", "bf16", "8", "4")]
    if unknown:
        parser.error(f"unknown precision(s) {unknown}; choose from fp32, bf16, 8, 4")

    rows = []
    with tempfile.TemporaryDirectory(prefix="hf_fastinfer_ab_") as tmp:
        tmp = Path(tmp)
        base = checkout(args.base, tmp / "base")
        try:
            sources = {"working tree": (ROOT, tmp / "build_tree"), args.base: (base, tmp / "build_base")}
            names = list(sources)
            for bits in precisions:
                sides = {}
                try:
                    for name in names:  # one at a time: loading (and the first build) is not timed
                        sides[name] = Side(*sources[name], bits, args)
                    speed = {name: [] for name in names}
                    same = True
                    for r in range(args.rounds):
                        got = {name: sides[name].decode() for name in (names if r % 2 == 0 else names[::-1])}
                        for name in names:
                            speed[name].append(got[name][0])
                        same &= got[names[0]][1] == got[names[1]][1]
                    print(f"{bits}: " + "; ".join(f"{n} " + " ".join(f"{v:.1f}" for v in speed[n]) for n in names),
                          flush=True)
                    rows.append((bits, speed[names[0]], speed[names[1]], same))
                finally:
                    for side in sides.values():
                        side.close()
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)], check=False)

    print(f"\nDecode tok/s, {args.rounds} turns each, medians (ranges); ratio: the median of the per-round ratios "
          f"(working tree / {args.base}).\n")
    print(f"| precision | working tree | {args.base} | ratio | same tokens |")
    print("| --- | ---: | ---: | ---: | --- |")
    for bits, new, old, same in rows:
        ratio = statistics.median(n / o for n, o in zip(new, old))
        print(f"| {bits} | {statistics.median(new):.1f} ({min(new):.1f}-{max(new):.1f}) | "
              f"{statistics.median(old):.1f} ({min(old):.1f}-{max(old):.1f}) | {ratio:.2f}x | {'yes' if same else 'no'} |")


if __name__ == "__main__":
    main()
